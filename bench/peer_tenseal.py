"""The peer: TenSEAL's encrypted-MNIST design on the same digits data as the ICNN.

TenSEAL's "Tutorial 4 - Encrypted Convolution on MNIST" classifies a 28x28 image with one
convolution (``Conv2d(1, 4, kernel 7, stride 3)``), a square activation, ``Linear(256, 64)``, a square
and ``Linear(64, 10)``, evaluated on one CKKS ciphertext (poly_modulus_degree 8192, coefficient
moduli [31, 26 x 6, 31] bits, scale 2^26, Galois keys): the client im2col-encodes and encrypts the
image (``ts.im2col_encoding``), the server runs ``conv2d_im2col`` per output channel, packs the
channels (``CKKSVector.pack_vectors``), squares, multiplies by the dense weights (``mm``) and adds
the biases, and the client decrypts ten approximate logits. No offline phase, one party computes,
the server holds the model in plaintext (unlike ours, where neither cloud sees the weights).

Adapted to our images (:func:`he_cnn.training.data.load_digits_dataset`: 16x16 grey in [0, 1]):
**kernel 4, stride 2** (:data:`KERNEL`, :data:`STRIDE`), so 7x7 = 49 windows per channel and
4 x 49 = 196 features into ``Linear(196, 64)`` -- the closest analogue of the tutorial's 8x8 windows
on 28x28 (kernel 7 stride 3 on 16x16 would leave 4x4 windows, 64 features). Training as the tutorial:
Adam, learning rate 1e-3, batch 64, cross-entropy, here :data:`EPOCHS` epochs (the digits training
split has 1,347 images against MNIST's 60,000), torch on one thread, seeded; a few seconds on two
cores, nothing cached on disk.

Precision: the decrypted logits are the float model's within a few per cent, and systematically a
little larger. TenSEAL sets a ciphertext's scale back to 2^26 after each rescale, while the primes it
divides by are 26-bit NTT primes slightly below 2^26, so each rescale multiplies the value by
2^26/q (about 1.0025 here); over the five rescales (the squares compound it) the logits come out ~4 %
high. That is the tutorial's design as published; the argmax is what it is judged on.

:func:`run_peer` is what ``bench/bench.py`` calls; it returns a JSON-able dict, or
``{"error": ...}`` when tenseal is not installed (``pip install he-cnn[peer]``).
"""
from __future__ import annotations

import statistics
import time
from typing import Any

import numpy as np
import torch

KERNEL, STRIDE = 4, 2
CHANNELS, HIDDEN = 4, 64
EPOCHS, BATCH, LR = 30, 64, 1e-3
POLY_MODULUS_DEGREE = 8192
COEFF_MOD_BIT_SIZES = [31, 26, 26, 26, 26, 26, 26, 31]
SCALE_BITS = 26
NOT_INSTALLED = "tenseal not installed (pip install he-cnn[peer])"


def windows_side(size: int, kernel: int = KERNEL, stride: int = STRIDE) -> int:
    return (size - kernel) // stride + 1


class PeerNet(torch.nn.Module):
    """The tutorial's ConvNet for ``size x size`` images: conv -> x^2 -> dense -> x^2 -> dense."""

    def __init__(self, size: int = 16, classes: int = 10, kernel: int = KERNEL, stride: int = STRIDE,
                 channels: int = CHANNELS, hidden: int = HIDDEN):
        super().__init__()
        self.size, self.kernel, self.stride = size, kernel, stride
        self.features = channels * windows_side(size, kernel, stride) ** 2
        self.conv1 = torch.nn.Conv2d(1, channels, kernel_size=kernel, padding=0, stride=stride)
        self.fc1 = torch.nn.Linear(self.features, hidden)
        self.fc2 = torch.nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = x * x
        x = x.reshape(-1, self.features)  # channel-major, as pack_vectors lays the channels out
        x = self.fc1(x)
        x = x * x
        return self.fc2(x)

    def describe(self) -> str:
        w = windows_side(self.size, self.kernel, self.stride)
        return (f"Conv2d(1, {self.conv1.out_channels}, kernel {self.kernel}, stride {self.stride}) -> x^2 -> "
                f"Linear({self.features}, {self.fc1.out_features}) -> x^2 -> Linear({self.fc1.out_features}, "
                f"{self.fc2.out_features}); input {self.size}x{self.size}, {w}x{w} windows")


