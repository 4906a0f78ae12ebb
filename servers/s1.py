"""S1, the compute cloud, as a Flask app: stores encrypted models and classifies encrypted images.

S1 never holds a secret key. It learns the cloud public key from S2, pins it in its data directory
(``cloud-key.hecn``) and from then on refuses an S2 that presents another key. Per request it builds a
fresh :class:`~he_cnn.protocols.common.S1Context` over a fresh :class:`~he_cnn.transport.http_channel.HTTPChannel`
and runs the same protocol code as the in-process tests, with the comparison protocol of
``--comparison`` (``S1Context.comparison``: "ot" by default, or "dgk").

Under load, a :class:`~servers.http.QueryGate` runs at most ``--max-concurrent`` classifications at once
and lets at most ``--max-queue`` more wait, first come first served; any further one is answered at
once with 429 ``service_busy`` and a ``Retry-After`` header (seconds, estimated from recent query
durations). The pool filler (:mod:`servers.pools`) learns each query's draw at its end.

Endpoints:
  ``GET  /v1/health``                    S1 status, whether S2 answers, queries running and waiting
                                         (``running``, ``queue``, ``limits``), the pool levels (``pools``:
                                         [size, target] per pool; ``pool_detail``: the same by name, and more)
  ``GET  /v1/public-key``                S2's public key, relayed (users only talk to S1)
  ``GET  /v1/owner/check``               owner token; 200, no effect (the owner asks before it trains)
  ``POST /v1/models``                    owner token; body = ``EncryptedModel.serialize()``; 201 + summary
  ``GET  /v1/models``                    the stored models
  ``GET  /v1/models/<id>``               a model's public architecture
  ``POST /v1/models/<id>/classify``      user API key (unless S1 is open); wire message {user_n, image} ->
                                         wire message {class_vector}; 401 for a missing, unknown or revoked
                                         key, 429 beyond the key's rate or concurrent queries
  ``POST /v1/users``                     owner token; JSON {name, rate_per_minute?, concurrent?} -> 201 +
                                         the new key, shown this once (:mod:`servers.users`)
  ``GET  /v1/users``                     owner token; the users and their limits (never keys or hashes)
  ``DELETE /v1/users/<name>``            owner token; revokes the user's key at once
  ``GET  /metrics``                      Prometheus metrics, no token (:mod:`servers.metrics`)
  ``/v1/galleries...``                   enrolment (owner token), identify and verify (user key):
                                         :mod:`servers.galleries`, registered by :func:`create_app`
  ``/v1/federations...``                 federated sessions (owner token, then each owner's session token):
                                         :mod:`servers.federation`, registered by :func:`create_app`
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from flask import Blueprint, Flask, Response, current_app, jsonify, request
from werkzeug.exceptions import Unauthorized

from he_cnn.bounded_json import JSONLimits, parse_json
from he_cnn.errors import BadRequest, HECNNError, KeyMismatch, PeerKeyChanged, ShapeError, UnknownSetup
from he_cnn.transport.http_channel import CloudPublicKey, HTTPChannel, fetch_public_key, parse_public_key
from he_cnn.crypto.paillier import MAX_USER_KEY_BITS, MIN_KEY_BITS, PublicKey, UserKeys
from he_cnn.parallel import INLINE, Workers
from he_cnn.protocols.common import S1Context
from he_cnn.protocols.millionaire import OTLink
from he_cnn.parties.compute_cloud import (EncryptedModel, Finish, InferenceResult, ModelSetup, PreparedQuery,
                                          prepare_query, secure_inference, setup_model)
from he_cnn.crypto.tensor import EncryptedTensor
from he_cnn.wire import Message, decode, encode

from .config import S1Config
from .galleries import install as install_galleries
from .federation import install as install_federation
from .http import QueryGate, bearer_token, new_app, request_body, require_owner, wire_response, worker_pool
from .metrics import CloudMetrics, install as install_metrics
from .model_store import ModelStore, StoredModel
from .pools import USER_KEY_POOL, PoolFiller, pool_target
from .storage import DataDirError, atomic_write, ensure_private_dir
from .users import DEFAULT_CONCURRENT, DEFAULT_RATE_PER_MINUTE, KeyQuotas, User, UserStore

CLOUD_KEY_FILE = "cloud-key.hecn"
HEALTH_TIMEOUT = 3.0
START_KEY_TIMEOUT = 5.0
KEY_TIMEOUT = 30.0
#: the body of POST /v1/users: one small object
NEW_USER_LIMITS = JSONLimits(max_bytes=1024, max_items=8, max_depth=2)

log = logging.getLogger("he_cnn.servers.s1")


class PeerLink:
    """S1's view of S2: where it is, the cloud token, and the pinned cloud public key."""

    def __init__(self, config: S1Config, workers: Workers = INLINE):
        self.url = config.peer_url.rstrip("/")
        self.workers = workers
        self.comparison = config.comparison
        #: the OT link to S2, shared by every query (its base OTs are made once, on first use)
        self.ot_link = OTLink()
        self.timeout = config.peer_timeout
        self._token = config.cloud_token
        #: TLS to S2: the CA its certificate must chain to, and S1's client certificate (mutual TLS)
        self._tls = {"tls_ca": str(config.peer_ca) if config.peer_ca else None,
                     "client_cert": config.peer_client_cert}
        self._key_path = Path(config.data_dir) / CLOUD_KEY_FILE
        self._key: CloudPublicKey | None = None
        self._key_bytes: bytes | None = None
        self._lock = threading.Lock()
        if self._key_path.exists():
            data = self._key_path.read_bytes()
            try:
                self._key, self._key_bytes = parse_public_key(data), data
            except HECNNError as e:
                raise DataDirError(f"S1's copy of the cloud public key {self._key_path} is corrupt ({e}); "
                                   "delete it to fetch the key from S2 again") from e

    @property
    def pinned(self) -> CloudPublicKey | None:
        return self._key

    def public_key(self, timeout: float | None = None) -> tuple[CloudPublicKey, bytes]:
        """The cloud key: pinned, or fetched from S2 once and pinned (PeerUnavailable if S2 is down)."""
        with self._lock:
            if self._key is None:
                key, data = fetch_public_key(self.url, timeout or min(self.timeout, KEY_TIMEOUT), peer="S2",
                                             **self._tls)
                atomic_write(self._key_path, data, mode=0o644)
                self._key, self._key_bytes = key, data
                log.info("S1 pinned the cloud public key %s (%d bits) from S2", key.key_id, key.paillier.bits)
            return self._key, self._key_bytes  # type: ignore[return-value]

    def check_peer_key(self, timeout: float = HEALTH_TIMEOUT) -> dict[str, Any]:
        """Ask S2 for its key now: reachable?, and does it still hold the pinned key?"""
        try:
            key, _ = fetch_public_key(self.url, timeout, peer="S2", **self._tls)
        except HECNNError as e:
            return {"reachable": False, "message": str(e)}
        pinned = self._key
        return {"reachable": True, "key_id": key.key_id,
                "key_matches": pinned is None or pinned.key_id == key.key_id}

    def raise_explained(self, error: HECNNError) -> None:
        """Re-raise ``error``; as :class:`PeerKeyChanged` if S2 refused because its key is no longer the pinned one."""
        if getattr(error, "peer_code", None) is not None and self._key is not None:
            status = self.check_peer_key()
            if status.get("reachable") and not status["key_matches"]:
                raise PeerKeyChanged(f"S2 now holds key {status['key_id']}, but S1 and its models use key "
                                     f"{self._key.key_id}; restore S2's data directory, or start S1 afresh and "
                                     "re-upload the models") from error
        raise error

    @contextmanager
    def context(self) -> Iterator[S1Context]:
        """A fresh S1 context over a fresh HTTP channel (its own counters and connection)."""
        key, _ = self.public_key()
        channel = HTTPChannel(self.url, self._token, self.timeout, **self._tls)
        try:
            yield S1Context(key.paillier, key.dgk, channel, workers=self.workers, comparison=self.comparison,
                            ot_link=self.ot_link)
        finally:
            channel.close()


