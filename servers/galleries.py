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

  ``DELETE /v1/galleries/<id>/chunks``     owner token; drops the chunks uploaded but not committed
  ``DELETE /v1/galleries/<id>``            owner token; a pending gallery, or a committed one at S1 and at S2

Appending to a committed gallery is the same chunks + commit on its id: only the new templates travel
(``he-cnn owner enrol --gallery`` first drops what an interrupted append left uncommitted; chunks or a new
gallery left idle for ``PENDING_SECONDS`` are dropped by the next upload or creation).

The search's offline phase (:func:`~he_cnn.protocols.identify.prepare_identify`) prepares k_q queries
at once (13 at 2048 bits for the seed's gallery). :class:`GalleryPreparer` keeps one batch per gallery
ready in the background, as :class:`~servers.s1.OfflinePhase` does for models: after a commit, at start
and whenever a gallery's batch runs out. A query that finds none prepares a batch itself, uses one and
leaves the rest for the next ones (a verify too: a preparation for its one group would tell S2 which
identity it claims). S2 keeps prepared masks for
:data:`~he_cnn.protocols.identify.PREPARED_SECONDS`; if it lost them or the seeds (a restart, a
restored data directory) S1 prepares again, relaying the seeds first if needed, once per query.
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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
from flask import Blueprint, Flask, Response, current_app, jsonify

from he_cnn.bounded_json import read_json_file
from he_cnn.crypto.paillier import PublicKey
from he_cnn.crypto.tensor import EncryptedTensor
from he_cnn.errors import (BadRequest, EnrolmentExpired, HECNNError, ServiceBusy, ShapeError, UnknownGallery,
                           UnknownModel, UnknownPrepared)
from he_cnn.parties.compute_cloud import Finish
from he_cnn.parties.key_cloud import KeyCloud
from he_cnn.protocols.common import S1Context
from he_cnn.protocols import identify
from he_cnn.wire import HEADER_LIMITS, Message, decode, encode

from .http import request_body, require_owner, wire_response
from .storage import DataDirError, atomic_write, ensure_private_dir, fsync_dir, stored_dirs

GALLERY_ID = re.compile(r"^[0-9a-f]{16}$")
INFO_FILE = "gallery.json"
THRESHOLD_FILE = "threshold.hecn"
NEW_PREFIX = ".new-"
#: pending (uncommitted) new galleries S1 keeps at once
MAX_PENDING = 16
#: chunks one gallery may have
MAX_CHUNKS = 4096
#: idle seconds after which a pending gallery, or chunks uploaded to a gallery but not committed, are dropped
PENDING_SECONDS = 3600.0
#: galleries whose prepared searches S1 keeps (the most recently searched)
MAX_READY = 32

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
    #: time.monotonic() of the last upload (pending work idle longer than PENDING_SECONDS is dropped)
    touched: float = field(default_factory=time.monotonic)
    deleted: bool = False

    def with_pending(self) -> identify.EncryptedGallery:
        return replace(self.gallery, chunks=self.gallery.chunks + self.pending)

    def drop_pending(self) -> int:
        """Forget the uncommitted chunks (their files too); the caller holds ``lock``."""
        for i in range(len(self.gallery.chunks), len(self.gallery.chunks) + len(self.pending)):
            (self.folder / _chunk_file(i)).unlink(missing_ok=True)
        dropped, self.pending = len(self.pending), []
        return dropped

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
        for entry in stored_dirs(self.root, lambda e: e.is_dir() and bool(GALLERY_ID.match(e.name)), "enrolment"):
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
        self._expire_new()
        with self._lock:
            if len(self._new) >= MAX_PENDING:
                raise ServiceBusy(f"{MAX_PENDING} enrolments are pending; commit or wait for them")
            folder = ensure_private_dir(self.root / f"{NEW_PREFIX}{gallery_id}")
            atomic_write(folder / THRESHOLD_FILE, threshold.serialize())
            stored = StoredGallery(_gallery(info, threshold), info, folder)
            self._new[gallery_id] = stored
        return stored

    def _expire_new(self) -> None:
        """Drop the new galleries nobody uploaded to for PENDING_SECONDS (an owner that gave up)."""
        now = time.monotonic()
        with self._lock:
            idle = [g for g in self._new.values() if now - g.touched > PENDING_SECONDS]
        for stored in idle:
            if self.delete(stored, only_if_idle=True):
                log.info("dropped gallery %s: its enrolment was left idle", stored.gallery.gallery_id)

    def delete(self, stored: StoredGallery, only_if_idle: bool = False) -> bool:
        """Remove a gallery from S1 (memory and disk); S2's part is the caller's. With ``only_if_idle``,
        only a pending gallery still idle for PENDING_SECONDS. Whether this call removed it."""
        with stored.lock:
            if stored.deleted or only_if_idle and (stored.gallery.gallery_id not in self._new
                                                   or time.monotonic() - stored.touched <= PENDING_SECONDS):
                return False
            stored.deleted = True
            with self._lock:
                self._new.pop(stored.gallery.gallery_id, None)
                self._galleries.pop(stored.gallery.gallery_id, None)
            doomed = stored.folder.with_name(f"{NEW_PREFIX}deleted-{stored.folder.name.removeprefix(NEW_PREFIX)}")
            stored.folder.rename(doomed)  # atomic: a crash from here on leaves a dot-directory, removed at start
            fsync_dir(self.root)
            shutil.rmtree(doomed, ignore_errors=True)
        return True

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
            if stored.deleted:
                raise UnknownModel(f"gallery {stored.gallery.gallery_id} was deleted")
            if stored.pending and time.monotonic() - stored.touched > PENDING_SECONDS:
                dropped = stored.drop_pending()
                raise EnrolmentExpired(f"the {dropped} chunks uploaded before were dropped after "
                                       f"{PENDING_SECONDS:.0f} s without an upload: enrol them again")
            if len(stored.gallery.chunks) + len(stored.pending) >= MAX_CHUNKS:
                raise BadRequest(f"a gallery holds at most {MAX_CHUNKS} chunks")
            view = stored.with_pending()
            chunk = identify.decode_chunk(view, msg)
            atomic_write(stored.folder / _chunk_file(len(view.chunks)), encode(msg))
            stored.pending.append(chunk)
            stored.touched = time.monotonic()

    def commit(self, stored: StoredGallery, setup: Callable[[identify.EncryptedGallery, int], None]) -> None:
        """``setup(gallery with the new chunks, first new chunk)`` with S2, then publish atomically."""
        with stored.lock:
            if stored.deleted:
                raise UnknownModel(f"gallery {stored.gallery.gallery_id} was deleted")
            if not stored.pending:
                raise BadRequest("nothing to commit: upload chunks first")
            first = len(stored.gallery.chunks)
            grown = stored.with_pending()
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
            tags = msg.meta.get("tags", [])  # absent in files written before tags: S1 then relays the seeds again
            if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags) \
                    or len(tags) not in (0, len(chunks)):
                raise BadRequest("malformed chunk tags")
            gallery = identify.S2Gallery(msg.get("features", int), msg.get("template_bits", int), chunks, tuple(tags))
        except (OSError, ValueError, OverflowError, HECNNError) as e:
            raise DataDirError(f"S2 gallery file {path} is corrupt ({e}); move it away and enrol again") from e
        cloud.galleries[msg.get("gallery_id", str)] = gallery

    def on_gallery(gallery_id: str, gallery: identify.S2Gallery | None) -> None:
        if gallery is None:
            _s2_path(Path(data_dir), gallery_id).unlink(missing_ok=True)
            fsync_dir(folder)
            return
        msg = Message(meta={"format": S2_FORMAT, "gallery_id": gallery_id, "features": gallery.features,
                            "template_bits": gallery.template_bits, "counts": [c for c, _ in gallery.chunks],
                            "tags": list(gallery.tags)})
        msg.arrays["seeds"] = np.array([int.from_bytes(s, "big") for _, s in gallery.chunks], dtype=object)
        atomic_write(_s2_path(Path(data_dir), gallery_id), encode(msg))

    cloud.on_gallery = on_gallery
    return len(cloud.galleries)


