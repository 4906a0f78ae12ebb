"""The owner's steps: train → quantise → score → encrypt → upload.

Training and quantisation are :mod:`he_cnn.training.train` and :mod:`he_cnn.training.quantize`; this module strings them
together for a data set (the embedded digits or an image folder), scores the float and the integer
model on the held-out split, encrypts every kernel and bias under the cloud key fetched from S1, and
posts the encrypted model with the owner token. :func:`cached_model` keeps trained models on disk,
keyed by the settings and the training code (the demo and the benchmark both use it). Nothing here
prints: callers pass a progress callback and decide what to show.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from he_cnn.errors import HECNNError
from he_cnn.files import atomic_write
from he_cnn.images import quantize_image
from he_cnn.training.data import Dataset, load_digits_dataset, load_image_folder
from he_cnn.graph.integer_model import IntegerModel
from he_cnn.training.icnn import ICNN
from he_cnn.transport.http_channel import CloudPublicKey, fetch_public_key, http_request
from he_cnn.graph.integer_model import load_integer_model, save_integer_model
from he_cnn.training.quantize import quantize_icnn
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
    #: the trained float ICNN (eval mode); None when only an integer model file was loaded
    float_model: ICNN | None = None


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
    return TrainedModel(model, dataset, result.float_test_accuracy, score_integer_model(model, dataset), result.model)


def load_model(path: str | Path, settings: TrainSettings) -> TrainedModel:
    """A saved integer model, scored on the data set of ``settings``."""
    model = load_integer_model(path)
    dataset = load_dataset(dataclasses.replace(settings, size=model.input_shape[1]))
    return TrainedModel(model, dataset, None, score_integer_model(model, dataset))


def cache_dir() -> Path:
    """``$HECNN_CACHE_DIR``, else ``$XDG_CACHE_HOME/he-cnn``, else ``~/.cache/he-cnn``."""
    if os.environ.get("HECNN_CACHE_DIR"):
        return Path(os.environ["HECNN_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "he-cnn"


def cached_model(settings: TrainSettings, folder: str | Path | None = None,
                 note: Callable[[str], None] = lambda message: None) -> TrainedModel:
    """The model trained with ``settings`` by this code: loaded from ``folder`` (default
    ``cache_dir() / "models"``) if it holds one, else trained now and kept there.

    An entry is three files named by :meth:`TrainSettings.cache_key`: the integer model (JSON), the
    float model's weights and the float accuracy. A missing, broken or unwritable entry only means
    training (again); ``note`` hears which way it went.
    """
    folder = cache_dir() / "models" if folder is None else Path(folder)
    key = settings.cache_key()
    model_file, weights_file, scores_file = folder / f"{key}.json", folder / f"{key}.pt", folder / f"{key}.scores.json"
    if model_file.is_file() and weights_file.is_file() and scores_file.is_file():
        try:
            trained = load_model(model_file, settings)
            float_model = ICNN(num_classes=len(trained.dataset.classes), image_size=trained.model.input_shape[1])
            float_model.load_state_dict(torch.load(weights_file, weights_only=True))
            float_model.eval()
            float_accuracy = float(json.loads(scores_file.read_text())["float_accuracy"])
            note(f"using the cached model {model_file}")
            return dataclasses.replace(trained, float_accuracy=float_accuracy, float_model=float_model)
        except (HECNNError, OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
            note(f"cached model unusable ({e}); training again")
    note(f"training the ICNN ({settings.epochs} epochs, seed {settings.seed})")
    trained = train_model(settings)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        weights = io.BytesIO()
        torch.save(trained.float_model.state_dict(), weights)
        atomic_write(weights_file, weights.getvalue())
        atomic_write(scores_file, json.dumps({"float_accuracy": trained.float_accuracy}).encode())
        save_integer_model(trained.model, model_file)
    except OSError as e:
        note(f"could not cache the model ({e})")
    return trained


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
