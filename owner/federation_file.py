"""The owner file of a federated session: what one data owner needs to take part from its own machine.

``he-cnn owner federate create`` (the coordinator, who holds S1's owner token) creates the session at S1
and writes one file per owner, ``owner-<k>.json`` (k = 0 .. K-1), mode 0600 and atomically, into a
folder of mode 0700. Each file holds S1's URL, the session id, that owner's index and its token (and
no other owner's), the id of the cloud key S1 served at creation (a joining owner refuses another
key), the session's public parameters (the training settings, every owner's weight, the architecture,
the input shape and the class names, which fix the model and so the update's size) and the
consortium's key pair. The consortium key is in every owner's file on purpose: the owners decrypt the
sum with it, and one file per owner is one secret to hand over (it is secret anyway, for its token);
S1 and S2 only ever see its public half. ``he-cnn owner federate join`` reads the file back
(:func:`read_owner_file`): bounded before it is parsed, every field checked, every failure one
:class:`~he_cnn.errors.BadRequest`. The dataclass's ``repr`` shows neither the token nor the key.
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from he_cnn.bounded_json import JSONLimits, read_json_file
from he_cnn.crypto.paillier import MAX_USER_KEY_BITS, MIN_KEY_BITS, KeyPair, keypair_from_primes
from he_cnn.errors import BadRequest, HECNNError
from he_cnn.files import atomic_write
from he_cnn.protocols.aggregate import MAX_OWNERS
from he_cnn.training.federated import FederatedSettings
from he_cnn.training.zoo import ARCHITECTURES

FORMAT = "he-cnn-federation-owner"
VERSION = 1
#: a file holds a few dozen fields, K weights and the class names; its key numbers are a few KB
OWNER_FILE_LIMITS = JSONLimits(max_bytes=256 << 10, max_items=MAX_OWNERS + 2048, max_depth=4)
MAX_CLASSES = 1000
TOKEN = re.compile(r"[A-Za-z0-9_-]{16,128}")
SESSION_ID = re.compile(r"[0-9a-f]{16}")
KEY_ID = re.compile(r"[0-9a-f]{16}")
URL = re.compile(r"https?://[^\s]{1,2000}")


@dataclass(frozen=True)
class OwnerFile:
    """One owner's view of a session: where and who it is, the session's public parameters, the consortium key."""

    s1_url: str
    session_id: str
    owner: int
    token: str = field(repr=False)
    cloud_key_id: str
    settings: FederatedSettings
    weights: tuple[int, ...]
    arch: str
    input_shape: tuple[int, ...]
    classes: tuple[str, ...]
    consortium: KeyPair = field(repr=False)

    def to_json(self) -> dict[str, Any]:
        """The file's content: the token and the consortium's secret key included, on purpose."""
        keys = self.consortium
        return {"format": FORMAT, "version": VERSION, "s1_url": self.s1_url, "session_id": self.session_id,
                "owner": self.owner, "token": self.token, "cloud_key_id": self.cloud_key_id,
                "settings": dataclasses.asdict(self.settings), "weights": list(self.weights), "arch": self.arch,
                "input_shape": list(self.input_shape), "classes": list(self.classes),
                "consortium": {"n": int(keys.public.n), "p": int(keys.private.p), "q": int(keys.private.q)}}


def owner_path(folder: Path, k: int) -> Path:
    return folder / f"owner-{k}.json"


def prepare_folder(folder: Path, owners: int) -> None:
    """Make ``folder`` (0700) ready for the owner files, refusing one that already holds any: checked
    before the session is created, so that a session never exists whose tokens could not be written."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    taken = [p for p in (owner_path(folder, k) for k in range(owners)) if p.exists()]
    if taken:
        raise BadRequest(f"{taken[0]} already exists; write the owner files of a new session to another folder")