# -- S1: the offline phase in the background ---------------------------------------------------------
class GalleryPreparer:
    """Per gallery, prepared queries (:class:`~he_cnn.protocols.identify.PreparedIdentify`) for the
    gallery as it is now, refilled by one background thread a batch at a time.

    Each prepared query is used once (its mask would otherwise repeat); one prepared before an append
    does not cover the new templates and is dropped. Batches are kept for the :data:`MAX_READY`
    galleries searched last (k_q x G ciphertexts each: 1.4 MB at the seed's scale)."""

    def __init__(self, peer: Any, enabled: bool):
        self._peer = peer
        self._ready: dict[str, list[identify.PreparedIdentify]] = {}  # least recently used first
        self._pending: set[str] = set()
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="s1-gallery-offline") if enabled else None

    def _current(self, stored: StoredGallery) -> list[identify.PreparedIdentify]:
        """The gallery's ready queries that cover it as it is now (the caller holds the lock)."""
        whole = tuple(range(stored.gallery.groups))
        ready = [p for p in self._ready.pop(stored.gallery.gallery_id, []) if p.groups == whole and not p.used]
        if ready:
            self._ready[stored.gallery.gallery_id] = ready  # now the most recently used
        return ready

    def take(self, stored: StoredGallery) -> identify.PreparedIdentify | None:
        with self._lock:
            ready = self._current(stored)
            return ready.pop() if ready else None

    def add(self, stored: StoredGallery, batch: list[identify.PreparedIdentify]) -> bool:
        """Keep ``batch`` if it covers the gallery as it is now and the gallery is not deleted (whether kept)."""
        whole = tuple(range(stored.gallery.groups))
        fresh = [p for p in batch if p.groups == whole and not p.used]
        with self._lock:
            if stored.deleted or not fresh:
                return False
            self._ready[stored.gallery.gallery_id] = self._current(stored) + fresh  # the most recently used
            while len(self._ready) > MAX_READY:
                del self._ready[next(iter(self._ready))]
        return True

    def drop(self, gallery_id: str) -> None:
        with self._lock:
            self._ready.pop(gallery_id, None)

    def ready_count(self, gallery_id: str | None = None) -> int:
        """Prepared queries of one gallery, or of all."""
        with self._lock:
            return sum(len(v) for k, v in self._ready.items() if gallery_id in (None, k))

    def refill(self, stored: StoredGallery) -> None:
        """Prepare a batch in the background if the gallery has none ready for it as it is now."""
        gallery_id = stored.gallery.gallery_id
        with self._lock:
            if self._executor is None or stored.deleted or self._current(stored) or gallery_id in self._pending:
                return
            self._pending.add(gallery_id)
        self._executor.submit(self._prepare, stored)

    def _prepare(self, stored: StoredGallery) -> None:
        gallery_id, stale = stored.gallery.gallery_id, False
        try:
            with self._peer.context() as ctx:
                batch = prepare(ctx, stored, stored.gallery)
            stale = not self.add(stored, batch) and not stored.deleted
        except Exception:  # a query then prepares for itself; nothing is lost
            if not self._closing.is_set():
                log.exception("offline phase for gallery %s failed", gallery_id)
        finally:
            with self._lock:
                self._pending.discard(gallery_id)
        if stale:  # an append during the preparation made it useless: prepare for the gallery as it is now
            self.refill(stored)

    def shutdown(self) -> None:
        self._closing.set()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)


