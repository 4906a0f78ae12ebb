"""Gradient leakage: what DLG and iDLG reconstruct from one training gradient (ref. 003, Zhu et al. 2019).

Why federated updates travel encrypted: a plaintext gradient of a batch is enough to redraw its images.
The attacker knows the model and the gradient g = dL/dtheta of a batch (x, y):
  1. labels (iDLG): the dense output layer's bias gradient is mean(softmax - onehot), negative exactly at
     the batch's labels when its inputs are non-negative (the ICNN's ReLU output), and most negative for
     the most frequent ones (:func:`recover_labels`; exact at batch 1);
  2. images (DLG, with the cosine distance and total-variation prior of Geiping et al. 2020, which work
     on ReLU networks where DLG's L2 and L-BFGS stall): dummy images x' = sigmoid(z) from a seeded
     start; Adam on z minimises 1 - cos(dL(x', y')/dtheta, g) + tv * TV(x') (:func:`reconstruct`).
Scores: PSNR (dB, images in [0, 1]) and SSIM (7 x 7 windows) against the originals
(:func:`psnr`, :func:`ssim`). On the digits an all-black guess scores about 8 dB and noise about 6.5 dB;
:data:`RECOGNISABLE_PSNR` is the documented threshold of a recognisable reconstruction.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.ndimage import uniform_filter
from torch import nn

from he_cnn.errors import BadRequest

#: a reconstruction at or above this PSNR (dB) shows the digit (an all-black guess scores ~8 dB)
RECOGNISABLE_PSNR = 14.0
#: the attack's defaults: Adam steps, learning rate, total-variation weight
STEPS = 600
LR = 0.05
TV_WEIGHT = 0.02


def plaintext_gradient(model: nn.Module, images: np.ndarray, labels: np.ndarray) -> list[torch.Tensor]:
    """The cross-entropy gradient of ``model``'s parameters on one batch: what an owner would share."""
    loss = nn.functional.cross_entropy(model(torch.from_numpy(images)), torch.from_numpy(labels))
    return [t.detach() for t in torch.autograd.grad(loss, list(model.parameters()))]


def recover_labels(gradient: list[torch.Tensor], batch: int) -> np.ndarray:
    """iDLG: the ``batch`` labels read off the last layer's bias gradient (negative entries, most negative
    first, repeated in proportion to their weight when the batch has fewer distinct labels)."""
    bias = gradient[-1].double()
    if bias.ndim != 1:
        raise BadRequest("the last parameter must be the output layer's bias")
    order = [int(i) for i in torch.argsort(bias) if bias[i] < 0] or [int(torch.argmin(bias))]
    weights = np.array([-float(bias[i]) for i in order])
    counts = np.maximum(1, np.floor(weights / weights.sum() * batch + 0.5)).astype(int)
    labels = [c for c, n in zip(order, counts) for _ in range(n)]
    return np.array((labels * batch)[:batch], dtype=np.int64)


def reconstruct(model: nn.Module, gradient: list[torch.Tensor], labels: np.ndarray, shape: tuple[int, ...],
                steps: int = STEPS, lr: float = LR, tv: float = TV_WEIGHT, seed: int = 0) -> np.ndarray:
    """DLG: images (len(labels), *shape) in [0, 1] whose gradient points the way of ``gradient``."""
    params = list(model.parameters())
    target = [g.to(p.dtype) for g, p in zip(gradient, params)]
    target_norm = torch.sqrt(sum((g * g).sum() for g in target))
    if not torch.isfinite(target_norm) or target_norm == 0:
        raise BadRequest("the gradient to attack is zero or not finite")
    generator = torch.Generator().manual_seed(seed)
    z = (torch.randn((len(labels), *shape), generator=generator) * 0.5 - 1.0).requires_grad_(True)
    optimiser = torch.optim.Adam([z], lr=lr)
    y = torch.from_numpy(labels)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is fastest, and the same on every machine
    try:
        for _ in range(steps):
            optimiser.zero_grad()
            x = torch.sigmoid(z)
            dummy = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), params, create_graph=True)
            dot = sum((a * b).sum() for a, b in zip(dummy, target))
            norm = torch.sqrt(sum((a * a).sum() for a in dummy)) + 1e-12
            variation = (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()
            (1 - dot / (norm * target_norm) + tv * variation).backward()
            optimiser.step()
    finally:
        torch.set_num_threads(threads)
    return torch.sigmoid(z).detach().numpy()


def psnr(original: np.ndarray, reconstruction: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of images in [0, 1]."""
    mse = float(np.mean((np.asarray(original, np.float64) - np.asarray(reconstruction, np.float64)) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(1 / mse))


def ssim(original: np.ndarray, reconstruction: np.ndarray, window: int = 7) -> float:
    """Mean structural similarity of two grey images in [0, 1] (uniform ``window`` x ``window`` windows)."""
    a, b = np.asarray(original, np.float64).squeeze(), np.asarray(reconstruction, np.float64).squeeze()
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    mu_a, mu_b = uniform_filter(a, window), uniform_filter(b, window)
    var_a = uniform_filter(a * a, window) - mu_a ** 2
    var_b = uniform_filter(b * b, window) - mu_b ** 2
    cov = uniform_filter(a * b, window) - mu_a * mu_b
    return float(np.mean((2 * mu_a * mu_b + c1) * (2 * cov + c2) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))))


@dataclass(frozen=True)
class Attack:
    """One attack on one view of a batch's gradient: the labels it read and the images it drew."""

    view: str
    labels: np.ndarray
    images: np.ndarray
    psnr: tuple[float, ...]
    ssim: tuple[float, ...]

    @property
    def recognisable(self) -> bool:
        return max(self.psnr) >= RECOGNISABLE_PSNR

    def to_json(self) -> dict:
        return {"view": self.view, "labels": self.labels.tolist(), "psnr": list(self.psnr), "ssim": list(self.ssim),
                "recognisable": self.recognisable}


def attack(view: str, model: nn.Module, gradient: list[torch.Tensor], originals: np.ndarray, seed: int = 0,
           steps: int = STEPS) -> Attack:
    """iDLG's labels, then DLG's images, scored against ``originals`` (best-matching order not searched:
    the batch order of the recovered labels is the attacker's guess)."""
    labels = recover_labels(gradient, len(originals))
    images = reconstruct(model, gradient, labels, originals.shape[1:], steps=steps, seed=seed)
    return Attack(view, labels, images, tuple(psnr(o, r) for o, r in zip(originals, images)),
                  tuple(ssim(o, r) for o, r in zip(originals, images)))


def save_comparison(originals: np.ndarray, attacks: list[Attack], path: str | Path, scale: int = 8) -> None:
    """A PNG: the originals in the first row, each attack's reconstruction below, one image per column."""
    from PIL import Image

    rows = [originals] + [a.images for a in attacks]
    h, w = originals.shape[-2:]
    sheet = np.ones(((h + 2) * len(rows), (w + 2) * len(originals)))
    for r, images in enumerate(rows):
        for c, image in enumerate(images):
            sheet[r * (h + 2):r * (h + 2) + h, c * (w + 2):c * (w + 2) + w] = np.clip(image.squeeze(), 0, 1)
    picture = Image.fromarray((sheet * 255).astype(np.uint8))
    picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST).save(path)
