"""Federated sessions at S1: K owners' encrypted updates, added and sent back under the consortium's key.

A session (:mod:`he_cnn.protocols.aggregate`) is created by the holder of S1's owner token, who names the
owners' weights (sample counts), the update's size and bit bound, the number of rounds and the consortium's
public key; S1 answers with one token per owner, shown once and kept only as SHA-256 hashes. Then, round
after round, each owner uploads its packs E(P_k) under the cloud key with its own token; the upload that
completes a round makes S1 add the K updates and run the re-encryption round with S2; every owner then
fetches E_c(S), the weighted sum under the consortium's key.

  ``POST /v1/federations``                    owner token; wire {count, value_bits, weights, rounds,
                                              round_seconds?; consortium_n} -> 201 {session_id, owner_tokens, ...}
  ``GET  /v1/federations/<id>``               S1's owner token or an owner's; the public state: round,
                                              who uploaded, rounds aborted
  ``POST /v1/federations/<id>/rounds/<r>/update``  an owner's token; wire EncryptedTensor E(P_k) -> 202,
                                              or 200 when it completed round r (S1 has aggregated); 409
                                              ``round_not_ready`` if r is not the open round
  ``GET  /v1/federations/<id>/rounds/<r>/sum`` an owner's token; the wire EncryptedTensor E_c(S), or 409
                                              ``round_not_ready`` while owners are missing
  ``POST /v1/federations/<id>/abort``         S1's owner token or an owner's; discards the open round's uploads
  ``POST /v1/federations/<id>/publish``       an owner's token, after the last round; wire meta ``runs``
                                              ([state name, count, num, den] per entry): S1 unpacks and scales
                                              its E(S) with S2, keeps E(K'), answers E_c(K') packed
  ``POST /v1/federations/<id>/model``         an owner's token; wire meta ``spec`` (the model of K'): S1 builds
                                              the upload it would have received, checks, sets it up with S2 and
                                              stores it -> 201 {model_id, ...}; users query it like any model

Drop-outs: the weights are fixed for the session, so a round is summed over all K owners or not at all.
An owner that drops out mid-round leaves it open; any owner (or the operator) aborts it, or it aborts
itself when its first upload came more than ``round_seconds`` ago (default one hour): S1 deletes its uploads,
counts the abort and reopens the same round number for fresh uploads. No partial sum is ever computed.

On disk, ``<data>/federations/<id>/`` holds ``session.json`` (the public parameters, the token hashes and
the state, rewritten atomically), ``update-<r>-<k>.hecn`` for the open round and ``sum-<r>.hecn`` for
each finished one, ``aggregate.hecn`` (the last round's E(S) under the cloud key), ``published.hecn`` and
``published-runs.json`` (E(K') and the state names and counts) once published, so a restarted S1 goes on
where it stopped (a round completed but not yet aggregated is aggregated when an owner next asks for its sum, and never expires). Nothing
here is ever decrypted: S1 holds no secret key. The published model itself lives in S1's model store.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from flask import Blueprint, Flask, Response, current_app, jsonify
from gmpy2 import mpz
from werkzeug.exceptions import Unauthorized

from he_cnn.bounded_json import JSONLimits, read_json_file
from he_cnn.crypto.paillier import MAX_USER_KEY_BITS, PublicKey
from he_cnn.crypto.tensor import EncryptedTensor
from he_cnn.errors import BadRequest, HECNNError, RoundNotReady, UnknownModel
from he_cnn.protocols import aggregate
from he_cnn.protocols.common import S1Context
from he_cnn.graph.integer_model import IntegerModel
from he_cnn.wire import Message, decode, encode

from .http import bearer_token, request_body, require_owner, wire_response
from .storage import DataDirError, atomic_write, ensure_private_dir

SESSION_ID = re.compile(r"^[0-9a-f]{16}$")
SESSION_FILE = "session.json"
#: the last round's sum under the cloud key, its unpacked and scaled values, their names and counts
AGGREGATE_FILE, PUBLISHED_FILE, RUNS_FILE = "aggregate.hecn", "published.hecn", "published-runs.json"
RUNS_LIMITS = JSONLimits(max_bytes=1 << 20, max_items=4 * aggregate.MAX_RUNS + 8, max_depth=3)
#: most rounds a session may declare, and most values in an update
MAX_ROUNDS = 1000
MAX_COUNT = 1 << 22
DEFAULT_ROUND_SECONDS = 3600.0
SESSION_LIMITS = JSONLimits(max_bytes=1 << 20, max_items=4 * aggregate.MAX_OWNERS + 64, max_depth=3)

log = logging.getLogger("he_cnn.servers.federation")


@dataclass
class Session:
    """One federated session at S1: its public parameters, the owners' token hashes and the state."""

    session_id: str
    layout: aggregate.AggregationLayout
    consortium: PublicKey
    token_hashes: list[str]
    rounds: int
    round_seconds: float
    folder: Path
    round: int = 1  # the open round; rounds + 1 once the session is finished
    opened_at: float = field(default_factory=time.time)
    aborted: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def to_json(self) -> dict[str, Any]:
        lay = self.layout
        return {"session_id": self.session_id, "count": lay.count, "value_bits": lay.value_bits,
                "weights": list(lay.weights), "key_bits": lay.key_bits, "consortium_n": format(self.consortium.n, "x"),
                "token_hashes": self.token_hashes, "rounds": self.rounds, "round_seconds": self.round_seconds,
                "round": self.round, "opened_at": self.opened_at, "aborted": self.aborted}

    def public(self) -> dict[str, Any]:
        return {"session_id": self.session_id, "owners": len(self.layout.weights), "weights": list(self.layout.weights),
                "count": self.layout.count, "value_bits": self.layout.value_bits, "packs": self.layout.packs,
                "rounds": self.rounds, "round": self.round, "finished": self.round > self.rounds,
                "uploaded": self.uploaded(), "aborted": self.aborted, "consortium_key_id": self.consortium.key_id}

    def update_file(self, k: int) -> Path:
        return self.folder / f"update-{self.round}-{k}.hecn"

    def sum_file(self, r: int) -> Path:
        return self.folder / f"sum-{r}.hecn"

    def uploaded(self) -> list[int]:
        return [k for k in range(len(self.layout.weights)) if self.update_file(k).exists()]

    def owner_of(self, token: str) -> int | None:
        digest = hashlib.sha256(token.encode()).hexdigest()
        found = [k for k, h in enumerate(self.token_hashes) if hmac.compare_digest(h, digest)]
        return found[0] if found else None

    def save(self) -> None:
        atomic_write(self.folder / SESSION_FILE, json.dumps(self.to_json()).encode())

    def abort_round(self, why: str) -> None:
        for k in self.uploaded():
            self.update_file(k).unlink()
        self.aborted += 1
        self.opened_at = time.time()
        self.save()
        log.info("federation %s: round %d aborted (%s)", self.session_id, self.round, why)

    def complete(self) -> bool:
        """Every owner's update of the open round is here (it is aggregated on the next request)."""
        return self.round <= self.rounds and len(self.uploaded()) == len(self.layout.weights)

    def expire(self) -> None:
        """Abort the open round if its first upload came more than ``round_seconds`` ago and owners are missing."""
        if (self.round <= self.rounds and self.uploaded() and not self.complete()
                and time.time() - self.opened_at > self.round_seconds):
            self.abort_round(f"open longer than {self.round_seconds:g} s")


