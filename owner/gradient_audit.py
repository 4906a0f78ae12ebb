"""``he-cnn owner audit --gradient-leakage``: DLG/iDLG against one plaintext ICNN gradient, and against what
the clouds see of the same gradient sent as an encrypted federated update.

The audited gradient is one batch's, taken from the ICNN after ``warm_epochs`` of training (a model in
the middle of a federated session). Views attacked with the same code (:mod:`he_cnn.training.gradient_leakage`):
  - ``plaintext``: the gradient itself, as plain federated learning would share it;
  - ``S1 ciphertexts``: the owner's upload E(P) (:mod:`he_cnn.protocols.aggregate`), each ciphertext read
    as if it were a plaintext pack: all S1 ever holds of an update;
  - ``S2 masked sum``: the values S2 decrypts in the aggregation round (recorded by a key cloud in this
    process: the sum of this update and a second owner's, masked), read with the public layout;
  - ``DP-noised``: the gradient clipped to DP-SGD's norm and noised with multiplier ``noise_multiplier``
    (:mod:`he_cnn.training.dp`'s clipping norm), what a DP-SGD step releases.
The report has per view the labels read, PSNR and SSIM per image and whether the digit is recognisable
(PSNR at or above :data:`~he_cnn.training.gradient_leakage.RECOGNISABLE_PSNR`); the PNG shows the
originals in the top row and each view's reconstruction below.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from he_cnn.crypto.paillier import generate_keypair
from he_cnn.parties.key_cloud import KeyCloud
from he_cnn.protocols import aggregate
from he_cnn.protocols.common import S1Context
from he_cnn.training import gradient_leakage as leak
from he_cnn.training.data import load_digits_dataset
from he_cnn.training.dp import DEFAULT_MAX_GRAD_NORM
from he_cnn.training.train import train_classifier
from he_cnn.training.zoo import build_model
from he_cnn.transport.channel import InProcessChannel

#: fixed point of a gradient sent as an update: 2^-24 resolution, |g| < 2^8
FRACTION_BITS, VALUE_BITS = 24, 32


def _as_gradient(values: np.ndarray, like: list[torch.Tensor]) -> list[torch.Tensor]:
    flat = torch.from_numpy(np.ldexp(np.asarray([float(v) for v in values], dtype=np.float64), -FRACTION_BITS))
    out, start = [], 0
    for t in like:
        out.append(flat[start:start + t.numel()].reshape(t.shape).float())
        start += t.numel()
    return out


def cloud_views(gradient: list[torch.Tensor], other: list[torch.Tensor], key_bits: int = 1024
                ) -> dict[str, list[torch.Tensor]]:
    """What S1 and S2 see when ``gradient`` and a second owner's ``other`` are aggregated, read as gradients."""
    keys, consortium = generate_keypair(key_bits), generate_keypair(key_bits)
    cloud = KeyCloud.create(keys, record=True)
    s1 = S1Context(keys.public, cloud.dgk_public, InProcessChannel(cloud.handle))
    updates = [np.rint(np.ldexp(torch.cat([t.reshape(-1) for t in g]).double().numpy(), FRACTION_BITS))
               .astype(np.int64).astype(object) for g in (gradient, other)]
    layout = aggregate.AggregationLayout(len(updates[0]), VALUE_BITS, (1, 1), key_bits)
    uploads = [aggregate.encrypt_update(keys.public, u, layout) for u in updates]
    aggregate.reencrypt_for_consortium(s1, aggregate.aggregate_updates(uploads, layout), layout, consortium.public)
    mask = (1 << layout.slot) - 1
    read_as_packs = [(int(c) >> (layout.slot * j)) & mask for c in uploads[0].data for j in range(layout.per_pack)]
    shift = layout.total * layout.offset
    s1_view = np.array([v - shift for v in read_as_packs[:layout.count]], dtype=object)
    s2_view = np.array([v - shift for v in cloud.observations[0].values[:layout.count]], dtype=object)
    return {"S1 ciphertexts": _as_gradient(s1_view, gradient), "S2 masked sum": _as_gradient(s2_view, gradient)}


def dp_noised(gradient: list[torch.Tensor], noise_multiplier: float, seed: int) -> list[torch.Tensor]:
    """One example's gradient clipped to DP-SGD's norm, plus Gaussian noise of multiplier x that norm."""
    norm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in gradient)))
    scale = min(1.0, DEFAULT_MAX_GRAD_NORM / max(norm, 1e-12))
    generator = torch.Generator().manual_seed(seed)
    return [g * scale + torch.randn(g.shape, generator=generator) * noise_multiplier * DEFAULT_MAX_GRAD_NORM
            for g in gradient]


def audit_gradient_leakage(batch_sizes: tuple[int, ...] = (1, 4), png: str | Path = "gradient-leakage.png",
                           warm_epochs: int = 3, seed: int = 0, steps: int = leak.STEPS, noise_multiplier: float = 1.0,
                           key_bits: int = 1024, note: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """The audit: for each batch size the plaintext attack; at batch 1 also the clouds' views and DP."""
    dataset = load_digits_dataset()
    model = build_model("icnn", dataset.x_train.shape[1:], len(dataset.classes))
    note(f"training the ICNN for {warm_epochs} epochs (the model whose gradient is shared)")
    train_classifier(model, dataset, warm_epochs, seed)
    report: dict[str, Any] = {"recognisable_psnr": leak.RECOGNISABLE_PSNR, "warm_epochs": warm_epochs, "batches": []}
    for b in batch_sizes:
        originals, labels = dataset.x_train[:b], dataset.y_train[:b]
        gradient = leak.plaintext_gradient(model, originals, labels)
        views = {"plaintext": gradient}
        if b == 1:
            other = leak.plaintext_gradient(model, dataset.x_train[1:2], dataset.y_train[1:2])
            views.update(cloud_views(gradient, other, key_bits))
            views[f"DP-noised (multiplier {noise_multiplier:g})"] = dp_noised(gradient, noise_multiplier, seed)
        attacks = []
        for view, g in views.items():
            note(f"batch {b}: attacking the {view} view")
            attacks.append(leak.attack(view, model, g, originals, seed=seed, steps=steps))
        path = Path(png)
        path = path.with_name(f"{path.stem}-batch{b}{path.suffix or '.png'}")
        leak.save_comparison(originals, attacks, path)
        report["batches"].append({"batch": b, "labels": labels.tolist(), "png": str(path),
                                  "attacks": [a.to_json() for a in attacks]})
    return report


def run_and_print(as_json: bool, note: Callable[[str], None], png: str = "gradient-leakage.png") -> None:
    """``he-cnn owner audit --gradient-leakage``: the audit, printed (one JSON object with ``as_json``)."""
    import json

    import click

    from he_cnn.console import run_step

    result = run_step(lambda: audit_gradient_leakage(png=png, note=note))
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(f"gradient leakage (DLG/iDLG) against the ICNN after {result['warm_epochs']} epochs; recognisable "
               f"at PSNR >= {result['recognisable_psnr']:g} dB (an all-black guess: ~8 dB)")
    for batch in result["batches"]:
        for a in batch["attacks"]:
            click.echo(f"batch {batch['batch']}  {a['view']:<26} labels {a['labels']} (true {batch['labels']})  "
                       f"PSNR {', '.join(f'{p:.1f}' for p in a['psnr'])} dB  SSIM "
                       f"{', '.join(f'{s:.2f}' for s in a['ssim'])}  {'RECOGNISABLE' if a['recognisable'] else 'nothing'}")
        click.echo(f"batch {batch['batch']}  images: {batch['png']}")