class OfflinePhase:
    """One prepared query per model (input masks and E(A(K+B)) terms), computed in the background.

    Each prepared query is used by exactly one query (reusing masks would leak) and belongs to one
    set-up; after a model is stored or loaded and after each query, the next one is prepared by a
    single background thread, so a query finds its query-independent work already done.
    """

    def __init__(self, peer: PeerLink, enabled: bool):
        self._peer = peer
        self._enabled = enabled
        self._ready: dict[tuple[str, str], tuple[ModelSetup, PreparedQuery]] = {}
        self._pending: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="s1-offline") if enabled else None

    def take(self, stored: StoredModel) -> tuple[ModelSetup, PreparedQuery] | None:
        """The prepared query for the model's current set-up, with that set-up (None if not ready)."""
        with self._lock:
            return self._ready.pop((stored.model_id, stored.setup.setup_id), None)

    def ready_count(self) -> int:
        """Models whose next query is prepared."""
        with self._lock:
            return len(self._ready)

    def refill(self, stored: StoredModel) -> None:
        if self._executor is None:
            return
        key = (stored.model_id, stored.setup.setup_id)
        with self._lock:
            if key in self._ready or key in self._pending:
                return
            self._pending.add(key)
        self._executor.submit(self._prepare, stored, stored.setup, key)

    def _prepare(self, stored: StoredModel, setup: ModelSetup, key: tuple[str, str]) -> None:
        try:
            with self._peer.context() as ctx:
                prepared = prepare_query(ctx, stored.model, setup)
            with self._lock:
                if stored.setup is setup:  # a set-up re-run meanwhile makes it useless
                    self._ready[key] = (setup, prepared)
        except Exception:  # the query then does the work itself; nothing is lost
            if not self._closing.is_set():  # at shutdown the worker pool goes away under it
                log.exception("offline phase for model %s failed", stored.model_id)
        finally:
            with self._lock:
                self._pending.discard(key)

    def shutdown(self) -> None:
        self._closing.set()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)