def write_owner_files(folder: Path, template: OwnerFile, tokens: Sequence[str]) -> list[Path]:
    """One file per owner from ``template`` (its ``owner`` and ``token`` replaced), each 0600, atomically."""
    paths = []
    for k, token in enumerate(tokens):
        path = owner_path(folder, k)
        atomic_write(path, json.dumps(dataclasses.replace(template, owner=k, token=token).to_json()).encode(), 0o600)
        paths.append(path)
    return paths


def read_owner_file(path: Path) -> OwnerFile:
    """The owner file at ``path``, every field checked; :class:`BadRequest` naming the file otherwise."""
    what = f"owner file {path}"
    try:
        doc = read_json_file(path, OWNER_FILE_LIMITS, what)
    except FileNotFoundError as e:
        raise BadRequest(f"{what} does not exist; the session's coordinator writes it with: he-cnn owner "
                         "federate create") from e
    except OSError as e:
        raise BadRequest(f"{what} is not readable: {e.strerror or e}") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise BadRequest(f"{path} is not a he-cnn federation owner file")
    if doc.get("version") != VERSION:
        raise BadRequest(f"{what} has version {str(doc.get('version'))[:40]!r}; expected {VERSION}")
    try:
        return _parse(doc)
    except (KeyError, TypeError, ValueError, ArithmeticError, HECNNError) as e:  # ArithmeticError: no inverse
        raise BadRequest(f"{what} is corrupt: {str(e)[:200]}") from e


def _text(doc: dict[str, Any], name: str, pattern: re.Pattern[str]) -> str:
    value = doc[name]
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise ValueError(f"{name} is not what a session writes")
    return value


def _settings(value: Any) -> FederatedSettings:
    fields = {f.name: f for f in dataclasses.fields(FederatedSettings)}
    if not isinstance(value, dict) or set(value) != set(fields):
        raise ValueError(f"settings must name exactly {sorted(fields)}")
    for name, item in value.items():
        if type(item) is not type(fields[name].default):
            raise ValueError(f"setting {name} must be a {type(fields[name].default).__name__}")
    return FederatedSettings(**value)


def _parse(doc: dict[str, Any]) -> OwnerFile:
    settings = _settings(doc["settings"])
    weights, owner = doc["weights"], doc["owner"]
    if not (isinstance(weights, list) and len(weights) == settings.owners
            and all(type(w) is int and 1 <= w < 1 << 32 for w in weights)):
        raise ValueError(f"weights must be {settings.owners} positive integers below 2^32")
    if type(owner) is not int or not 0 <= owner < settings.owners:
        raise ValueError(f"owner must be an index below {settings.owners}")
    arch, shape, classes = doc["arch"], doc["input_shape"], doc["classes"]
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {str(arch)[:40]!r}")
    if not (isinstance(shape, list) and len(shape) == 3 and all(type(v) is int and 1 <= v <= 256 for v in shape)):
        raise ValueError("input_shape must be three integers (channels, height, width) of at most 256")
    if not (isinstance(classes, list) and 2 <= len(classes) <= MAX_CLASSES
            and all(isinstance(c, str) and 0 < len(c) <= 200 for c in classes) and len(set(classes)) == len(classes)):
        raise ValueError(f"classes must be 2 to {MAX_CLASSES} distinct names")
    key = doc["consortium"]
    if not isinstance(key, dict) or not all(type(key.get(v)) is int and 1 < key[v] < 1 << MAX_USER_KEY_BITS
                                            for v in ("n", "p", "q")):
        raise ValueError(f"the consortium key needs integers n, p and q of at most {MAX_USER_KEY_BITS} bits")
    consortium = keypair_from_primes(key["p"], key["q"])
    if consortium.public.n != key["n"] or consortium.public.bits < MIN_KEY_BITS:
        raise ValueError(f"the consortium key's n must equal p * q and have at least {MIN_KEY_BITS} bits")
    return OwnerFile(_text(doc, "s1_url", URL), _text(doc, "session_id", SESSION_ID), owner,
                     _text(doc, "token", TOKEN), _text(doc, "cloud_key_id", KEY_ID), settings, tuple(weights), arch,
                     tuple(shape), tuple(classes), consortium)
