"""Galleries for encrypted 1:N identification: S1's store and endpoints, S2's seeds on disk.

A gallery belongs to one uploaded model (its embedding network) and holds templates only in the form
:mod:`he_cnn.protocols.identify` gives S1: packed ciphertexts and masks, never a template in the
clear; labels stay with the owner. The owner enrols in three steps, so that an interrupted
enrolment leaves no half gallery:

  ``POST /v1/galleries``                   owner token; wire {model_id, template_bits; threshold: E(theta)}
                                           -> 201 {gallery_id, ...}: a *pending* gallery, not listed
  ``POST /v1/galleries/<id>/chunks``       owner token; one chunk (:func:`~he_cnn.protocols.identify.encode_chunk`,
                                           bounded by the body limit) -> 202; kept on disk, not served yet
  ``POST /v1/galleries/<id>/commit``       owner token; relays the new chunks' seeds to S2 (one round), then
                                           publishes them at once -> 200 {gallery_id, count, chunks}
  ``GET  /v1/galleries``, ``GET /v1/galleries/<id>``   public shape: model, count, features, bit lengths
  ``POST /v1/galleries/<id>/identify``     user API key; wire {user_n, image} -> wire {answer: E_u(w)}
  ``POST /v1/galleries/<id>/verify``       the same with meta ``claimed`` (an index) -> match / no match

Appending to a committed gallery is the same chunks + commit on its id: only the new templates travel.
A query runs the search's offline phase (:func:`~he_cnn.protocols.identify.prepare_identify`) inline,
before its online part: exact, but at the seed's scale (5,947 x 1,024) that is minutes per query; a
background preparer as for models (and S2 tickets that outlive it: they expire after 600 s) is not built.
On disk, ``<data>/galleries/<id>/`` holds ``gallery.json`` (the public summary, and the number of
committed chunks: the marker), ``threshold.hecn`` and ``chunk-NNNNN.hecn``; a new gallery lives in
``.new-<id>/`` until its commit renames it into place; chunk files past the committed count (an
interrupted append) and ``.new-*`` directories are removed at start. S2 keeps each gallery's seeds in
``<data>/galleries/<sha256(id)>.hecn`` (0600), written before it acknowledges a set-up.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import secrets
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from flask import Blueprint, Flask, Response, current_app, jsonify

from he_cnn.bounded_json import read_json_file
from he_cnn.crypto.paillier import PublicKey
from he_cnn.crypto.tensor import EncryptedTensor
from he_cnn.errors import BadRequest, HECNNError, ServiceBusy, ShapeError, UnknownModel
from he_cnn.parties.compute_cloud import Finish
from he_cnn.parties.key_cloud import KeyCloud
from he_cnn.protocols.common import S1Context
from he_cnn.protocols import identify
from he_cnn.wire import HEADER_LIMITS, Message, decode, encode

from .http import request_body, require_bearer, wire_response
from .storage import DataDirError, atomic_write, ensure_private_dir, fsync_dir

GALLERY_ID = re.compile(r"^[0-9a-f]{16}$")
INFO_FILE = "gallery.json"
THRESHOLD_FILE = "threshold.hecn"
NEW_PREFIX = ".new-"
#: pending (uncommitted) new galleries S1 keeps at once
MAX_PENDING = 16
#: chunks one gallery may have
MAX_CHUNKS = 4096

log = logging.getLogger("he_cnn.servers.galleries")


def _chunk_file(i: int) -> str:
    return f"chunk-{i:05d}.hecn"


@dataclass
class StoredGallery:
    """A gallery S1 serves (``info`` is its public summary) and the chunks enrolled but not committed."""

    gallery: identify.EncryptedGallery
    info: dict[str, Any]
    folder: Path
    pending: list[identify.GalleryChunk] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def public(self) -> dict[str, Any]:
        return {**self.info, "count": self.gallery.count, "chunks": len(self.gallery.chunks)}


class GalleryStore:
    """S1's galleries, in memory and under ``<data dir>/galleries``."""

    def __init__(self, data_dir: Path):
        self.root = ensure_private_dir(Path(data_dir) / "galleries")
        self._galleries: dict[str, StoredGallery] = {}
        self._new: dict[str, StoredGallery] = {}
        self._lock = threading.Lock()

    def load(self, public_key: PublicKey) -> int:
        """Every committed gallery; what an interrupted enrolment left is removed."""
        for entry in sorted(self.root.iterdir()):
            if entry.name.startswith("."):
                log.info("removing %s, left over from an interrupted enrolment", entry)
                shutil.rmtree(entry, ignore_errors=True)
                continue
            if not (entry.is_dir() and GALLERY_ID.match(entry.name)):
                raise DataDirError(f"S1 gallery directory holds an unexpected entry {entry}; move it away")
            try:
                stored = self._read(entry, public_key)
            except (OSError, ValueError, ArithmeticError, HECNNError) as e:
                raise DataDirError(f"stored gallery {entry} is corrupt ({e}); move it away and enrol again") from e
            self._galleries[entry.name] = stored
        return len(self._galleries)

    @staticmethod
    def _read(folder: Path, public_key: PublicKey) -> StoredGallery:
        info = read_json_file(folder / INFO_FILE, HEADER_LIMITS, f"gallery summary {folder}")
        if not isinstance(info, dict) or info.get("gallery_id") != folder.name \
                or info.get("key_id") != public_key.key_id:
            raise BadRequest(f"gallery summary in {folder} does not describe gallery {folder.name} under this key")
        chunks = info.get("committed_chunks")
        if type(chunks) is not int or not 0 <= chunks <= MAX_CHUNKS:
            raise BadRequest("committed_chunks out of range")
        threshold = EncryptedTensor.deserialize(public_key, (folder / THRESHOLD_FILE).read_bytes())
        gallery = _gallery(info, threshold)
        for i in range(chunks):
            gallery.chunks.append(identify.decode_chunk(gallery, decode((folder / _chunk_file(i)).read_bytes())))
        for stray in folder.glob("chunk-*.hecn"):  # an append that was never committed
            if stray.name not in {_chunk_file(i) for i in range(chunks)}:
                stray.unlink()
        return StoredGallery(gallery, info, folder)

    def create(self, model_id: str, template_bits: int, features: int, embedding_bits: int,
               threshold: EncryptedTensor) -> StoredGallery:
        """A new pending gallery (not listed, not served) in its staging directory."""
        identify.check_gallery_shape(features, template_bits, embedding_bits, threshold.public_key.bits)
        gallery_id = secrets.token_hex(8)
        info = {"gallery_id": gallery_id, "key_id": threshold.public_key.key_id, "model_id": model_id,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "features": features,
                "template_bits": template_bits, "embedding_bits": embedding_bits,
                "group_size": identify.group_size(threshold.public_key.bits, embedding_bits, template_bits, features),
                "committed_chunks": 0}
        with self._lock:
            if len(self._new) >= MAX_PENDING:
                raise ServiceBusy(f"{MAX_PENDING} enrolments are pending; commit or wait for them")
            folder = ensure_private_dir(self.root / f"{NEW_PREFIX}{gallery_id}")
            atomic_write(folder / THRESHOLD_FILE, threshold.serialize())
            stored = StoredGallery(_gallery(info, threshold), info, folder)
            self._new[gallery_id] = stored
        return stored

    def get(self, gallery_id: str, pending: bool = False) -> StoredGallery:
        """A committed gallery (or, with ``pending``, also one still being enrolled)."""
        stored = None
        if GALLERY_ID.match(gallery_id):
            stored = self._galleries.get(gallery_id) or (self._new.get(gallery_id) if pending else None)
        if stored is None:
            raise UnknownModel(f"no gallery with id {gallery_id[:40]!r}; GET /v1/galleries lists the galleries")
        return stored

    def add_chunk(self, stored: StoredGallery, msg: Message) -> None:
        """Check one uploaded chunk and keep it on disk, uncommitted."""
        with stored.lock:
            if len(stored.gallery.chunks) + len(stored.pending) >= MAX_CHUNKS:
                raise BadRequest(f"a gallery holds at most {MAX_CHUNKS} chunks")
            view = identify.EncryptedGallery(stored.gallery.gallery_id, stored.gallery.features,
                                             stored.gallery.template_bits, stored.gallery.embedding_bits,
                                             stored.gallery.threshold, stored.gallery.chunks + stored.pending)
            chunk = identify.decode_chunk(view, msg)
            index = len(view.chunks)
            atomic_write(stored.folder / _chunk_file(index), encode(identify.encode_chunk(chunk)))
            stored.pending.append(chunk)

    def commit(self, stored: StoredGallery, setup: Callable[[identify.EncryptedGallery, int], None]) -> None:
        """``setup(gallery with the new chunks, first new chunk)`` with S2, then publish atomically."""
        with stored.lock:
            if not stored.pending:
                raise BadRequest("nothing to commit: upload chunks first")
            first = len(stored.gallery.chunks)
            grown = identify.EncryptedGallery(stored.gallery.gallery_id, stored.gallery.features,
                                              stored.gallery.template_bits, stored.gallery.embedding_bits,
                                              stored.gallery.threshold, stored.gallery.chunks + stored.pending)
            setup(grown, first)
            info = {**stored.info, "committed_chunks": len(grown.chunks)}
            atomic_write(stored.folder / INFO_FILE, json.dumps(info, indent=1).encode())  # the marker
            gallery_id = grown.gallery_id
            if stored.folder.name.startswith(NEW_PREFIX):
                final = self.root / gallery_id
                stored.folder.rename(final)
                fsync_dir(self.root)
                stored.folder = final
            stored.info, stored.gallery, stored.pending = info, grown, []
            with self._lock:
                self._new.pop(gallery_id, None)
                self._galleries[gallery_id] = stored

    def all(self) -> list[StoredGallery]:
        with self._lock:
            return sorted(self._galleries.values(), key=lambda g: g.info.get("created", ""))