def _service() -> tuple[PeerLink, ModelStore]:
    return current_app.extensions["he_cnn.s1.peer"], current_app.extensions["he_cnn.s1.models"]


bp = Blueprint("s1", __name__, url_prefix="/v1")


@bp.get("/health")
def health() -> Response:
    peer, store = _service()
    pinned = peer.pinned
    pools = current_app.extensions.get("he_cnn.pools")
    gate: QueryGate = current_app.extensions["he_cnn.s1.gate"]
    return jsonify({"status": "ok", "role": "s1", "models": len(store),
                    "key_id": pinned.key_id if pinned else None, "s2": peer.check_peer_key(),
                    "prepared": current_app.extensions["he_cnn.s1.offline"].ready_count(),
                    "prepared_searches": current_app.extensions["he_cnn.s1.gallery_preparer"].ready_count(),
                    "pools": pools.status() if pools else None, "pool_detail": pools.detail() if pools else None,
                    "comparison": peer.comparison, **gate.status()})


@bp.get("/public-key")
def public_key() -> Response:
    peer, _ = _service()
    return wire_response(peer.public_key()[1])


@bp.get("/owner/check")
def check_owner_token() -> Response:
    require_owner()
    return jsonify({"owner_token": "accepted"})


def publish_model(body: bytes) -> StoredModel:
    """An upload's bytes (an owner's, or a federation's aggregate: :mod:`servers.federation`) checked,
    set up with S2, stored, and its next query prepared."""
    peer, store = _service()
    key, _ = peer.public_key()
    model = read_model(body, key.paillier)
    try:
        with peer.context() as ctx:
            setup = setup_model(ctx, model)
    except HECNNError as e:
        peer.raise_explained(e)
    stored = store.add(body, model, setup)
    current_app.extensions["he_cnn.s1.offline"].refill(stored)
    log.info("S1 stored model %s (%d layers); set-up with S2 took %.1f s", stored.model_id,
             stored.info["layers"], ctx.channel.stats.seconds)
    return stored