def prepare(ctx: S1Context, stored: StoredGallery, gallery: identify.EncryptedGallery
            ) -> list[identify.PreparedIdentify]:
    """A batch of prepared queries for ``gallery`` (a snapshot of ``stored``); if S2 lost the gallery's
    seeds, they are relayed again first (from S1's copy of E(sigma)), once."""
    try:
        return identify.prepare_identify(ctx, gallery)
    except UnknownGallery as e:
        log.warning("S2 does not hold gallery %s (%s); relaying its seeds again", gallery.gallery_id, e)
    with stored.lock:  # not during a commit's own set-up; the whole committed gallery, not the snapshot
        if stored.deleted:
            raise UnknownModel(f"gallery {gallery.gallery_id} was deleted")
        identify.setup_gallery(ctx, stored.gallery, 0)
    return identify.prepare_identify(ctx, gallery)


# -- S1's endpoints ---------------------------------------------------------------------------------
bp = Blueprint("galleries", __name__, url_prefix="/v1")


def _store() -> GalleryStore:
    return current_app.extensions["he_cnn.s1.galleries"]


@bp.post("/galleries")
def create_gallery() -> Response:
    require_owner()
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
    require_owner()
    store = _store()
    stored = store.get(gallery_id, pending=True)
    store.add_chunk(stored, decode(request_body()))
    response = jsonify({"gallery_id": gallery_id, "pending_chunks": len(stored.pending),
                        "pending_templates": sum(c.count for c in stored.pending)})
    response.status_code = 202
    return response


@bp.post("/galleries/<gallery_id>/commit")
def commit_gallery(gallery_id: str) -> Response:
    require_owner()
    store, peer = _store(), current_app.extensions["he_cnn.s1.peer"]
    stored = store.get(gallery_id, pending=True)

    def setup(gallery: identify.EncryptedGallery, first: int) -> None:
        try:
            with peer.context() as ctx:
                identify.setup_gallery(ctx, gallery, first)
        except HECNNError as e:
            peer.raise_explained(e)

    store.commit(stored, setup)
    preparer = current_app.extensions["he_cnn.s1.gallery_preparer"]
    preparer.drop(gallery_id)  # what was prepared covers the gallery before this append
    preparer.refill(stored)
    log.info("S1 committed gallery %s: %d templates in %d chunks", gallery_id, stored.gallery.count,
             len(stored.gallery.chunks))
    return jsonify(stored.public())


