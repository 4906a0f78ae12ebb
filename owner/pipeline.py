"""The owner's steps: train → quantise → score → encrypt → upload.

Training and quantisation are :mod:`he_cnn.train` and :mod:`he_cnn.quantize`; this module strings them
together for a data set (the embedded digits or an image folder), scores the float and the integer
model on the held-out split, encrypts every kernel and bias under the cloud key fetched from S1, and
posts the encrypted model with the owner token. Nothing here prints: callers pass a progress callback
and decide what to show.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from he_cnn.training.data import Dataset, load_digits_dataset, load_image_folder, quantize_image
from he_cnn.graph.integer_model import IntegerModel
from he_cnn.transport.http_channel import CloudPublicKey, fetch_public_key, http_request
from he_cnn.training.quantize import load_integer_model, quantize_icnn
from he_cnn.graph.reference import integer_accuracy
from he_cnn.parties.compute_cloud import encrypt_model
from he_cnn.training.train import train_icnn

UPLOAD_TIMEOUT = 900.0
KEY_TIMEOUT = 30.0


@dataclass(frozen=True)
class TrainSettings:
    """Everything that determines the trained integer model (and so the demo's cache key)."""

    images: str | None = None  # an image folder (one sub-folder per class); None = embedded digits
    size: int = 16
    epochs: int = 15
    seed: int = 0
    input_max: int = 15
    weight_bits: int = 6

    def cache_key(self) -> str:
        """A hash of the settings and of the code that trains and quantises (a code change retrains)."""
        from he_cnn.graph import integer_model
        from he_cnn.training import data, icnn, quantize, train

        digest = hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode())
        for module in (data, integer_model, icnn, quantize, train):
            digest.update(Path(module.__file__ or "").read_bytes())
        return digest.hexdigest()[:24]


@dataclass(frozen=True)
class TrainedModel:
    model: IntegerModel
    dataset: Dataset
    float_accuracy: float | None  # None when the model was loaded, not trained
    integer_accuracy: float


def load_dataset(settings: TrainSettings) -> Dataset:
    if settings.images:
        return load_image_folder(settings.images, size=settings.size, seed=settings.seed)
    return load_digits_dataset(size=settings.size, seed=settings.seed)


def score_integer_model(model: IntegerModel, dataset: Dataset) -> float:
    images = [quantize_image(x, model.input_max) for x in dataset.x_test]
    return integer_accuracy(model, images, dataset.y_test)


def train_model(settings: TrainSettings) -> TrainedModel:
    """Train the float ICNN, quantise it, score both on the test split; class names go into ``meta``."""
    dataset = load_dataset(settings)
    result = train_icnn(dataset, epochs=settings.epochs, seed=settings.seed)
    model = quantize_icnn(result.model, input_max=settings.input_max, weight_bits=settings.weight_bits)
    model = dataclasses.replace(model, meta={**model.meta, "classes": list(dataset.classes)})
    return TrainedModel(model, dataset, result.float_test_accuracy, score_integer_model(model, dataset))


def load_model(path: str | Path, settings: TrainSettings) -> TrainedModel:
    """A saved integer model, scored on the data set of ``settings``."""
    model = load_integer_model(path)
    dataset = load_dataset(dataclasses.replace(settings, size=model.input_shape[1]))
    return TrainedModel(model, dataset, None, score_integer_model(model, dataset))


def fetch_cloud_key(s1_url: str) -> CloudPublicKey:
    """The clouds' public key, as S1 relays it."""
    return fetch_public_key(s1_url, KEY_TIMEOUT, peer="S1")[0]


def encrypt_for_upload(model: IntegerModel, key: CloudPublicKey,
                       progress: Callable[[int], None] | None = None) -> bytes:
    """E(K) and E(b) of every layer plus the public architecture, as upload bytes."""
    return encrypt_model(model, key.paillier, progress).serialize()


def count_ciphertexts(model: IntegerModel) -> int:
    return sum(layer.weight.size + layer.bias.size for layer in model.linear_layers())


def upload(s1_url: str, owner_token: str, body: bytes) -> dict[str, Any]:
    """POST the encrypted model to S1; S1 runs the set-up with S2 and answers with the model's summary."""
    response = http_request("POST", s1_url.rstrip("/") + "/v1/models", "S1", UPLOAD_TIMEOUT,
                            token=owner_token, data=body)
    return response.json()
