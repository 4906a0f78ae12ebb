"""Training a classifier (the ICNN or a model of :mod:`he_cnn.training.zoo`) in floating point, reproducibly.

The owner trains once, in the clear, before quantising or compiling it to an integer model. Training
is deterministic for a given seed: it runs on one CPU thread with torch's deterministic algorithms,
and draws initial weights and batch order from a forked random state, so it neither depends on nor
disturbs the caller's global torch state. Small networks overfit the 1347 training digits quickly, so
training images are shifted by up to one pixel at random; with Adam on a one-cycle schedule the
ICNN reaches 98-99% on the digits test split in well under ten seconds. With
:class:`~he_cnn.training.dp.DPSettings` the same loop runs DP-SGD (:mod:`he_cnn.training.dp`): Poisson
batches, clipped per-example gradients and noise, and the accountant's (ε, δ) in the result. The zoo's
embedding network trains in the same loop as a classifier with the center loss
(:func:`train_embedding`, :mod:`he_cnn.training.embedding`).
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from he_cnn.errors import BadRequest
from he_cnn.graph.privacy import TrainingPrivacy
from he_cnn.training import dp
from he_cnn.training.data import Dataset
from he_cnn.training.embedding import GALLERY_PER_CLASS, CenterLossTrainer, gallery_indices, rank1_accuracy
from he_cnn.training.zoo import architecture, build_model


@dataclass(frozen=True)
class TrainResult:
    """A trained model (in eval mode) and how it got there. An embedding network's accuracies are rank-1
    identification accuracies (:func:`train_embedding`)."""

    model: nn.Module
    float_test_accuracy: float
    float_train_accuracy: float
    epochs: int
    seconds: float
    epoch_losses: tuple[float, ...]
    #: the guarantee DP-SGD's accountant certified (no DP when trained without it)
    privacy: TrainingPrivacy = TrainingPrivacy()


def train_icnn(
    dataset: Dataset, epochs: int = 15, seed: int = 0, lr: float = 1e-2, batch_size: int = 32, shift: bool = True
) -> TrainResult:
    """Train an :class:`~he_cnn.training.icnn.ICNN` on ``dataset``: :func:`train_classifier` of a new one."""
    model = build_model("icnn", dataset.x_train.shape[1:], len(dataset.classes))
    return train_classifier(model, dataset, epochs, seed, lr, batch_size, shift)


def train_architecture(arch: str, dataset: Dataset, seed: int = 0, epochs: int | None = None,
                       lr: float | None = None, privacy: dp.DPSettings | None = None) -> TrainResult:
    """Train a new model of the zoo's ``arch`` on ``dataset``, with the zoo's epochs and learning rate
    for it (its DP-SGD ones with ``privacy``) unless ``epochs`` or ``lr`` are given; an embedding network
    by :func:`train_embedding`."""
    plan = architecture(arch)
    if plan.features is not None:
        if privacy is not None:  # the centres enter the loss outside any layer's forward pass, unseen by Opacus
            raise BadRequest(f"{arch} is an embedding network, which DP-SGD cannot train here (Opacus computes "
                             "no per-example gradients for its center loss's centres); train icnn or vgg with "
                             "--dp-epsilon")
        return train_embedding(dataset, arch, seed, epochs, lr)
    model = build_model(arch, dataset.x_train.shape[1:], len(dataset.classes))
    if privacy is not None:
        dp.check_trainable(model, arch)
        return train_classifier(model, dataset, plan.dp_epochs if epochs is None else epochs, seed,
                                plan.dp_lr if lr is None else lr, dp.BATCH_SIZE, privacy=privacy)
    return train_classifier(model, dataset, plan.epochs if epochs is None else epochs, seed,
                            plan.lr if lr is None else lr)


def train_embedding(dataset: Dataset, arch: str = "embed", seed: int = 0, epochs: int | None = None,
                    lr: float | None = None) -> TrainResult:
    """Train a new embedding network of the zoo's ``arch`` on ``dataset``'s classes (the identities) as
    :class:`~he_cnn.training.embedding.CenterLossTrainer` says, with the zoo's epochs and learning rate
    unless given, then drop the head: the result's model is the network alone. Its accuracies are float
    rank-1 ones: the test split's images (and the training split's) against templates of the first
    :data:`~he_cnn.training.embedding.GALLERY_PER_CLASS` training images of each identity, all by their
    float features."""
    plan = architecture(arch)
    classes = len(dataset.classes)
    features = plan.outputs(classes)
    network = build_model(arch, dataset.x_train.shape[1:], features)
    trainer = CenterLossTrainer(network, features, classes)
    result = train_classifier(trainer, dataset, plan.epochs if epochs is None else epochs, seed,
                              plan.lr if lr is None else lr, objective=trainer.loss)
    gallery = gallery_indices(dataset.y_train, classes, GALLERY_PER_CLASS)
    templates = float_logits(network, dataset.x_train[gallery])

    def rank1(images: np.ndarray, labels: np.ndarray) -> float:
        return rank1_accuracy(templates, dataset.y_train[gallery], float_logits(network, images), labels)

    return dataclasses.replace(result, model=network, float_test_accuracy=rank1(dataset.x_test, dataset.y_test),
                               float_train_accuracy=rank1(dataset.x_train, dataset.y_train))


def train_classifier(
    model: nn.Module, dataset: Dataset, epochs: int = 15, seed: int = 0, lr: float = 1e-2, batch_size: int = 32,
    shift: bool = True, privacy: dp.DPSettings | None = None, initial_state: Mapping[str, torch.Tensor] | None = None,
    objective: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> TrainResult:
    """Train ``model`` on ``dataset`` with Adam and cross-entropy; report float accuracies.

    Training starts from fresh weights drawn from ``seed``: every sub-module's ``reset_parameters``
    runs first (so the result does not depend on how or when ``model`` was built; parameters of a
    module without that method keep their values). ``model`` is trained in place, in train mode
    (batch norm learns its statistics), and left in eval mode. ``lr`` is the peak of the one-cycle
    schedule; ``shift`` turns the one-pixel augmentation on. With ``privacy`` the steps are DP-SGD's
    (``batch_size`` is then the expected size of a Poisson batch, and the model is checked first:
    :func:`~he_cnn.training.dp.check_trainable`); the initial weights still come from ``seed``, the private
    randomness from ``privacy.noise_seed``. With ``initial_state`` (a federated round's average) training
    goes on from those weights instead of fresh ones; ``seed`` still orders the batches. ``objective``
    (images, labels) -> loss replaces the cross-entropy of ``model``'s outputs (an embedding's center
    loss; not with ``privacy``: :func:`train_architecture` says why).
    """
    started = time.perf_counter()
    x_train = torch.from_numpy(dataset.x_train)
    y_train = torch.from_numpy(dataset.y_train)
    losses = []
    with _reproducible(seed), (nullcontext() if privacy is None else dp.silenced()):
        for module in model.modules():
            if callable(getattr(module, "reset_parameters", None)):
                module.reset_parameters()
        if initial_state is not None:
            model.load_state_dict(initial_state)
        optimiser = torch.optim.Adam(model.parameters(), lr=lr)
        if privacy is None:
            trained, steps = model, -(-len(y_train) // batch_size)

            def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
                return ((x_train[b], y_train[b]) for b in torch.randperm(len(y_train)).split(batch_size))
        else:
            private = dp.make_private(model, optimiser, x_train, y_train, epochs, privacy)
            trained, optimiser = private.module, private.optimiser
            batches, steps = private.batches, private.steps_per_epoch
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=lr, total_steps=epochs * steps)
        loss_fn = nn.CrossEntropyLoss()
        for _ in range(epochs):
            trained.train()
            total = 0.0
            for images, labels in batches():
                optimiser.zero_grad()
                inputs = random_shift(images) if shift else images
                loss = loss_fn(trained(inputs), labels) if objective is None else objective(inputs, labels)
                loss.backward()
                optimiser.step()
                schedule.step()
                total += loss.item() * len(labels)
            losses.append(total / len(y_train))
        spent = TrainingPrivacy() if privacy is None else private.finish()
        model.eval()
        test_accuracy = float(np.mean(predict_float(model, dataset.x_test) == dataset.y_test))
        train_accuracy = float(np.mean(predict_float(model, dataset.x_train) == dataset.y_train))
    return TrainResult(model, test_accuracy, train_accuracy, epochs, time.perf_counter() - started, tuple(losses),
                       spent)


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