def train_peer(ds, seed: int = 0, epochs: int = EPOCHS, limit: int | None = None) -> tuple[PeerNet, dict]:
    """The peer model trained in plaintext torch on ``ds`` (first ``limit`` training images if given),
    on one torch thread so that a seed always gives the same weights."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    try:
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        x = torch.from_numpy(np.ascontiguousarray(ds.x_train[:limit], dtype=np.float32))
        y = torch.from_numpy(np.ascontiguousarray(ds.y_train[:limit], dtype=np.int64))
        model = PeerNet(size=int(x.shape[-1]), classes=len(ds.classes))
        opt = torch.optim.Adam(model.parameters(), lr=LR)
        loss_fn = torch.nn.CrossEntropyLoss()
        model.train()
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=gen)
            for start in range(0, len(x), BATCH):
                idx = order[start:start + BATCH]
                opt.zero_grad()
                loss = loss_fn(model(x[idx]), y[idx])
                loss.backward()
                opt.step()
        model.eval()
    finally:
        torch.set_num_threads(threads)
    return model, {"epochs": epochs, "train_images": len(x), "train_seconds": time.perf_counter() - t0,
                   "seed": seed}


def plain_logits(model: PeerNet, images: np.ndarray) -> np.ndarray:
    """Float model outputs for ``(n, 1, s, s)`` images."""
    with torch.no_grad():
        return model(torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))).numpy()


def accuracy(model: PeerNet, ds) -> float:
    return float((plain_logits(model, ds.x_test).argmax(1) == ds.y_test).mean())


def make_context(threads: int | None = None):
    """The tutorial's CKKS context (secret key included: the client's), with Galois keys."""
    import tenseal as ts

    ctx = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=POLY_MODULUS_DEGREE,
                     coeff_mod_bit_sizes=COEFF_MOD_BIT_SIZES, n_threads=threads)
    ctx.global_scale = 2 ** SCALE_BITS
    ctx.generate_galois_keys()
    return ctx


class EncryptedPeer:
    """The server's side: the trained weights as plaintext lists, evaluated on an im2col ciphertext."""

    def __init__(self, model: PeerNet):
        c = model.conv1
        self.kernel, self.stride = model.kernel, model.stride
        self.conv_weight = c.weight.data.view(c.out_channels, c.kernel_size[0], c.kernel_size[1]).tolist()
        self.conv_bias = c.bias.data.tolist()
        self.fc1_weight = model.fc1.weight.T.data.tolist()
        self.fc1_bias = model.fc1.bias.data.tolist()
        self.fc2_weight = model.fc2.weight.T.data.tolist()
        self.fc2_bias = model.fc2.bias.data.tolist()

    def encrypt(self, context, image: np.ndarray):
        """Client: the ``s x s`` image im2col-encoded and encrypted; (ciphertext, windows_nb)."""
        import tenseal as ts

        return ts.im2col_encoding(context, np.asarray(image, dtype=np.float64).tolist(),
                                  self.kernel, self.kernel, self.stride)

    def forward(self, enc_x, windows_nb: int):
        """Server: the tutorial's EncConvNet.forward."""
        import tenseal as ts

        channels = [enc_x.conv2d_im2col(kernel, windows_nb) + bias
                    for kernel, bias in zip(self.conv_weight, self.conv_bias)]
        enc_x = ts.CKKSVector.pack_vectors(channels)
        enc_x.square_()
        enc_x = enc_x.mm(self.fc1_weight) + self.fc1_bias
        enc_x.square_()
        return enc_x.mm(self.fc2_weight) + self.fc2_bias


def classify(peer: EncryptedPeer, context, image: np.ndarray) -> dict[str, Any]:
    """One image end to end, each step timed: encrypt (client), evaluate (server), decrypt (client)."""
    t0 = time.perf_counter()
    enc_x, windows_nb = peer.encrypt(context, image)
    t1 = time.perf_counter()
    enc_y = peer.forward(enc_x, windows_nb)
    t2 = time.perf_counter()
    logits = enc_y.decrypt()
    t3 = time.perf_counter()
    return {"logits": [float(v) for v in logits], "encrypt_seconds": t1 - t0, "eval_seconds": t2 - t1,
            "decrypt_seconds": t3 - t2, "enc_x": enc_x, "enc_y": enc_y}


