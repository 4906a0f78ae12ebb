"""``he-cnn owner audit``: the membership-inference audit of a zoo model, on the owner's machine, in the clear.

The audited model is the integer model users query (a saved file, or the one the settings train), and
the attacks (:mod:`he_cnn.training.audit`) see what a user decrypts: its exact class vector (the plaintext
reference), divided by the output's scale so that it reads as logits. Members are the training split
of the settings' data set (same data, size and seed as the training), non-members its held-out split.
LiRA's shadow models follow the settings' recipe (architecture, epochs, DP-SGD at the same ε and δ) as
float models: quantising each shadow too would cost a compilation per shadow for a difference the
integer/float agreement (about 99 % of classes) shows to be small. Nothing here prints.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from he_cnn.errors import BadRequest
from he_cnn.graph.integer_model import IntegerModel
from he_cnn.graph.reference import classify_reference
from he_cnn.training.audit import AuditReport, audit
from he_cnn.training.data import Dataset
from he_cnn.training.quantize import tensor_scale
from he_cnn.training.train import float_logits, train_architecture

from .pipeline import TrainSettings, cached_model, load_dataset

#: LiRA's shadow models unless the owner asks for another number (each is one training run)
DEFAULT_SHADOWS = 8


def integer_logits(model: IntegerModel, images: np.ndarray) -> np.ndarray:
    """The class vectors a user would decrypt for float ``images`` (n, C, H, W), as float logits (divided by
    the output tensor's scale, which the owner's model file records)."""
    try:
        scale = float(tensor_scale(model, model.output))
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
        raise BadRequest("the model file records no scale for its output, so its class vectors cannot be read "
                         "as logits; audit a model from he-cnn owner train") from e
    vectors = [classify_reference(model, model.preprocessing.quantize(x)) for x in images]
    return np.array([[float(v) for v in vector] for vector in vectors]) / scale


def _with_declared_privacy(settings: TrainSettings, model: IntegerModel) -> TrainSettings:
    """``settings`` with the model's declared (ε, δ) when it declares DP and the settings ask for none: the
    shadows must be trained the way the model was."""
    card = model.privacy
    if card.dp and settings.dp_epsilon is None:
        return dataclasses.replace(settings, dp_epsilon=card.epsilon, dp_delta=card.delta)
    return settings


def audit_model(settings: TrainSettings, model: IntegerModel | None = None, shadows: int = DEFAULT_SHADOWS,
                note: Callable[[str], None] = lambda message: None) -> tuple[AuditReport, IntegerModel]:
    """Audit ``model`` (None: the model ``settings`` train, from the cache when it is there) with the loss
    attack and LiRA over ``shadows`` shadow models; the report and the model audited."""
    settings = (settings if model is None else _with_declared_privacy(settings, model)).resolved()
    if model is None:
        model = cached_model(settings, note=note).model
    pre = model.preprocessing
    dataset = load_dataset(dataclasses.replace(settings, size=pre.height, input_max=model.input_max))
    if dataset.x_train.shape[1:] != model.input_shape:
        raise BadRequest(f"the model reads {list(model.input_shape)} images; the data set "
                         f"{settings.images or settings.data!r} gives {list(dataset.x_train.shape[1:])}")
    if model.num_classes != len(dataset.classes):
        raise BadRequest(f"the attacks read the model's outputs as scores of the data set's {len(dataset.classes)} "
                         f"classes; this model has {model.num_classes} outputs (an embedding network?)")
    pool = np.concatenate([dataset.x_train, dataset.x_test])
    labels = np.concatenate([dataset.y_train, dataset.y_test])
    is_member = np.arange(len(labels)) < len(dataset.y_train)
    note(f"scoring {len(labels)} images with the integer model (what a user decrypts)")
    target = integer_logits(model, pool)
    privacy = settings.privacy()
    trained = 0

    def shadow_logits(mask: np.ndarray) -> np.ndarray:
        nonlocal trained
        trained += 1
        part = Dataset(pool[mask], labels[mask], pool[~mask], labels[~mask], dataset.classes, dataset.size,
                       dataset.preprocessing)
        # shadows are never published: a fixed noise seed keeps the audit reproducible
        recipe = None if privacy is None else dataclasses.replace(privacy, noise_seed=settings.seed + trained)
        result = train_architecture(settings.arch, part, seed=settings.seed + trained, epochs=settings.epochs,
                                    privacy=recipe)
        return float_logits(result.model, pool)

    if shadows:
        note(f"training {shadows} shadow models ({settings.arch}, {settings.epochs or 'default'} epochs"
             f"{'' if privacy is None else f', DP-SGD at ε = {privacy.epsilon:g}'}) on random halves of the pool")
    report = audit(target, labels, is_member, shadow_logits, shadows, seed=settings.seed,
                   progress=lambda done: note(f"shadow {done}/{shadows} trained"))
    return report, model
