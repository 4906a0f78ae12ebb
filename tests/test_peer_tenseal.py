"""The benchmark's peer (bench/peer_tenseal.py): TenSEAL's encrypted-MNIST design on the digits.

A real run, not timed: the peer model trained briefly on a seeded subset, two test images encrypted,
evaluated with TenSEAL and decrypted, compared with the plaintext float model.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

ts = pytest.importorskip("tenseal")
# bench/ lives in the checkout, not in the wheel (.ci/run also tests the wheel without the sources)
peer = pytest.importorskip("bench.peer_tenseal", reason="bench/ is not installed with he-cnn")

from he_cnn.training.data import load_digits_dataset  # noqa: E402


@pytest.fixture(scope="module")
def trained():
    ds = load_digits_dataset()
    model, info = peer.train_peer(ds, seed=0, epochs=8, limit=600)
    return ds, model, info


def test_training_is_seeded(trained):
    ds, model, info = trained
    again, _ = peer.train_peer(ds, seed=0, epochs=8, limit=600)
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        assert np.array_equal(a.numpy(), b.numpy())
    assert info["train_images"] == 600
    assert peer.accuracy(model, ds) > 0.5  # well above chance (10 classes), even briefly trained


def test_encrypted_logits_match_plaintext(trained):
    ds, model, _ = trained
    enc = peer.EncryptedPeer(model)
    context = peer.make_context()
    plain = peer.plain_logits(model, ds.x_test[:2])
    for i in range(2):
        x, windows_nb = enc.encrypt(context, ds.x_test[i][0])
        assert windows_nb == peer.windows_side(16) ** 2
        # first layer alone: CKKS noise and one rescale, within a few 1e-2 of the values' scale (the
        # rescale's gain is ~0.25 %; TenSEAL's rotate-and-sum leaves ~1 % errors in the first windows)
        conv = ts.CKKSVector.pack_vectors([x.conv2d_im2col(k, windows_nb) + b
                                           for k, b in zip(enc.conv_weight, enc.conv_bias)])
        with torch.no_grad():
            plain_conv = model.conv1(torch.from_numpy(ds.x_test[i:i + 1])).numpy().ravel()
        assert np.max(np.abs(np.array(conv.decrypt()) - plain_conv)) <= 3e-2 * np.max(np.abs(plain_conv))
        # the whole network: five rescales, each leaving TenSEAL's scale reset to 2^26 while the prime
        # divided by is slightly below it (a few per cent systematic gain, see the module docstring)
        logits = np.array(enc.forward(x, windows_nb).decrypt())
        scale = np.max(np.abs(plain[i]))
        assert np.max(np.abs(logits - plain[i])) <= 0.1 * scale
        assert int(np.argmax(logits)) == int(np.argmax(plain[i]))


def test_run_peer_reports(trained, monkeypatch):
    ds, model, info = trained
    monkeypatch.setattr(peer, "train_peer", lambda ds, seed=0: (model, info))
    out = peer.run_peer(ds, images=1, batch=1)
    assert "error" not in out
    assert out["images"][0]["argmax_match"]
    assert out["eval_seconds"] > 0 and out["batch"]["images_per_hour"] > 0
    assert "kernel 4, stride 2" in out["model"]


def test_run_peer_without_tenseal(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_tenseal(name, *args, **kwargs):
        if name == "tenseal":
            raise ImportError("no tenseal")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tenseal)
    assert peer.run_peer(None) == {"error": peer.NOT_INSTALLED}
