"""S1's model store: encrypted models and their set-up state, kept atomically on disk (the upload itself is
checked where it is decoded, by :meth:`~he_cnn.parties.compute_cloud.EncryptedModel.deserialize`).

Layout of ``<data dir>/models/<model id>/``: ``model.hecn`` (the owner's upload, wire format, as
received), ``setup.hecn`` (S1's half of the set-up with S2: the set-up id and the weight masks B,
wire format) and ``model.json`` (id, key id, public summary; read back under the bounds of a wire
header). A model is written into a temporary directory that is renamed into place only when all three
files are complete, so after a crash a model is either fully there or absent; leftovers of interrupted
uploads are removed at start. A re-run set-up replaces ``setup.hecn`` atomically. Everything here is
public-key material and masks; S1 never holds a secret key.
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


from he_cnn.bounded_json import read_json_file
from he_cnn.errors import BadRequest, HECNNError, ShapeError, UnknownModel
from he_cnn.crypto.paillier import PublicKey
from he_cnn.protocols.linear import LinearSetup
from he_cnn.parties.compute_cloud import EncryptedModel, ModelSetup
from he_cnn.crypto.tensor import as_int_array
from he_cnn.wire import HEADER_LIMITS, Message, decode, encode

from .storage import DataDirError, atomic_write, ensure_private_dir, fsync_dir, stored_dirs

MODEL_FILE = "model.hecn"
SETUP_FILE = "setup.hecn"
INFO_FILE = "model.json"
SETUP_FORMAT = "he-cnn-s1-setup"
MODEL_ID = re.compile(r"^[0-9a-f]{16}$")

log = logging.getLogger("he_cnn.servers.models")


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


# -- the summary ----------------------------------------------------------------------------------

def read_info(path: Path, model_id: str, key_id: str) -> dict[str, Any]:
    """``model.json`` of the model ``model_id`` (under the key ``key_id``): what S1 says about the model.

    It summarises the upload's header, so the header's bounds apply (:data:`~he_cnn.wire.HEADER_LIMITS`).
    """
    info = read_json_file(path, HEADER_LIMITS, f"model summary {path}")
    if not isinstance(info, dict):
        raise BadRequest(f"model summary {path} is not a JSON object")
    if info.get("model_id") != model_id or info.get("key_id") != key_id or not isinstance(info.get("created"), str):
        raise BadRequest(f"model summary {path} does not describe model {model_id} under key {key_id} "
                         "(model_id, key_id and created are wrong or missing)")
    return info


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
        def valid(entry: Path) -> bool:
            return entry.is_dir() and bool(MODEL_ID.match(entry.name)) and (entry / INFO_FILE).is_file()
        for entry in stored_dirs(self.root, valid, "upload"):
            try:
                model = EncryptedModel.deserialize(public_key, (entry / MODEL_FILE).read_bytes())
                setup = decode_setup(model, (entry / SETUP_FILE).read_bytes())
                info = read_info(entry / INFO_FILE, entry.name, model.public_key.key_id)
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
            "privacy": model.graph.privacy.to_json(),  # the DP card, in the listing too
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
