"""The owner's steps: train → quantise (or compile) → score → encrypt → upload.

Training is :mod:`he_cnn.training.train` on an architecture of the zoo (:mod:`he_cnn.training.zoo`:
the patent's ICNN, the default, quantised by :mod:`he_cnn.training.quantize`; ``vgg``, ``resnet`` and
the embedding network ``embed``, compiled like any user's model by :mod:`he_cnn.compiler`). This
module strings the steps together for a data set (the embedded digits, MNIST, or an image folder),
scores the float and the integer model on the held-out split (a model whose outputs are not the data
set's classes, an embedding network, has no class accuracy: the owner's command line measures its
rank-1 identification accuracy instead), encrypts every kernel and bias under the cloud key fetched from S1, and
posts the encrypted model with the owner token. :func:`check_owner` asks S1 first (does it answer,
does it take the owner token, has it the cloud key?), so that a wrong token or a dead S1 is known in
a second, not after minutes of training and encrypting. :func:`cached_model` keeps trained models on disk,
keyed by the settings and the training code (the demo and the benchmark both use it). With a DP
epsilon in the settings the model is trained by DP-SGD (:mod:`he_cnn.training.dp`) and declares the
certified (ε, δ) in its public spec. Nothing here prints: callers pass a progress callback and decide
what to show.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from he_cnn.errors import HECNNError
from he_cnn.files import atomic_write
from he_cnn.training.data import Dataset, load_dataset as load_named_dataset
from he_cnn.graph.integer_model import IntegerModel
from he_cnn.transport.http_channel import OWNER_CHECK_PATH, CloudPublicKey, fetch_public_key, http_request
from he_cnn.graph.integer_model import load_integer_model, save_integer_model
from he_cnn.training.quantize import quantize_icnn
from he_cnn.graph.reference import predict_reference
from he_cnn.parties.compute_cloud import encrypt_model
from he_cnn.training.dp import DEFAULT_DELTA, DEFAULT_MAX_GRAD_NORM, DPSettings
from he_cnn.training.train import predict_float, train_architecture
from he_cnn.training.zoo import architecture, build_model

UPLOAD_TIMEOUT = 900.0
#: the modules whose code decides a trained integer model (a change in any retrains the cached ones)
CODE_THAT_TRAINS = ("he_cnn.images", "he_cnn.graph.layers", "he_cnn.graph.integer_model", "he_cnn.training.data",
                    "he_cnn.training.icnn", "he_cnn.training.quantize", "he_cnn.training.train", "he_cnn.training.zoo",
                    "he_cnn.training.embedding",
                    "he_cnn.compiler", "he_cnn.compiler.float_graph", "he_cnn.compiler.lower",
                    "he_cnn.compiler.onnx_import", "he_cnn.training.dp", "he_cnn.graph.privacy")
KEY_TIMEOUT = 30.0


@dataclass(frozen=True)
class TrainSettings:
    """Everything that determines the trained integer model (and so the demo's cache key). ``None``
    means the architecture's default: the ICNN sends pixels as 0..15 with 6-bit weights (the patent's
    model), the compiled zoo models 0..255 with 10-bit weights (with 8, BatchNorm-folded channels of
    small scale lose precision: the residual net agreed with its float model on 98.4 % of the digits'
    test split at 8 bits, 100 % at 10); sizes are 16 (digits, folders), 28 (MNIST). ``dp_epsilon``
    asks for DP-SGD (:class:`~he_cnn.training.dp.DPSettings`, with ``dp_delta``, ``max_grad_norm`` and
    ``dp_noise_seed``; without it those three are ignored)."""

    images: str | None = None  # an image folder (one sub-folder per class); None = ``data``
    size: int | None = None
    epochs: int | None = None  # None: the architecture's own (the ICNN 15)
    seed: int = 0
    input_max: int | None = None
    weight_bits: int | None = None
    arch: str = "icnn"
    data: str = "digits"  # "digits", "mnist" (``images`` overrides it)
    activation_bits: int = 12  # the compiled models' calibrated activation width
    dp_epsilon: float | None = None  # None: trained without differential privacy
    dp_delta: float | None = None  # None: DEFAULT_DELTA
    max_grad_norm: float | None = None  # None: DEFAULT_MAX_GRAD_NORM
    #: None (the command line's only choice): DP-SGD's randomness comes from a secret seed; tests and
    #: the benchmark fix it to be reproducible (:mod:`he_cnn.training.dp` says why a public one is void)
    dp_noise_seed: int | None = None

    def resolved(self) -> "TrainSettings":
        """The settings with every default filled in for the architecture and data set."""
        icnn = self.arch == "icnn"
        private = self.dp_epsilon is not None
        plan = architecture(self.arch)
        size = self.size or (28 if self.data == "mnist" and not self.images else 16)
        return dataclasses.replace(self, size=size,
                                   epochs=self.epochs or (plan.dp_epochs if private else (15 if icnn else None)),
                                   input_max=self.input_max or (15 if icnn else 255),
                                   weight_bits=self.weight_bits or (6 if icnn else 10),
                                   dp_delta=(self.dp_delta or DEFAULT_DELTA) if private else None,
                                   max_grad_norm=(self.max_grad_norm or DEFAULT_MAX_GRAD_NORM) if private else None,
                                   dp_noise_seed=self.dp_noise_seed if private else None)

    def privacy(self) -> DPSettings | None:
        """The DP-SGD request of these settings, or None."""
        resolved = self.resolved()
        if resolved.dp_epsilon is None:
            return None
        return DPSettings(resolved.dp_epsilon, resolved.dp_delta, resolved.max_grad_norm,  # type: ignore[arg-type]
                          resolved.dp_noise_seed)

    def cache_key(self) -> str:
        """A hash of the settings and of the code that trains and quantises (a code change retrains)."""
        digest = hashlib.sha256(json.dumps(dataclasses.asdict(self.resolved()), sort_keys=True).encode())
        for name in CODE_THAT_TRAINS:
            digest.update(Path(importlib.import_module(name).__file__ or "").read_bytes())
        return digest.hexdigest()[:24]


@dataclass(frozen=True)
class TrainedModel:
    model: IntegerModel
    dataset: Dataset | None  # None when a loaded model's input does not fit the data set
    #: None when the model was loaded, not trained; an embedding network's float rank-1 accuracy
    float_accuracy: float | None
    integer_accuracy: float | None  # None also when the model's outputs are not the data set's classes
    #: the trained float model (eval mode); None when only an integer model file was loaded
    float_model: torch.nn.Module | None = None
    #: the fraction of test images on which the integer model's class equals the float model's
    agreement: float | None = None
    #: seconds the float training took (None when the model was loaded)
    train_seconds: float | None = None


def load_dataset(settings: TrainSettings) -> Dataset:
    settings = settings.resolved()
    return load_named_dataset(settings.images or settings.data, size=settings.size, seed=settings.seed,
                              input_max=settings.input_max)


def integer_predictions(model: IntegerModel, dataset: Dataset) -> np.ndarray:
    """The integer model's class (exact reference) for every test image: the slow part of scoring."""
    return predict_reference(model, [model.preprocessing.quantize(x) for x in dataset.x_test])