@bp.post("/models")
def upload_model() -> Response:
    require_owner()
    stored = publish_model(request_body())
    response = jsonify({k: stored.info[k] for k in ("model_id", "layers", "input_shape", "classes")})
    response.status_code = 201
    return response


@bp.get("/models")
def list_models() -> Response:
    _, store = _service()
    return jsonify({"models": [m.summary() for m in store.all()]})


@bp.get("/models/<model_id>")
def describe_model(model_id: str) -> Response:
    _, store = _service()
    stored = store.get(model_id)
    return jsonify({"model_id": stored.model_id, "key_id": stored.info["key_id"], "spec": stored.model.spec})


def _users() -> UserStore:
    return current_app.extensions["he_cnn.s1.users"]


def authenticate_user() -> User | None:
    """The user whose API key the request carries (None when S1 is open); 401 for none, unknown or revoked."""
    if not current_app.extensions["he_cnn.s1.config"].require_user_keys:
        return None
    key = bearer_token("classifying needs a user API key as 'Authorization: Bearer <key>' "
                       "(the operator issues keys: he-cnn admin user add)")
    user = _users().find(key)
    if user is None:
        raise Unauthorized("unknown or revoked user API key")
    return user


@contextmanager
def user_quota() -> Iterator[None]:
    """The request's user's place within its key's limits (nothing to hold when S1 is open)."""
    user = authenticate_user()
    if user is None:
        yield
        return
    with current_app.extensions["he_cnn.s1.quotas"].admit(user):
        yield


@bp.post("/users")
def add_user() -> Response:
    require_owner()
    fields = parse_json(request.get_data(cache=False), NEW_USER_LIMITS, "the new user")
    if not isinstance(fields, dict) or set(fields) - {"name", "rate_per_minute", "concurrent"}:
        raise BadRequest("expected a JSON object {name, rate_per_minute?, concurrent?}")
    user, key = _users().add(fields.get("name"), fields.get("rate_per_minute", DEFAULT_RATE_PER_MINUTE),
                             fields.get("concurrent", DEFAULT_CONCURRENT))
    log.info("S1 issued a key to user %s", user.name)
    response = jsonify({**user.public(), "key": key})
    response.status_code = 201
    return response


@bp.get("/users")
def list_users() -> Response:
    require_owner()
    return jsonify({"users": [u.public() for u in _users().all()]})


@bp.delete("/users/<name>")
def revoke_user(name: str) -> Response:
    require_owner()
    _users().revoke(name)
    log.info("S1 revoked the key of user %s", name)
    return jsonify({"revoked": name})


@bp.post("/models/<model_id>/classify")
def classify(model_id: str) -> Response:
    with user_quota():  # before any work: 401 without a valid key, 429 beyond its limits
        return _classify(model_id)