def _gallery(info: dict[str, Any], threshold: EncryptedTensor) -> identify.EncryptedGallery:
    try:
        values = [info[k] for k in ("features", "template_bits", "embedding_bits")]
    except KeyError as e:
        raise BadRequest(f"gallery summary lacks {e}") from None
    if not all(type(v) is int for v in values) or threshold.shape != (1,):
        raise BadRequest("gallery summary holds a malformed shape or threshold")
    identify.check_gallery_shape(values[0], values[1], values[2], threshold.public_key.bits)
    return identify.EncryptedGallery(info["gallery_id"], *values, threshold)


# -- S2: the seeds ----------------------------------------------------------------------------------
S2_FORMAT = "he-cnn-s2-gallery"


def _s2_path(data_dir: Path, gallery_id: str) -> Path:
    return data_dir / "galleries" / (hashlib.sha256(gallery_id.encode()).hexdigest()[:32] + ".hecn")


def install_s2_galleries(cloud: KeyCloud, data_dir: Path) -> int:
    """Load S2's stored gallery seeds into ``cloud`` and persist every later set-up before S1 hears of it."""
    folder = ensure_private_dir(Path(data_dir) / "galleries")
    for path in sorted(folder.glob("*.hecn")):
        try:
            msg = decode(path.read_bytes())
            seeds = msg.array("seeds").reshape(-1)
            counts = msg.get("counts", list)
            if msg.meta.get("format") != S2_FORMAT or len(seeds) != len(counts) \
                    or not all(type(c) is int and c >= 1 for c in counts):
                raise BadRequest("not an S2 gallery file")
            chunks = tuple((c, int(s).to_bytes(identify.SEED_BYTES, "big")) for c, s in zip(counts, seeds))
            gallery = identify.S2Gallery(msg.get("features", int), msg.get("template_bits", int), chunks)
        except (OSError, ValueError, OverflowError, HECNNError) as e:
            raise DataDirError(f"S2 gallery file {path} is corrupt ({e}); move it away and enrol again") from e
        cloud.galleries[msg.get("gallery_id", str)] = gallery

    def on_gallery(gallery_id: str, gallery: identify.S2Gallery) -> None:
        msg = Message(meta={"format": S2_FORMAT, "gallery_id": gallery_id, "features": gallery.features,
                            "template_bits": gallery.template_bits, "counts": [c for c, _ in gallery.chunks]})
        msg.arrays["seeds"] = np.array([int.from_bytes(s, "big") for _, s in gallery.chunks], dtype=object)
        atomic_write(_s2_path(Path(data_dir), gallery_id), encode(msg))

    cloud.on_gallery = on_gallery
    return len(cloud.galleries)