def score_integer_model(model: IntegerModel, dataset: Dataset) -> float:
    return float(np.mean(integer_predictions(model, dataset) == dataset.y_test))


def train_model(settings: TrainSettings) -> TrainedModel:
    """Train the float model, quantise (ICNN) or compile (zoo) it, score both on the test split (a
    classifier; an embedding network only in float, :func:`~he_cnn.training.train.train_embedding`); class
    names (an embedding's feature indices) and the preprocessing go into ``meta``."""
    settings = settings.resolved()
    embedding = architecture(settings.arch).features is not None
    dataset = load_dataset(settings)
    privacy = settings.privacy()
    result = train_architecture(settings.arch, dataset, seed=settings.seed, epochs=settings.epochs, privacy=privacy)
    if settings.arch == "icnn":  # quantised from the weights alone: post-processing, the DP guarantee holds
        model = quantize_icnn(result.model, input_max=settings.input_max, weight_bits=settings.weight_bits)
        model = dataclasses.replace(model, meta={**model.meta, "classes": list(dataset.classes),
                                                 "preprocessing": dataset.preprocessing.to_json()})
    else:
        from he_cnn.compiler import compile_model  # onnx and the exporter only for compiled models

        # the calibration images choose the requantising shifts: drawn from the training images they would
        # be a release DP-SGD never accounted for, so a DP model calibrates on held-out images instead
        source = dataset.x_train if privacy is None else dataset.x_test
        calibration = source[np.random.default_rng(settings.seed).permutation(len(source))[:256]]
        model = compile_model(result.model, calibration, preprocessing=dataset.preprocessing,
                              weight_bits=settings.weight_bits, activation_bits=settings.activation_bits,
                              classes=None if embedding else dataset.classes).model
    model = dataclasses.replace(model, meta={**model.meta, "privacy": result.privacy.to_json()})
    if embedding:
        return TrainedModel(model, dataset, result.float_test_accuracy, None, result.model, None, result.seconds)
    predicted = integer_predictions(model, dataset)  # once, for the accuracy and the agreement
    return TrainedModel(model, dataset, result.float_test_accuracy, float(np.mean(predicted == dataset.y_test)),
                        result.model, float(np.mean(predicted == predict_float(result.model, dataset.x_test))),
                        result.seconds)


