"""S1's model store: encrypted models and their set-up state, checked on upload, kept atomically on disk.

Layout of ``<data dir>/models/<model id>/``: ``model.hecn`` (the owner's upload, wire format, as
received), ``setup.hecn`` (S1's half of the set-up with S2: the set-up id and the weight masks B,
wire format) and ``model.json`` (id, key id, public summary). A model is written into a temporary
directory that is renamed into place only when all three files are complete, so after a crash a
model is either fully there or absent; leftovers of interrupted uploads are removed at start. A
re-run set-up replaces ``setup.hecn`` atomically. Everything here is public-key material and masks;
S1 never holds a secret key.
"""
from __future__ import annotations

import json
import logging
import re
import secrets
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from he_cnn.errors import BadRequest, HECNNError, ShapeError
from he_cnn.graph.integer_model import conv_output_hw
from he_cnn.crypto.paillier import PublicKey
from he_cnn.protocols.linear import LinearSetup
from he_cnn.parties.compute_cloud import LAYER_KINDS, EncryptedModel, ModelSetup
from he_cnn.crypto.tensor import as_int_array
from he_cnn.transport.wire import Message, decode, encode

from .storage import DataDirError, atomic_write, ensure_private_dir, fsync_dir

MODEL_FILE = "model.hecn"
SETUP_FILE = "setup.hecn"
INFO_FILE = "model.json"
SETUP_FORMAT = "he-cnn-s1-setup"
MODEL_ID = re.compile(r"^[0-9a-f]{16}$")
#: the largest input a model may declare (channels * height * width)
MAX_INPUT_ELEMENTS = 3 * 256 * 256
#: no tensor of a model that fits a Paillier plaintext can need more bits than this
MAX_VALUE_BITS = 4096

log = logging.getLogger("he_cnn.servers.models")


class UnknownModel(BadRequest):
    """No model with this id is stored."""

    code = "unknown_model"


@dataclass
class StoredModel:
    model_id: str
    model: EncryptedModel
    setup: ModelSetup
    info: dict[str, Any]
    #: serialises re-running the set-up when S2 has lost it
    setup_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def summary(self) -> dict[str, Any]:
        return dict(self.info)


# -- the public architecture, checked --------------------------------------------------------------

def _ints(value: Any, what: str, length: int | None = None, minimum: int = 1) -> list[int]:
    if not isinstance(value, list) or (length is not None and len(value) != length) or not all(
            type(v) is int and v >= minimum for v in value):
        size = f"{length} " if length is not None else ""
        raise BadRequest(f"model spec: {what} must be a list of {size}integers >= {minimum}, got {value!r:.80}")
    return value


def check_spec(model: EncryptedModel) -> None:
    """Check that the architecture is consistent, so a query can never trip over a malformed spec."""
    spec = model.spec
    try:
        input_shape = _ints(spec["input_shape"], "input_shape", 3)
        if int(np.prod(input_shape)) > MAX_INPUT_ELEMENTS:
            raise BadRequest(f"model spec: input of {input_shape} exceeds {MAX_INPUT_ELEMENTS} elements")
        if type(spec["input_max"]) is not int or spec["input_max"] < 1:
            raise BadRequest("model spec: input_max must be a positive integer")
        classes, num_classes = spec["classes"], spec["num_classes"]
        if type(num_classes) is not int or num_classes < 1 or not isinstance(classes, list) or len(classes) != num_classes \
                or not all(isinstance(c, str) for c in classes):
            raise BadRequest("model spec: classes must be a list of num_classes names")
        shapes, bits = spec["shapes"], spec["bits"]
        if not isinstance(shapes, dict) or not isinstance(bits, dict):
            raise BadRequest("model spec: shapes and bits must be objects")
        for name, shape in shapes.items():
            _ints(shape, f"shape of {name!r}")
            if type(bits.get(name)) is not int or not 0 <= bits[name] <= MAX_VALUE_BITS:
                raise BadRequest(f"model spec: tensor {name!r} lacks a bit length in 0..{MAX_VALUE_BITS}")
        defined = {spec["input_name"]}
        if shapes.get(spec["input_name"]) != input_shape or bits.get(spec["input_name"]) != spec["input_max"].bit_length():
            raise BadRequest("model spec: the input tensor's shape or bit length differs from input_shape, input_max")
        names = set()
        for entry in spec["layers"]:
            _check_layer(entry, defined, shapes, model)
            if entry["name"] in names:
                raise BadRequest(f"model spec: layer name {entry['name']!r} is used twice")
            names.add(entry["name"])
            defined.add(entry["output"])
        if spec["output"] not in defined or shapes[spec["output"]] != [num_classes]:
            raise BadRequest(f"model spec: output {spec['output']!r} is not a computed tensor of shape [{num_classes}]")
        if set(model.linear) != {e["name"] for e in spec["layers"] if e["kind"] in ("conv", "dense")}:
            raise BadRequest("model spec: encrypted layers and the architecture's linear layers differ")
    except (KeyError, TypeError, AttributeError) as e:
        raise BadRequest(f"model spec is malformed: missing or mistyped {e}") from e