# -- S1's endpoints ---------------------------------------------------------------------------------
bp = Blueprint("galleries", __name__, url_prefix="/v1")


def _store() -> GalleryStore:
    return current_app.extensions["he_cnn.s1.galleries"]


def _owner() -> None:
    require_bearer(current_app.extensions["he_cnn.s1.config"].owner_token, "owner token")


@bp.post("/galleries")
def create_gallery() -> Response:
    _owner()
    msg = decode(request_body())
    peer, models = current_app.extensions["he_cnn.s1.peer"], current_app.extensions["he_cnn.s1.models"]
    key = peer.public_key()[0].paillier
    if msg.meta.get("key_id") != key.key_id or "threshold" not in msg.widths:
        raise BadRequest(f"a gallery needs its threshold as one ciphertext under the cloud key {key.key_id}")
    stored_model = models.get(msg.get("model_id", str))
    graph = stored_model.model.graph
    features = int(np.prod(graph.shapes[graph.output]))
    threshold = EncryptedTensor.from_ciphertexts(key, msg.array("threshold").reshape(-1), (1,))
    stored = _store().create(stored_model.model_id, msg.get("template_bits", int), features,
                             stored_model.model.bound_bits(graph.output), threshold)
    response = jsonify(stored.public())
    response.status_code = 201
    return response