def read_session(folder: Path, cloud_key: PublicKey) -> Session:
    """A stored session, every field checked (a session file is outside bytes too)."""
    info = read_json_file(folder / SESSION_FILE, SESSION_LIMITS, f"federation session {folder}")
    try:
        if not isinstance(info, dict) or info.get("session_id") != folder.name or info.get("key_bits") != cloud_key.bits:
            raise BadRequest("not a session file of this directory and key")
        n = info["consortium_n"]
        if not isinstance(n, str) or len(n) > MAX_USER_KEY_BITS // 4:
            raise BadRequest("consortium_n out of range")
        layout = aggregate.AggregationLayout(info["count"], info["value_bits"], tuple(info["weights"]), cloud_key.bits)
        hashes = info["token_hashes"]
        if not (isinstance(hashes, list) and len(hashes) == len(layout.weights)
                and all(isinstance(h, str) and re.fullmatch(r"[0-9a-f]{64}", h) for h in hashes)):
            raise BadRequest("token_hashes out of range")
        rounds, rnd, aborted = info["rounds"], info["round"], info["aborted"]
        if not all(type(v) is int for v in (rounds, rnd, aborted)) or not 1 <= rnd <= rounds + 1 <= MAX_ROUNDS + 1:
            raise BadRequest("round counters out of range")
        return Session(folder.name, layout, PublicKey(mpz(int(n, 16))), hashes, rounds, float(info["round_seconds"]),
                       folder, rnd, float(info["opened_at"]), aborted)
    except (KeyError, TypeError, ValueError) as e:
        raise BadRequest(f"federation session {folder} is malformed: {e}") from e