def _check_layer(entry: Any, defined: set[str], shapes: dict, model: EncryptedModel) -> None:
    """One layer: known kind, reads computed tensors, and its output shape follows from its input."""
    if not isinstance(entry, dict) or entry.get("kind") not in LAYER_KINDS or not isinstance(entry.get("name"), str):
        raise BadRequest(f"model spec: malformed layer {entry!r:.120}")
    name, kind = entry["name"], entry["kind"]
    inputs = entry["inputs"] if kind == "concat" else [entry["input"]]
    if not isinstance(inputs, list) or not inputs or any(i not in defined for i in inputs):
        raise BadRequest(f"model spec: layer {name!r} reads a tensor not computed before it")
    if entry["output"] not in shapes or entry["output"] in defined:
        raise BadRequest(f"model spec: layer {name!r} writes an unknown or already computed tensor")
    in_shape = shapes[inputs[0]]
    if kind in ("conv", "dense"):
        layer = model.linear.get(name)
        bits = entry["weight_bits"]
        if layer is None or tuple(in_shape) != layer.geometry.in_shape:
            raise ShapeError(f"model spec: layer {name!r} input shape disagrees with its geometry")
        if type(bits) is not int or not 1 <= bits <= 64 or entry["channels"] != layer.weight.shape[1]:
            raise BadRequest(f"model spec: layer {name!r} needs weight_bits in 1..64 and channels matching its weights")
        expected = list(layer.out_shape)
    elif kind == "maxpool":
        k, s, p = entry["kernel"], entry["stride"], entry["padding"]
        if not all(type(v) is int for v in (k, s, p)) or not (k >= 1 and s >= 1 and 0 <= 2 * p <= k) \
                or len(in_shape) != 3 or min(in_shape[1:]) + 2 * p < k:
            raise BadRequest(f"model spec: pooling layer {name!r} has an invalid window for input {in_shape}")
        expected = [in_shape[0], *conv_output_hw(in_shape[1], in_shape[2], k, s, p)]
    elif kind == "concat":
        parts = [shapes[i] for i in inputs]
        if len(in_shape) != 3 or any(len(q) != 3 or q[1:] != in_shape[1:] for q in parts):
            raise ShapeError(f"model spec: concatenation {name!r} joins tensors of different heights or widths")
        expected = [sum(q[0] for q in parts), *in_shape[1:]]
    elif kind == "flatten":
        expected = [int(np.prod(in_shape))]
    else:  # relu
        expected = list(in_shape)
    if shapes[entry["output"]] != expected:
        raise ShapeError(f"model spec: layer {name!r} outputs shape {expected}, the spec says {shapes[entry['output']]}")


# -- set-up state ----------------------------------------------------------------------------------

def encode_setup(model_id: str, setup: ModelSetup) -> bytes:
    msg = Message(meta={"format": SETUP_FORMAT, "model_id": model_id, "setup_id": setup.setup_id, "layers": []})
    for i, (name, layer) in enumerate(setup.layers.items()):
        msg.meta["layers"].append(name)
        msg.arrays[f"m{i}"] = layer.masks
    return encode(msg)