def run_peer(ds, images: int = 3, batch: int = 8, threads: int | None = None, seed: int = 0,
             log=lambda message: None) -> dict[str, Any]:
    """Train the peer, then per image (the first ``images`` test images, as the bench's ``indices``):
    client encryption, server evaluation, decryption and whether the argmax equals the float model's;
    then ``batch`` images back to back (encrypt, evaluate, decrypt; CKKS has no offline phase) for
    images per hour. ``threads``: TenSEAL's ``n_threads`` (None: all CPUs)."""
    try:
        import tenseal as ts
    except ImportError:
        return {"error": NOT_INSTALLED}
    out: dict[str, Any] = {"design": "TenSEAL Tutorial 4 (encrypted convolution on MNIST)",
                           "tenseal": getattr(ts, "__version__", "?"), "kernel": KERNEL, "stride": STRIDE,
                           "ckks": {"poly_modulus_degree": POLY_MODULUS_DEGREE,
                                    "coeff_mod_bit_sizes": COEFF_MOD_BIT_SIZES, "scale_bits": SCALE_BITS},
                           "threads": threads}
    log(f"peer: training the TenSEAL tutorial model ({EPOCHS} epochs, seed {seed})")
    model, info = train_peer(ds, seed)
    out["model"] = model.describe()
    out["training"] = info
    out["plain_test_accuracy"] = accuracy(model, ds)
    peer = EncryptedPeer(model)
    t0 = time.perf_counter()
    context = make_context(threads)
    out["context_seconds"] = time.perf_counter() - t0
    count = min(images, len(ds.x_test))
    plain = plain_logits(model, ds.x_test[:max(count, 1)])
    classify(peer, context, ds.x_test[0][0])  # warm-up, untimed
    rows = []
    for i in range(count):
        r = classify(peer, context, ds.x_test[i][0])
        if i == 0:
            out["input_ciphertext_bytes"] = len(r["enc_x"].serialize())
            out["output_ciphertext_bytes"] = len(r["enc_y"].serialize())
        err = float(np.max(np.abs(np.array(r["logits"]) - plain[i])))
        rows.append({"index": i, "label": int(ds.y_test[i]), "plain_pred": int(plain[i].argmax()),
                     "enc_pred": int(np.argmax(r["logits"])), "argmax_match": int(np.argmax(r["logits"])) == int(plain[i].argmax()),
                     "max_abs_error": err, "max_rel_error": err / max(float(np.max(np.abs(plain[i]))), 1e-12),
                     "encrypt_seconds": r["encrypt_seconds"], "eval_seconds": r["eval_seconds"],
                     "decrypt_seconds": r["decrypt_seconds"]})
        log(f"peer: image {i + 1}/{count}: evaluation {r['eval_seconds']:.2f} s, "
            f"{'argmax matches' if rows[-1]['argmax_match'] else 'ARGMAX DIFFERS'}")
    out["images"] = rows
    if rows:
        out["encrypt_seconds"] = statistics.mean(r["encrypt_seconds"] for r in rows)
        out["eval_seconds"] = statistics.mean(r["eval_seconds"] for r in rows)
        out["decrypt_seconds"] = statistics.mean(r["decrypt_seconds"] for r in rows)
        out["argmax_matches"] = sum(r["argmax_match"] for r in rows)
    if batch > 0:
        log(f"peer: throughput, {batch} images back to back")
        t0 = time.perf_counter()
        evals = []
        for n in range(batch):
            evals.append(classify(peer, context, ds.x_test[n % len(ds.x_test)][0])["eval_seconds"])
        wall = time.perf_counter() - t0
        out["batch"] = {"images": batch, "wall_seconds": wall, "images_per_hour": 3600 * batch / wall,
                        "eval_images_per_hour": 3600 * batch / sum(evals),
                        "mean_eval_seconds": statistics.mean(evals)}
    return out