@bp.delete("/galleries/<gallery_id>/chunks")
def drop_chunks(gallery_id: str) -> Response:
    require_owner()
    stored = _store().get(gallery_id, pending=True)
    with stored.lock:
        dropped = stored.drop_pending()
    return jsonify({"gallery_id": gallery_id, "dropped_chunks": dropped})


@bp.delete("/galleries/<gallery_id>")
def delete_gallery(gallery_id: str) -> Response:
    """A pending gallery is dropped at S1; a committed one at S1, then S2 forgets its seeds. If S2 is
    unreachable the gallery is gone from S1 all the same and the call says so (``s2``: false): S2's
    seeds alone decrypt nothing, and a later DELETE of the same id asks S2 again."""
    require_owner()
    store, peer = _store(), current_app.extensions["he_cnn.s1.peer"]
    try:
        stored: StoredGallery | None = store.get(gallery_id, pending=True)
    except UnknownModel:
        if not GALLERY_ID.match(gallery_id):
            raise
        stored = None  # perhaps deleted at S1 while S2 was away: S2 is asked below
    if stored is not None:
        store.delete(stored)
        current_app.extensions["he_cnn.s1.gallery_preparer"].drop(gallery_id)
        log.info("S1 deleted gallery %s", gallery_id)
    try:
        with peer.context() as ctx:
            at_s2: bool | None = identify.drop_gallery(ctx, gallery_id)
    except HECNNError as e:
        if stored is None:
            peer.raise_explained(e)
        log.warning("S2 did not drop gallery %s: %s", gallery_id, e)
        at_s2 = None
    if stored is None and not at_s2:
        raise UnknownModel(f"no gallery with id {gallery_id!r} at S1 or S2")
    return jsonify({"gallery_id": gallery_id, "deleted": True, "s2_dropped": at_s2})


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
        if verify:
            gallery.group_of(msg.get("claimed", int))  # a claimed index out of range: 400 before any work
        key = peer.public_key()[0].paillier
        image, user_key = hooks.read_query(msg, stored_model.model, key, current_app.extensions["he_cnn.s1.user_keys"])

        preparer: GalleryPreparer = current_app.extensions["he_cnn.s1.gallery_preparer"]

        def finish(ctx: S1Context) -> Finish:
            def prepared_query() -> identify.PreparedIdentify:
                first, *rest = prepare(ctx, stored, gallery)
                preparer.add(stored, rest)
                return first

            def search(embedding: EncryptedTensor, bits: int) -> EncryptedTensor:
                if bits != gallery.embedding_bits:
                    raise ShapeError(f"the model's embedding has {bits} bits, the gallery {gallery.embedding_bits}")
                x = embedding.flatten()

                def answer(prepared: identify.PreparedIdentify) -> EncryptedTensor:
                    if verify:
                        return identify.secure_verify(ctx, gallery, x, msg.get("claimed", int), prepared, user_key)
                    return identify.secure_identify(ctx, gallery, x, prepared, user_key)
                try:
                    return answer(preparer.take(stored) or prepared_query())
                except UnknownPrepared:  # S2 lost the prepared masks (a restart): prepare again, once
                    log.warning("S2 lost the prepared queries of gallery %s; preparing again", gallery_id)
                    preparer.drop(gallery_id)
                    return answer(prepared_query())
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
                preparer.refill(stored)
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
            read_query: Callable[..., Any], run: Callable[..., Any], precompute: bool = True) -> None:
    """Register the gallery endpoints on S1's ``app`` and load its galleries."""
    store = GalleryStore(data_dir)
    if public_key is not None:
        loaded = store.load(public_key)
        log.info("S1 loaded %d galleries", loaded)
    elif any(not p.name.startswith(".") for p in store.root.iterdir()):
        raise DataDirError(f"S1 holds galleries in {store.root} but not the cloud key they are encrypted under")
    app.extensions["he_cnn.s1.galleries"] = store
    preparer = GalleryPreparer(app.extensions["he_cnn.s1.peer"], precompute)
    app.extensions["he_cnn.s1.gallery_preparer"] = preparer
    for stored in store.all():
        preparer.refill(stored)
    app.extensions["he_cnn.s1.gallery_hooks"] = S1Hooks(quota, read_query, run)
    app.register_blueprint(bp)