def decode_setup(model: EncryptedModel, data: bytes) -> ModelSetup:
    """S1's set-up from disk; E(K + B) is recomputed from E(K) and the masks B."""
    msg = decode(data)
    if msg.meta.get("format") != SETUP_FORMAT:
        raise BadRequest(f"not an S1 set-up file (format {msg.meta.get('format')!r})")
    names = msg.get("layers", list)
    if set(names) != set(model.linear):
        raise BadRequest("set-up layers differ from the model's linear layers")
    layers = {}
    for i, name in enumerate(names):
        masks = as_int_array(msg.array(f"m{i}"))
        weight = model.linear[name].weight
        if masks.shape != weight.shape:
            raise ShapeError(f"set-up masks of layer {name} have shape {masks.shape}, expected {weight.shape}")
        layers[name] = LinearSetup(masks, weight.add(masks))
    return ModelSetup(msg.get("setup_id", str), layers)


# -- the store -------------------------------------------------------------------------------------

class ModelStore:
    """The models S1 serves, in memory and under ``<data dir>/models``."""

    def __init__(self, data_dir: Path):
        self.root = ensure_private_dir(Path(data_dir) / "models")
        self._models: dict[str, StoredModel] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._models)

    def load(self, public_key: PublicKey) -> int:
        """Load every complete model; remove interrupted uploads; a corrupt model stops the start."""
        for entry in sorted(self.root.iterdir()):
            if entry.name.startswith("."):
                log.info("removing %s, left over from an interrupted upload", entry)
                shutil.rmtree(entry, ignore_errors=True)
                continue
            if not (entry.is_dir() and MODEL_ID.match(entry.name) and (entry / INFO_FILE).is_file()):
                raise DataDirError(f"S1 data directory holds an unexpected entry {entry}; move it away")
            try:
                model = EncryptedModel.deserialize(public_key, (entry / MODEL_FILE).read_bytes())
                setup = decode_setup(model, (entry / SETUP_FILE).read_bytes())
                info = json.loads((entry / INFO_FILE).read_text())
            except (OSError, ValueError, ArithmeticError, HECNNError) as e:  # ArithmeticError: int() of an infinity
                raise DataDirError(f"stored model {entry} is corrupt or not under the cloud key ({e}); "
                                   "move it away and upload the model again") from e
            self._models[entry.name] = StoredModel(entry.name, model, setup, info)
        return len(self._models)

    def add(self, model_bytes: bytes, model: EncryptedModel, setup: ModelSetup) -> StoredModel:
        """Write the model and its set-up atomically, then serve it."""
        model_id = secrets.token_hex(8)
        info = {
            "model_id": model_id,
            "key_id": model.public_key.key_id,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "layers": len(model.spec["layers"]),
            "input_shape": list(model.input_shape),
            "input_max": model.spec["input_max"],
            "classes": list(model.spec["classes"]),
        }
        staging = self.root / f".upload-{model_id}"
        ensure_private_dir(staging)
        try:
            atomic_write(staging / MODEL_FILE, model_bytes)
            atomic_write(staging / SETUP_FILE, encode_setup(model_id, setup))
            atomic_write(staging / INFO_FILE, json.dumps(info, indent=1).encode())  # written last: the marker
            staging.rename(self.root / model_id)
            fsync_dir(self.root)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        stored = StoredModel(model_id, model, setup, info)
        with self._lock:
            self._models[model_id] = stored
        return stored

    def replace_setup(self, stored: StoredModel, setup: ModelSetup) -> None:
        atomic_write(self.root / stored.model_id / SETUP_FILE, encode_setup(stored.model_id, setup))
        stored.setup = setup

    def get(self, model_id: str) -> StoredModel:
        stored = self._models.get(model_id) if MODEL_ID.match(model_id) else None
        if stored is None:
            raise UnknownModel(f"no model with id {model_id[:40]!r}; GET /v1/models lists the models")
        return stored

    def all(self) -> list[StoredModel]:
        with self._lock:
            return sorted(self._models.values(), key=lambda m: m.info.get("created", ""))
