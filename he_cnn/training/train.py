"""Training a classifier (the ICNN or a model of :mod:`he_cnn.training.zoo`) in floating point, reproducibly.

The owner trains once, in the clear, before quantising or compiling it to an integer model. Training
is deterministic for a given seed: it runs on one CPU thread with torch's deterministic algorithms,
and draws initial weights and batch order from a forked random state, so it neither depends on nor
disturbs the caller's global torch state. Small networks overfit the 1347 training digits quickly, so
training images are shifted by up to one pixel at random; with Adam on a one-cycle schedule the
ICNN reaches 98-99% on the digits test split in well under ten seconds.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from he_cnn.training.data import Dataset
from he_cnn.training.zoo import architecture, build_model


@dataclass(frozen=True)
class TrainResult:
    """A trained model (in eval mode) and how it got there."""

    model: nn.Module
    float_test_accuracy: float
    float_train_accuracy: float
    epochs: int
    seconds: float
    epoch_losses: tuple[float, ...]


def train_icnn(
    dataset: Dataset, epochs: int = 15, seed: int = 0, lr: float = 1e-2, batch_size: int = 32, shift: bool = True
) -> TrainResult:
    """Train an :class:`~he_cnn.training.icnn.ICNN` on ``dataset``: :func:`train_classifier` of a new one."""
    model = build_model("icnn", dataset.x_train.shape[1:], len(dataset.classes))
    return train_classifier(model, dataset, epochs, seed, lr, batch_size, shift)


def train_architecture(arch: str, dataset: Dataset, seed: int = 0, epochs: int | None = None,
                       lr: float | None = None) -> TrainResult:
    """Train a new model of the zoo's ``arch`` on ``dataset``, with the zoo's epochs and learning rate
    for it unless ``epochs`` or ``lr`` are given."""
    plan = architecture(arch)
    model = build_model(arch, dataset.x_train.shape[1:], len(dataset.classes))
    return train_classifier(model, dataset, plan.epochs if epochs is None else epochs, seed,
                            plan.lr if lr is None else lr)


def train_classifier(
    model: nn.Module, dataset: Dataset, epochs: int = 15, seed: int = 0, lr: float = 1e-2, batch_size: int = 32,
    shift: bool = True,
) -> TrainResult:
    """Train ``model`` on ``dataset`` with Adam and cross-entropy; report float accuracies.

    Training starts from fresh weights drawn from ``seed``: every sub-module's ``reset_parameters``
    runs first (so the result does not depend on how or when ``model`` was built; parameters of a
    module without that method keep their values). ``model`` is trained in place, in train mode
    (batch norm learns its statistics), and left in eval mode. ``lr`` is the peak of the one-cycle
    schedule; ``shift`` turns the one-pixel augmentation on.
    """
    started = time.perf_counter()
    x_train = torch.from_numpy(dataset.x_train)
    y_train = torch.from_numpy(dataset.y_train)
    losses = []
    with _reproducible(seed):
        for module in model.modules():
            if callable(getattr(module, "reset_parameters", None)):
                module.reset_parameters()
        optimiser = torch.optim.Adam(model.parameters(), lr=lr)
        batches = -(-len(y_train) // batch_size)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=lr, total_steps=epochs * batches)
        loss_fn = nn.CrossEntropyLoss()
        for _ in range(epochs):
            model.train()
            total = 0.0
            for batch in torch.randperm(len(y_train)).split(batch_size):
                optimiser.zero_grad()
                images = random_shift(x_train[batch]) if shift else x_train[batch]
                loss = loss_fn(model(images), y_train[batch])
                loss.backward()
                optimiser.step()
                schedule.step()
                total += loss.item() * len(batch)
            losses.append(total / len(y_train))
        model.eval()
        test_accuracy = float(np.mean(predict_float(model, dataset.x_test) == dataset.y_test))
        train_accuracy = float(np.mean(predict_float(model, dataset.x_train) == dataset.y_train))
    return TrainResult(model, test_accuracy, train_accuracy, epochs, time.perf_counter() - started, tuple(losses))


def random_shift(images: torch.Tensor, pixels: int = 1) -> torch.Tensor:
    """Translate each ``(N, C, H, W)`` image by up to ``pixels`` in x and y, filling with zeros."""
    n, _, h, w = images.shape
    span = 2 * pixels + 1
    padded = nn.functional.pad(images, (pixels,) * 4)
    offsets = torch.randint(0, span * span, (n,))
    shifted = torch.empty_like(images)
    for offset in range(span * span):
        chosen = offsets == offset
        dy, dx = divmod(offset, span)
        shifted[chosen] = padded[chosen, :, dy : dy + h, dx : dx + w]
    return shifted


def float_logits(model: nn.Module, images: np.ndarray) -> np.ndarray:
    """Float logits ``(n, num_classes)`` for float32 images ``(n, C, H, W)`` (``model`` as it is: eval mode for use)."""
    with torch.no_grad():
        return model(torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))).numpy()


def predict_float(model: nn.Module, images: np.ndarray) -> np.ndarray:
    """Float model's predicted class per image."""
    return float_logits(model, images).argmax(axis=1)


@contextmanager
def _reproducible(seed: int) -> Iterator[None]:
    """Seeded, single-threaded, deterministic torch; the caller's settings are restored afterwards."""
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_num_threads(1)
        torch.use_deterministic_algorithms(True)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(deterministic)
            torch.set_num_threads(threads)