def _classify(model_id: str) -> Response:
    peer, store = _service()
    stored = store.get(model_id)
    body = request_body()
    key, _ = peer.public_key()
    image, user_key = read_query(decode(body), stored.model, key.paillier, current_app.extensions["he_cnn.s1.user_keys"])
    offline = current_app.extensions["he_cnn.s1.offline"]
    pools: PoolFiller | None = current_app.extensions.get("he_cnn.pools")
    arrived = time.perf_counter()
    with current_app.extensions["he_cnn.s1.gate"].slot():  # ServiceBusy (429) when running and queue are full
        admitted = time.perf_counter()
        taken = offline.take(stored)
        try:
            result = run_with_setup(peer, store, stored, image, user_key, taken)
        except HECNNError as e:
            peer.raise_explained(e)
        finally:
            offline.refill(stored)
            if pools is not None:
                pools.mark_query()  # what this query drew sets the pools' low watermarks
    stats = query_stats(result)
    metrics: CloudMetrics = current_app.extensions["he_cnn.metrics"]
    metrics.observe_query(stored.model_id, waited=admitted - arrived, seconds=time.perf_counter() - admitted,
                          rounds=stats["rounds"], bytes_to_s2=stats["bytes_to_s2"], bytes_to_s1=stats["bytes_to_s1"])
    reply = Message(meta={"model_id": stored.model_id, **stats,
                          "offline_seconds": round(taken[1].seconds, 4) if taken else None})
    reply.arrays["class_vector"] = result.output.data
    reply.widths["class_vector"] = user_key.ciphertext_bytes
    return wire_response(encode(reply))


def read_model(body: bytes, cloud_key: PublicKey) -> EncryptedModel:
    """The owner's upload, checked: wire format, key, ciphertexts, and the architecture, decoded into
    the typed graph layer by layer through the catalogue (:meth:`EncryptedModel.deserialize`)."""
    try:
        return EncryptedModel.deserialize(cloud_key, body)
    except (KeyError, TypeError, ValueError, AttributeError, ArithmeticError) as e:
        # a last guard: the catalogue's readers turn malformed fields into BadRequest themselves
        raise BadRequest(f"malformed model architecture: {type(e).__name__}: {e}") from e


def read_query(msg: Message, model: EncryptedModel, cloud_key: PublicKey,
               user_keys: UserKeys) -> tuple[EncryptedTensor, PublicKey]:
    """The user's key (kept in ``user_keys`` once it is checked) and E(image) from a classify request, checked."""
    user_n = msg.array("user_n").reshape(-1)
    if user_n.size != 1 or user_n[0] <= 0:
        raise BadRequest("user_n must hold exactly one positive integer: the user's Paillier modulus")
    user_key = PublicKey(user_n[0])
    if not MIN_KEY_BITS <= user_key.bits <= MAX_USER_KEY_BITS:
        raise BadRequest(f"user key of {user_key.bits} bits: expected {MIN_KEY_BITS} to {MAX_USER_KEY_BITS} bits")
    if user_key == cloud_key:
        raise KeyMismatch("the user key must be the user's own key, not the cloud key")
    user_key = user_keys.get(user_key.n)  # the same key's table and pool as at its last query
    image = msg.array("image")
    if "image" not in msg.widths:
        raise BadRequest("image must be an array of ciphertexts (unsigned fixed width)")
    if tuple(image.shape) != model.input_shape:
        raise ShapeError(f"image of shape {tuple(image.shape)}, expected {model.input_shape} for this model")
    return EncryptedTensor.from_ciphertexts(cloud_key, image.reshape(-1), image.shape), user_key


def run_with_setup(peer: PeerLink, store: ModelStore, stored: StoredModel, image: EncryptedTensor,
                   user_key: PublicKey, taken: tuple[ModelSetup, PreparedQuery] | None = None,
                   finish: Callable[[S1Context], Finish] | None = None) -> InferenceResult:
    """Secure inference; if S2 no longer knows the model's set-up, run the set-up again once and retry.

    ``taken`` is a set-up and the offline phase prepared for it (used once, dropped on a retry);
    ``finish`` makes ``finish(ctx)`` the last step (:func:`secure_inference`'s ``finish``).
    """
    setup, prepared = taken if taken is not None else (stored.setup, None)
    try:
        with peer.context() as ctx:
            return secure_inference(ctx, stored.model, setup, image, user_key, prepared, finish and finish(ctx))
    except UnknownSetup:
        log.warning("S2 does not know the set-up of model %s; running it again", stored.model_id)
    with stored.setup_lock:
        if stored.setup is setup:  # another request may have redone it meanwhile
            with peer.context() as ctx:
                store.replace_setup(stored, setup_model(ctx, stored.model))
    with peer.context() as ctx:
        return secure_inference(ctx, stored.model, stored.setup, image, user_key, finish=finish and finish(ctx))


