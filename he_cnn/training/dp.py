"""Differentially private training (DP-SGD) with Opacus: the settings, the check, and the wrapping.

DP-SGD bounds what a trained model's outputs can reveal about any single training image: each step
draws a Poisson sample of the training set, clips every example's gradient to ``max_grad_norm`` and adds
Gaussian noise of that scale times a noise multiplier, which Opacus' ``make_private_with_epsilon``
chooses so that its accountant (PRV) certifies (ε, δ)-DP after the planned steps; the ε it reports at
the end is the guarantee the model's card (:class:`~he_cnn.graph.privacy.TrainingPrivacy`) declares.
Quantising or compiling the trained model afterwards is post-processing and keeps the guarantee.

Two things are refused or changed for the guarantee's sake. BatchNorm mixes the examples of a batch
(an example's output depends on the others), so per-example gradients do not exist: a model with it
(the zoo's ``resnet``) is refused with one line, before any training. GroupNorm, the usual replacement,
normalises each image by its own statistics at inference time, which is not a linear layer the
clouds can evaluate, so no replacement is offered. And the randomness of the private steps (Poisson
sampling, noise, augmentation) is drawn from a secret seed unless the caller fixes ``noise_seed``:
amplification by sampling and the noise both assume the adversary cannot regenerate them, which a
published training seed would allow. Tests and the benchmark fix it to be reproducible; the
command line never does. Opacus' ``secure_mode`` (a cryptographic generator) needs ``torchcsprng``,
of which pip finds no build for this Python and torch; ``docs/private-training.md`` says what that leaves.
"""
from __future__ import annotations

import math
import secrets
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from he_cnn.errors import BadRequest, UnsupportedLayer
from he_cnn.graph.privacy import MAX_EPSILON, TrainingPrivacy

#: δ unless the owner chooses one: below 1/n for every data set here (the digits' 1,347 training images)
DEFAULT_DELTA = 1e-5
#: the per-example gradient clipping norm unless the owner chooses one (Opacus' examples use 1.0)
DEFAULT_MAX_GRAD_NORM = 1.0
#: DP-SGD's expected batch (Poisson sampling rate = this / training images): larger batches average the
#: noise down; 128 trained the ICNN to 89.6 % at ε = 8 on the digits where 64 reached 75.6 %
BATCH_SIZE = 128
#: Opacus' warnings that say nothing to an owner: the PRNG note (this module's docstring explains the
#: choice) and torch's note that the first layer's input needs no gradient
_QUIET = ("Secure RNG turned off", "Optimal order is the largest alpha", "Full backward hook is firing")


@dataclass(frozen=True)
class DPSettings:
    """The owner's DP-SGD request: a target ``epsilon`` at ``delta``, with per-example gradients clipped to
    ``max_grad_norm``. ``noise_seed`` None draws the private randomness from a secret seed."""

    epsilon: float
    delta: float = DEFAULT_DELTA
    max_grad_norm: float = DEFAULT_MAX_GRAD_NORM
    noise_seed: int | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.epsilon, (int, float)) and 0 < self.epsilon <= MAX_EPSILON):
            raise BadRequest(f"the DP epsilon must lie in (0, {MAX_EPSILON:g}], got {self.epsilon!r}")
        if not (isinstance(self.delta, (int, float)) and 0 < self.delta < 1):
            raise BadRequest(f"the DP delta must lie strictly between 0 and 1, got {self.delta!r}")
        if not (isinstance(self.max_grad_norm, (int, float)) and 0 < self.max_grad_norm < math.inf):
            raise BadRequest(f"the gradient clipping norm must be a positive number, got {self.max_grad_norm!r}")


def check_trainable(model: nn.Module, arch: str = "the model") -> None:
    """:class:`UnsupportedLayer` in one line if DP-SGD cannot train ``model`` (BatchNorm, or any other
    module Opacus' validator refuses), naming the modules; nothing otherwise."""
    validator = _opacus().validators.ModuleValidator
    refused = [name for name, module in model.named_modules()
               if not any(module.children()) and validator.validate(module, strict=False)]
    if refused:
        kinds = sorted({type(model.get_submodule(name)).__name__ for name in refused})
        raise UnsupportedLayer(
            f"{arch} cannot be trained with differential privacy: DP-SGD needs per-example gradients, and its "
            f"{', '.join(kinds)} ({', '.join(refused[:4])}{', ...' if len(refused) > 4 else ''}) mixes the "
            "examples of a batch; train icnn or vgg with --dp-epsilon")


@dataclass
class PrivateRun:
    """A model, optimiser and sampler made private by Opacus; :meth:`finish` gives the guarantee spent."""

    module: nn.Module
    optimiser: torch.optim.Optimizer
    batches: Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]]
    steps_per_epoch: int
    settings: DPSettings
    engine: object  # opacus.PrivacyEngine, whose accountant counted the steps

    def finish(self) -> TrainingPrivacy:
        """Remove Opacus' hooks from the trained model; the accountant's (ε, δ), ε rounded up (never
        claiming more privacy than was certified)."""
        self.module.to_standard_module()  # type: ignore[operator]
        spent = self.engine.get_epsilon(self.settings.delta)  # type: ignore[attr-defined]
        return TrainingPrivacy(math.ceil(spent * 1000) / 1000, self.settings.delta)


def make_private(model: nn.Module, optimiser: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor,
                 epochs: int, settings: DPSettings) -> PrivateRun:
    """Wrap ``model`` and ``optimiser`` for DP-SGD over ``images``/``labels`` for ``epochs`` epochs, the
    noise chosen for the target (ε, δ); reseeds torch's generator from ``settings.noise_seed`` (or a secret
    one) so that sampling, augmentation and noise from here on come from it. Run it, the training and
    :meth:`PrivateRun.finish` inside :func:`silenced`."""
    check_trainable(model)
    if len(labels) * settings.delta >= 1:
        raise BadRequest(f"delta {settings.delta:g} is too large for {len(labels)} training images: a (ε, δ) "
                         "guarantee with δ >= 1/n allows leaking an image outright; use less than "
                         f"{1 / len(labels):.1g}")
    torch.manual_seed(secrets.randbits(63) if settings.noise_seed is None else settings.noise_seed)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels),
                                         batch_size=min(BATCH_SIZE, len(labels)))
    engine = _opacus().PrivacyEngine(accountant="prv")
    module, optimiser, loader = engine.make_private_with_epsilon(
        module=model, optimizer=optimiser, data_loader=loader, target_epsilon=settings.epsilon,
        target_delta=settings.delta, epochs=epochs, max_grad_norm=settings.max_grad_norm)

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # a Poisson sample can be empty (probability e^-128 at the default batch): that step releases nothing
        return ((x, y) for x, y in loader if len(y))

    return PrivateRun(module, optimiser, batches, len(loader), settings, engine)


def _opacus() -> Any:
    """The opacus package (imported only for DP training), or one line saying how to install it."""
    try:
        import opacus
        import opacus.validators
    except ImportError as e:
        raise BadRequest("training with --dp-epsilon needs opacus: pip install 'he-cnn[dp]'") from e
    return opacus


@contextmanager
def silenced() -> Iterator[None]:
    """Opacus' warnings that say nothing to an owner (:data:`_QUIET`) left out; the caller's filters restored."""
    with warnings.catch_warnings():
        for message in _QUIET:
            warnings.filterwarnings("ignore", message=f".*{message}.*")
        yield