@bp.post("/galleries/<gallery_id>/chunks")
def upload_chunk(gallery_id: str) -> Response:
    _owner()
    store = _store()
    stored = store.get(gallery_id, pending=True)
    store.add_chunk(stored, decode(request_body()))
    response = jsonify({"gallery_id": gallery_id, "pending_chunks": len(stored.pending),
                        "pending_templates": sum(c.count for c in stored.pending)})
    response.status_code = 202
    return response


@bp.post("/galleries/<gallery_id>/commit")
def commit_gallery(gallery_id: str) -> Response:
    _owner()
    store, peer = _store(), current_app.extensions["he_cnn.s1.peer"]
    stored = store.get(gallery_id, pending=True)

    def setup(gallery: identify.EncryptedGallery, first: int) -> None:
        try:
            with peer.context() as ctx:
                identify.setup_gallery(ctx, gallery, first)
        except HECNNError as e:
            peer.raise_explained(e)

    store.commit(stored, setup)
    log.info("S1 committed gallery %s: %d templates in %d chunks", gallery_id, stored.gallery.count,
             len(stored.gallery.chunks))
    return jsonify(stored.public())


@bp.get("/galleries")
def list_galleries() -> Response:
    return jsonify({"galleries": [g.public() for g in _store().all()]})


@bp.get("/galleries/<gallery_id>")
def describe_gallery(gallery_id: str) -> Response:
    return jsonify(_store().get(gallery_id).public())