class SessionStore:
    """S1's federated sessions, in memory and under ``<data dir>/federations``."""

    def __init__(self, data_dir: Path):
        self.root = ensure_private_dir(Path(data_dir) / "federations")
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def load(self, cloud_key: PublicKey) -> int:
        for entry in sorted(self.root.iterdir()):
            if not (entry.is_dir() and SESSION_ID.match(entry.name)):
                raise DataDirError(f"S1 federation directory holds an unexpected entry {entry}; move it away")
            try:
                self._sessions[entry.name] = read_session(entry, cloud_key)
            except (OSError, HECNNError) as e:
                raise DataDirError(f"stored federation session {entry} is corrupt ({e}); move it away") from e
        return len(self._sessions)

    def create(self, layout: aggregate.AggregationLayout, consortium: PublicKey, rounds: int,
               round_seconds: float) -> tuple[Session, list[str]]:
        tokens = [secrets.token_urlsafe(24) for _ in layout.weights]
        session_id = secrets.token_hex(8)
        folder = ensure_private_dir(self.root / session_id)
        session = Session(session_id, layout, consortium, [hashlib.sha256(t.encode()).hexdigest() for t in tokens],
                          rounds, round_seconds, folder)
        session.save()
        with self._lock:
            self._sessions[session_id] = session
        return session, tokens

    def get(self, session_id: str) -> Session:
        session = self._sessions.get(session_id)
        if session is None:
            raise UnknownModel(f"no federation session {session_id[:40]!r}")
        return session


def aggregate_round(session: Session, ctx: S1Context) -> dict[str, Any]:
    """S1: add the open round's K updates, have S2 re-encrypt the sum to the consortium, store it and
    open the next round (the caller holds the session's lock). Returns the round's seconds and bytes."""
    started = time.perf_counter()
    layout = session.layout
    updates = [EncryptedTensor.deserialize(ctx.public_key, session.update_file(k).read_bytes())
               for k in range(len(layout.weights))]
    packs = aggregate.aggregate_updates(updates, layout)
    total = aggregate.reencrypt_for_consortium(ctx, packs, layout, session.consortium)
    if session.round == session.rounds:  # the last: kept under the cloud key too, to be published as a model
        atomic_write(session.folder / AGGREGATE_FILE, packs.serialize())
    atomic_write(session.sum_file(session.round), total.serialize())
    finished = session.round
    for k in range(len(layout.weights)):
        session.update_file(k).unlink()
    session.round += 1
    session.opened_at = time.time()
    session.save()
    log.info("federation %s: round %d aggregated (%d owners, %d packs)", session.session_id, finished,
             len(layout.weights), layout.packs)
    return {"aggregation_seconds": round(time.perf_counter() - started, 4),
            "cloud_bytes": ctx.channel.stats.bytes_to_s2 + ctx.channel.stats.bytes_to_s1}


# -- S1's endpoints ---------------------------------------------------------------------------------
bp = Blueprint("federation", __name__, url_prefix="/v1")


def _store() -> SessionStore:
    return current_app.extensions["he_cnn.s1.federations"]


def _session_owner(session: Session) -> int:
    """The index of the owner whose token the request carries (401 otherwise)."""
    k = session.owner_of(bearer_token("this endpoint needs an owner's session token as 'Authorization: Bearer <token>'"))
    if k is None:
        raise Unauthorized("not a token of this session")
    return k


def _owner_or_operator(session: Session) -> None:
    token = bearer_token("this endpoint needs a session or owner token as 'Authorization: Bearer <token>'")
    if session.owner_of(token) is None:
        require_owner()


def _hooks() -> "S1Hooks":
    return current_app.extensions["he_cnn.s1.federation_hooks"]


@dataclass(frozen=True)
class S1Hooks:
    """What the federation endpoints need of S1's app: the cloud key, a context with S2, and S1's path for an
    upload's bytes (:func:`servers.s1.publish_model`: checked, set up with S2, stored, served)."""

    cloud_key: Callable[[], PublicKey]
    context: Callable[[], Any]
    publish: Callable[[bytes], Any]