def load_model(path: str | Path, settings: TrainSettings) -> TrainedModel:
    """A saved integer model, scored as :func:`score_model` says."""
    return score_model(load_integer_model(path), settings)


def score_model(model: IntegerModel, settings: TrainSettings) -> TrainedModel:
    """An integer model, scored on the data set of ``settings`` when the model reads its images (same
    input shape and channels) and its outputs are the data set's classes; otherwise unscored (with the
    data set when the model reads its images: an embedding network)."""
    pre = model.preprocessing
    resolved = settings.resolved()
    if pre.channels != "grey" or pre.height != pre.width:
        return TrainedModel(model, None, None, None)
    dataset = load_dataset(dataclasses.replace(resolved, size=pre.height, input_max=model.input_max))
    if dataset.x_test.shape[1:] != model.input_shape:
        return TrainedModel(model, None, None, None)
    if model.num_classes != len(dataset.classes):
        return TrainedModel(model, dataset, None, None)
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
            float_model = build_model(settings.arch, trained.model.input_shape, trained.model.num_classes)
            float_model.load_state_dict(torch.load(weights_file, weights_only=True))
            float_model.eval()
            scores = json.loads(scores_file.read_text())
            note(f"using the cached model {model_file}")
            return dataclasses.replace(trained, float_accuracy=float(scores["float_accuracy"]), float_model=float_model,
                                       agreement=scores.get("agreement"))
        except (HECNNError, OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
            note(f"cached model unusable ({e}); training again")
    note(f"training {settings.arch} on {settings.images or settings.data} (seed {settings.seed})")
    trained = train_model(settings)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        weights = io.BytesIO()
        torch.save(trained.float_model.state_dict(), weights)
        atomic_write(weights_file, weights.getvalue())
        atomic_write(scores_file, json.dumps({"float_accuracy": trained.float_accuracy,
                                              "agreement": trained.agreement}).encode())
        save_integer_model(trained.model, model_file)
    except OSError as e:
        note(f"could not cache the model ({e})")
    return trained


class OwnerTokenRefused(HECNNError):
    """S1 does not take the owner token it was given (a client-side error: it never crosses HTTP)."""

    code = "owner_token_refused"


def _as_owner(s1_url: str, request: Callable[[], Any]) -> Any:
    """``request()``, with S1's 401 said as what the owner must do about it."""
    try:
        return request()
    except HECNNError as e:
        if getattr(e, "peer_status", None) != 401:
            raise
        said = getattr(e, "peer_message", str(e))
        raise OwnerTokenRefused(f"S1 at {s1_url.rstrip('/')} refused the owner token ({said}): pass the token S1 "
                                "was started with (--token or HECNN_OWNER_TOKEN)") from e


def check_owner(s1_url: str, owner_token: str, tls_ca: str | None = None) -> CloudPublicKey:
    """Before any expensive work: S1 answers, takes ``owner_token`` (a request with no effect), and
    relays the clouds' public key (which needs S2 once); that key. ``tls_ca``: the CA S1's HTTPS
    certificate must chain to (None: the system's)."""
    _as_owner(s1_url, lambda: http_request("GET", s1_url.rstrip("/") + OWNER_CHECK_PATH, "S1", KEY_TIMEOUT,
                                           token=owner_token, tls_ca=tls_ca))
    return fetch_cloud_key(s1_url, tls_ca)


def fetch_cloud_key(s1_url: str, tls_ca: str | None = None) -> CloudPublicKey:
    """The clouds' public key, as S1 relays it."""
    return fetch_public_key(s1_url, KEY_TIMEOUT, peer="S1", tls_ca=tls_ca)[0]


def encrypt_for_upload(model: IntegerModel, key: CloudPublicKey,
                       progress: Callable[[int], None] | None = None) -> bytes:
    """E(K) and E(b) of every layer plus the public architecture, as upload bytes."""
    return encrypt_model(model, key.paillier, progress).serialize()


def count_ciphertexts(model: IntegerModel) -> int:
    return sum(layer.weight.size + layer.bias.size for layer in model.linear_layers())


def upload(s1_url: str, owner_token: str, body: bytes, tls_ca: str | None = None) -> dict[str, Any]:
    """POST the encrypted model to S1; S1 runs the set-up with S2 and answers with the model's summary."""
    response = _as_owner(s1_url, lambda: http_request("POST", s1_url.rstrip("/") + "/v1/models", "S1", UPLOAD_TIMEOUT,
                                                      token=owner_token, data=body, tls_ca=tls_ca))
    return response.json()