@bp.post("/galleries/<gallery_id>/identify")
def identify_image(gallery_id: str) -> Response:
    return _search(gallery_id, verify=False)


@bp.post("/galleries/<gallery_id>/verify")
def verify_image(gallery_id: str) -> Response:
    return _search(gallery_id, verify=True)


def _search(gallery_id: str, verify: bool) -> Response:
    hooks = current_app.extensions["he_cnn.s1.gallery_hooks"]
    with hooks.quota():  # 401 without a valid user key, 429 beyond its limits
        stored = _store().get(gallery_id)
        gallery = stored.gallery
        peer, models = current_app.extensions["he_cnn.s1.peer"], current_app.extensions["he_cnn.s1.models"]
        try:
            stored_model = models.get(stored.info["model_id"])
        except UnknownModel as e:
            raise UnknownModel(f"the model of gallery {gallery_id} is gone") from e
        msg = decode(request_body())
        claimed = msg.get("claimed", int) if verify else None
        if verify and not 0 <= claimed < gallery.count:
            raise ShapeError(f"index {claimed} is not in a gallery of {gallery.count} templates")
        key = peer.public_key()[0].paillier
        image, user_key = hooks.read_query(msg, stored_model.model, key, current_app.extensions["he_cnn.s1.user_keys"])

        def finish(ctx: S1Context) -> Finish:
            def search(embedding: EncryptedTensor, bits: int) -> EncryptedTensor:
                if bits != gallery.embedding_bits:
                    raise ShapeError(f"the model's embedding has {bits} bits, the gallery {gallery.embedding_bits}")
                prepared = identify.prepare_identify(ctx, gallery)
                if verify:
                    return identify.secure_verify(ctx, gallery, embedding.flatten(), claimed, prepared, user_key)
                return identify.secure_identify(ctx, gallery, embedding.flatten(), prepared, user_key)
            return ("verify" if verify else "identify", search)

        offline = current_app.extensions["he_cnn.s1.offline"]
        with current_app.extensions["he_cnn.s1.gate"].slot():
            taken = offline.take(stored_model)
            try:
                result = hooks.run(peer, models, stored_model, image, user_key, taken, finish)
            except HECNNError as e:
                peer.raise_explained(e)
            finally:
                offline.refill(stored_model)
    reply = Message(meta={"gallery_id": gallery_id, "count": gallery.count, "seconds": round(result.seconds, 4),
                          "rounds": result.rounds, "bytes_to_s2": sum(s.bytes_to_s2 for s in result.layers),
                          "bytes_to_s1": sum(s.bytes_to_s1 for s in result.layers),
                          "search_seconds": round(result.layers[-1].seconds, 4)})
    reply.arrays["answer"] = result.output.data
    reply.widths["answer"] = user_key.ciphertext_bytes
    return wire_response(encode(reply))


@dataclass(frozen=True)
class S1Hooks:
    """What the gallery endpoints borrow from S1's app (given by :func:`install`, no import cycle)."""

    quota: Callable[[], Any]
    read_query: Callable[..., tuple[EncryptedTensor, PublicKey]]
    run: Callable[..., Any]


def install(app: Flask, data_dir: Path, public_key: PublicKey | None, quota: Callable[[], Any],
            read_query: Callable[..., Any], run: Callable[..., Any]) -> None:
    """Register the gallery endpoints on S1's ``app`` and load its galleries."""
    store = GalleryStore(data_dir)
    if public_key is not None:
        loaded = store.load(public_key)
        log.info("S1 loaded %d galleries", loaded)
    elif any(not p.name.startswith(".") for p in store.root.iterdir()):
        raise DataDirError(f"S1 holds galleries in {store.root} but not the cloud key they are encrypted under")
    app.extensions["he_cnn.s1.galleries"] = store
    app.extensions["he_cnn.s1.gallery_hooks"] = S1Hooks(quota, read_query, run)
    app.register_blueprint(bp)