@bp.post("/federations")
def create_session() -> Response:
    require_owner()
    msg = decode(request_body())
    cloud_key = _hooks().cloud_key()
    count, value_bits, rounds = msg.get("count", int), msg.get("value_bits", int), msg.get("rounds", int)
    weights = msg.get("weights", list)
    round_seconds = msg.meta.get("round_seconds", DEFAULT_ROUND_SECONDS)
    if isinstance(round_seconds, bool) or not isinstance(round_seconds, (int, float)):
        raise BadRequest(f"round_seconds must be a number, got {type(round_seconds).__name__}")
    if not 1 <= count <= MAX_COUNT or not 1 <= rounds <= MAX_ROUNDS or not 1.0 <= round_seconds <= 7 * 86400:
        raise BadRequest(f"count, rounds or round_seconds out of range (at most {MAX_COUNT}, {MAX_ROUNDS}, a week)")
    if len(weights) > aggregate.MAX_OWNERS or any(type(w) is not int or not 1 <= w < 1 << 32 for w in weights):
        raise BadRequest(f"weights: at most {aggregate.MAX_OWNERS} positive integers below 2^32")
    layout = aggregate.AggregationLayout(count, value_bits, tuple(weights), cloud_key.bits)
    n = msg.array("consortium_n").reshape(-1)
    if n.size != 1 or not 0 < int(n[0]) < 1 << MAX_USER_KEY_BITS:
        raise BadRequest("expected one consortium modulus")
    consortium = PublicKey(mpz(int(n[0])))
    if consortium.bits < cloud_key.bits or consortium == cloud_key:
        raise BadRequest(f"the consortium key must be another key of at least {cloud_key.bits} bits")
    session, tokens = _store().create(layout, consortium, rounds, round_seconds)
    log.info("federation %s created: %d owners, %d rounds, %d values", session.session_id, len(weights), rounds, count)
    response = jsonify({**session.public(), "owner_tokens": tokens})
    response.status_code = 201
    return response


@bp.get("/federations/<session_id>")
def describe_session(session_id: str) -> Response:
    session = _store().get(session_id)
    _owner_or_operator(session)
    with session.lock:
        session.expire()
        return jsonify(session.public())


@bp.post("/federations/<session_id>/rounds/<int:r>/update")
def upload_update(session_id: str, r: int) -> Response:
    session = _store().get(session_id)
    k = _session_owner(session)
    msg_bytes = request_body()
    update = EncryptedTensor.deserialize(_hooks().cloud_key(), msg_bytes)
    if update.shape != (session.layout.packs,):
        raise BadRequest(f"an update of shape {update.shape}, expected ({session.layout.packs},) packs")
    with session.lock:
        session.expire()
        if session.round > session.rounds:
            raise RoundNotReady(f"session {session.session_id} is finished: all {session.rounds} rounds are summed")
        if r != session.round:
            raise RoundNotReady(f"the open round is {session.round}, the upload is for round {r}")
        if not session.uploaded():  # the round's clock starts with its first upload
            session.opened_at = time.time()
            session.save()
        atomic_write(session.update_file(k), msg_bytes)
        complete = session.complete()
        costs: dict[str, Any] = {}
        if complete:
            with _hooks().context() as ctx:
                costs = aggregate_round(session, ctx)
        state = session.public()
    response = jsonify({**state, **costs, "aggregated": complete})
    response.status_code = 200 if complete else 202
    return response


@bp.get("/federations/<session_id>/rounds/<int:r>/sum")
def round_sum(session_id: str, r: int) -> Response:
    session = _store().get(session_id)
    _session_owner(session)
    with session.lock:
        session.expire()
        if r == session.round and session.complete():  # S1 stopped mid-way, or S2 failed the round's aggregation
            with _hooks().context() as ctx:
                aggregate_round(session, ctx)
        path = session.sum_file(r)
        if not 1 <= r < session.round or not path.exists():
            raise RoundNotReady(f"round {r} has no sum yet (open round {session.round}, "
                                f"{len(session.uploaded())} of {len(session.layout.weights)} updates)")
        return wire_response(path.read_bytes())


@bp.post("/federations/<session_id>/abort")
def abort_round(session_id: str) -> Response:
    session = _store().get(session_id)
    _owner_or_operator(session)
    with session.lock:
        if session.round <= session.rounds:
            session.abort_round("asked to")
        return jsonify(session.public())