def query_stats(result: InferenceResult) -> dict[str, Any]:
    layers = [{"name": s.name, "kind": s.kind, "seconds": round(s.seconds, 4), "rounds": s.rounds,
               "bytes_to_s2": s.bytes_to_s2, "bytes_to_s1": s.bytes_to_s1, "ops": s.ops} for s in result.layers]
    return {"seconds": round(result.seconds, 4), "rounds": result.rounds,
            "bytes_to_s2": sum(s.bytes_to_s2 for s in result.layers),
            "bytes_to_s1": sum(s.bytes_to_s1 for s in result.layers), "layers": layers}


def create_app(config: S1Config) -> Flask:
    """The S1 app for ``config``: pins the cloud key (now if S2 answers, else on first need) and loads models."""
    config.validate()
    data_dir = ensure_private_dir(Path(config.data_dir))
    peer = PeerLink(config, worker_pool(config.workers, config.ray_address, "s1"))
    store = ModelStore(data_dir)
    if peer.pinned is None:
        try:
            peer.public_key(timeout=START_KEY_TIMEOUT)
        except HECNNError as e:
            log.warning("%s; S1 fetches the cloud key when S2 answers", e)
    if peer.pinned is not None:
        loaded = store.load(peer.pinned.paillier)
    elif any(not p.name.startswith(".") for p in store.root.iterdir()):
        raise DataDirError(f"S1 holds models in {store.root} but not the cloud key they are encrypted under "
                           f"({data_dir / CLOUD_KEY_FILE} is missing)")
    else:
        loaded = 0
    app = new_app(__name__, config.max_body_bytes)
    app.extensions["he_cnn.s1.config"] = config
    app.extensions["he_cnn.s1.peer"] = peer
    app.extensions["he_cnn.s1.models"] = store
    app.extensions["he_cnn.workers"] = peer.workers
    app.extensions["he_cnn.s1.offline"] = offline = OfflinePhase(peer, config.precompute)
    for stored in store.all():
        offline.refill(stored)
    app.extensions["he_cnn.s1.user_keys"] = user_keys = UserKeys()
    app.extensions["he_cnn.s1.gate"] = QueryGate(config.max_concurrent, config.max_queue)
    app.extensions["he_cnn.s1.users"] = users = UserStore(data_dir)
    users.all()  # a corrupt user file stops S1 here, with what is wrong, not at the first query
    app.extensions["he_cnn.s1.quotas"] = KeyQuotas()
    if peer.pinned is not None:  # S1 draws Paillier randomizers for re-randomising, DGK ones for blinding
        target = pool_target()  # (and, per user key, one randomizer per class to re-randomise the answer)
        pools = [(peer.pinned.paillier.pool, target // 12, "paillier")]
        if config.comparison == "dgk":  # the OT comparison draws no DGK randomizers: no pool to fill
            pools.append((peer.pinned.dgk.pool, target, "dgk"))
        app.extensions["he_cnn.pools"] = PoolFiller(app, pools, workers=peer.workers,
                                                    more=(lambda: user_keys.pools(USER_KEY_POOL)) if target else None)
    install_galleries(app, data_dir, peer.pinned.paillier if peer.pinned else None, user_quota, read_query,
                      run_with_setup, config.precompute)
    install_federation(app, data_dir, lambda: peer.public_key()[0].paillier, peer.context, peer.pinned.paillier if peer.pinned else None, publish_model)
    app.register_blueprint(bp)
    install_metrics(app, "s1", app.extensions.get("he_cnn.pools"), app.extensions["he_cnn.s1.gate"])
    log.info("S1 ready: %d models from %s, S2 at %s", loaded, data_dir, peer.url)
    return app