@bp.post("/federations/<session_id>/publish")
def publish_aggregate(session_id: str) -> Response:
    """After the last round: S1 unpacks its E(S) into one ciphertext per served integer (the owners' public
    scale factors, per state entry), keeps them, and answers them under the consortium's key, so that the
    owners learn the exact integers and can name the served model's public spec."""
    session = _store().get(session_id)
    _session_owner(session)
    runs = decode(request_body()).get("runs", list)
    if not all(isinstance(r, list) and len(r) == 4 and isinstance(r[0], str) and len(r[0]) <= 200 for r in runs):
        raise BadRequest("runs: [name, count, num, den] each")
    with session.lock:
        if session.round <= session.rounds or not (session.folder / AGGREGATE_FILE).exists():
            raise RoundNotReady(f"the session's last round ({session.rounds}) is not aggregated yet")
        key = _hooks().cloud_key()
        packs = EncryptedTensor.deserialize(key, (session.folder / AGGREGATE_FILE).read_bytes())
        numbers = [tuple(r[1:]) for r in runs]
        with _hooks().context() as ctx:
            served = aggregate.unpack_scaled(ctx, packs, session.layout, numbers)
            answer = aggregate.reencrypt_values_for_consortium(ctx, served, aggregate.scaled_bits(session.layout, numbers),
                                                               session.consortium)
        atomic_write(session.folder / PUBLISHED_FILE, served.serialize())
        atomic_write(session.folder / RUNS_FILE, json.dumps([[r[0], r[1]] for r in runs]).encode())
    return wire_response(answer.serialize())


@bp.post("/federations/<session_id>/model")
def publish_model(session_id: str) -> Response:
    """The published integers as a model, with the public spec the owners name (checked like any upload's):
    set up with S2 and served like an uploaded model."""
    session = _store().get(session_id)
    _session_owner(session)
    spec = decode(request_body()).get("spec", dict)
    key = _hooks().cloud_key()
    with session.lock:
        if not (session.folder / PUBLISHED_FILE).exists():
            raise RoundNotReady("publish the aggregate first")
        served = EncryptedTensor.deserialize(key, (session.folder / PUBLISHED_FILE).read_bytes())
        names = read_json_file(session.folder / RUNS_FILE, RUNS_LIMITS, "published runs")
    if not (isinstance(names, list) and all(isinstance(n, list) and len(n) == 2 and isinstance(n[0], str)
                                            and type(n[1]) is int and n[1] >= 1 for n in names)
            and sum(n[1] for n in names) == served.size):
        raise DataDirError(f"{session.folder / RUNS_FILE} does not describe the published values")
    parts, start = {}, 0
    for name, count in names:
        parts[name] = served.data[start:start + count]
        start += count
    body = encrypted_upload(spec, parts, key)
    stored = _hooks().publish(body)
    log.info("S1 published federation model %s", stored.model_id)
    response = jsonify({k: stored.info[k] for k in ("model_id", "layers", "input_shape", "classes")})
    response.status_code = 201
    return response


def encrypted_upload(spec: dict[str, Any], parts: dict[str, Any], key: PublicKey) -> bytes:
    """The bytes an owner's upload of ``spec`` would have: each linear layer's E(K) in the protocol's (F, C)
    layout (its (C, ...) weights flattened per output channel, transposed) and E(b), from ``parts`` by
    state name (``<layer>.weight``, ``<layer>.bias``)."""
    graph = IntegerModel.from_spec(spec)
    msg = Message(meta={"spec": spec, "key_id": key.key_id})
    for layer in graph.linear_layers():
        weight, bias = parts.get(f"{layer.name}.weight"), parts.get(f"{layer.name}.bias")
        if weight is None or bias is None or weight.size % layer.channels:
            raise BadRequest(f"the published values have no weights and bias of layer {layer.name!r} of the spec")
        msg.arrays[f"{layer.name}.weight"] = np.ascontiguousarray(weight.reshape(layer.channels, -1).T)
        msg.arrays[f"{layer.name}.bias"] = bias
        msg.widths[f"{layer.name}.weight"] = msg.widths[f"{layer.name}.bias"] = key.ciphertext_bytes
    return encode(msg)


def install(app: Flask, data_dir: Path, cloud_key: Callable[[], PublicKey], context: Callable[[], Any],
            pinned: PublicKey | None, publish: Callable[[bytes], Any]) -> None:
    """Register the federation endpoints on S1's ``app`` and load its sessions."""
    store = SessionStore(data_dir)
    if pinned is not None:
        log.info("S1 loaded %d federation sessions", store.load(pinned))
    elif any(store.root.iterdir()):
        raise DataDirError(f"S1 holds federation sessions in {store.root} but not the cloud key")
    app.extensions["he_cnn.s1.federations"] = store
    app.extensions["he_cnn.s1.federation_hooks"] = S1Hooks(cloud_key, context, publish)
    app.register_blueprint(bp)
