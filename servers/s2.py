"""S2, the key cloud, as a Flask app: publishes the cloud public key and answers S1's protocol rounds.

On first start S2 generates the cloud Paillier key pair and the DGK key pair for comparisons and
writes them to ``<data dir>/keys.json`` (mode 0600, atomic); later starts reload them, and a file that
does not parse or does not hold a consistent key stops the start with a clear message. Every model
set-up S1 runs (the masked weights K + B) is written to ``<data dir>/setups/`` as a wire file when it
arrives and reloaded at start, so a restart of S2 does not break the models S1 holds.

S2 fills its Paillier randomness pool on its workers (:mod:`servers.pools`), its DGK pool only after it
has served a DGK comparison step (``compare_bits``: S1 runs ``--comparison dgk``), and tells the filler
where each query ends (the ``to_user`` step).

Endpoints: ``GET /v1/health`` (also the pool levels and the rounds running), ``GET /v1/public-key`` (wire message, see
:func:`he_cnn.transport.http_channel.public_key_message`), ``POST /v1/rounds/<step>`` (cloud token; the body is
the wire request of one protocol round, the reply its wire answer), ``GET /metrics`` (Prometheus metrics, no token:
:mod:`servers.metrics`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import stat
import threading
from pathlib import Path
from typing import Any

import numpy as np
from flask import Blueprint, Flask, Response, current_app, jsonify
from gmpy2 import mpz

from he_cnn.crypto.dgk import DGKPrivateKey, DGKPublicKey
from he_cnn.bounded_json import JSONLimits, read_json_file
from he_cnn.errors import BadRequest, HECNNError, ProtocolError, UnknownSetup
from he_cnn.transport.http_channel import public_key_message
from he_cnn.crypto.paillier import generate_keypair, keypair_from_primes
from he_cnn.protocols import comparison, linear, output
from he_cnn.protocols.linear import LinearGeometry
from he_cnn.parties.key_cloud import KeyCloud
from he_cnn.protocols.common import S2WorkerKey
from he_cnn.crypto.tensor import as_int_array
from he_cnn.wire import Message, decode, encode

from .config import S2Config
from .galleries import install_s2_galleries
from .http import new_app, request_body, require_bearer, wire_response, worker_pool
from .metrics import CloudMetrics, install as install_metrics
from .pools import USER_KEY_POOL, PoolFiller, pool_target
from .storage import DataDirError, atomic_write, ensure_private_dir

KEY_FILE = "keys.json"
KEY_FORMAT = "he-cnn-s2-keys"
KEY_FORMAT_VERSION = 1
SETUP_DIR = "setups"
SETUP_SUFFIX = ".hecn"

log = logging.getLogger("he_cnn.servers.s2")


# -- the key pair on disk -------------------------------------------------------------------------

def _key_document(cloud: KeyCloud) -> dict[str, Any]:
    private = cloud.keys.private
    return {
        "format": KEY_FORMAT,
        "version": KEY_FORMAT_VERSION,
        "key_id": cloud.keys.public.key_id,
        "paillier": {"p": int(private.p), "q": int(private.q)},
        "dgk": {**cloud.dgk_public.to_dict(), **cloud.dgk_private.to_dict()},
    }


def _cloud_from_document(doc: Any) -> KeyCloud:
    if not isinstance(doc, dict) or doc.get("format") != KEY_FORMAT:
        raise DataDirError(f"not a he-cnn S2 key file (format {doc.get('format') if isinstance(doc, dict) else None!r})")
    if doc.get("version") != KEY_FORMAT_VERSION:
        raise DataDirError(f"key file version {doc.get('version')!r} is not supported; expected {KEY_FORMAT_VERSION}")
    try:
        keys = keypair_from_primes(int(doc["paillier"]["p"]), int(doc["paillier"]["q"]))
        dgk = doc["dgk"]
        dgk_public = DGKPublicKey.from_dict(dgk)
        dgk_private = DGKPrivateKey(dgk_public, mpz(int(dgk["p"])), mpz(int(dgk["v_p"])))
    except (KeyError, TypeError, ValueError) as e:
        raise DataDirError(f"key file lacks or mangles field {e}") from e
    if dgk_public.n % dgk_private.p != 0 or dgk_private.p in (0, 1, dgk_public.n):
        raise DataDirError("DGK private prime does not divide the DGK modulus")
    if doc.get("key_id") not in (None, keys.public.key_id):
        raise DataDirError(f"key file claims id {doc.get('key_id')!r} but holds key {keys.public.key_id}")
    return KeyCloud(keys, dgk_public, dgk_private)


#: S2's key file: a Paillier and a DGK key pair, a few kB at the largest key sizes
KEY_FILE_LIMITS = JSONLimits(max_bytes=1 << 20, max_items=256)


def load_worker_key(path: str) -> S2WorkerKey:
    """S2's key as its Ray actors hold it, read from S2's key file at ``path`` on the actor's node
    (:class:`he_cnn.ray_workers.RayWorkers` passes this function and the path, never the key)."""
    try:
        doc = read_json_file(Path(path), KEY_FILE_LIMITS, f"S2 key file {path}")
        return _cloud_from_document(doc).worker_key
    except (OSError, HECNNError) as e:
        raise DataDirError(f"this Ray node cannot read S2's key file {path}: {e} (every node of S2's cluster needs "
                           "it at the same path)") from e


def load_or_create_key_cloud(data_dir: Path, key_bits: int) -> KeyCloud:
    """The key cloud of ``data_dir``: reloaded if its key file exists, else freshly generated and saved."""
    ensure_private_dir(data_dir)
    path = data_dir / KEY_FILE
    if path.exists():
        try:
            doc = read_json_file(path, KEY_FILE_LIMITS, f"S2 key file {path}")
        except (OSError, BadRequest) as e:
            raise DataDirError(f"S2 key file {path} is unreadable or not JSON ({e}); restore it from a backup, "
                               "or move it away to make S2 generate a new key (S1 must then re-upload every model)") from e
        try:
            cloud = _cloud_from_document(doc)
        except HECNNError as e:
            raise DataDirError(f"S2 key file {path} is corrupt: {e}") from e
        if stat.S_IMODE(path.stat().st_mode) & 0o077:
            log.warning("S2 key file %s is readable by other users; run: chmod 600 %s", path, path)
        if cloud.keys.public.bits != key_bits:
            log.warning("S2 keeps its existing %d-bit key; the requested key size of %d bits applies only to a new "
                        "data directory", cloud.keys.public.bits, key_bits)
        return cloud
    log.info("S2 generating a %d-bit Paillier key pair and a DGK key pair (first start)", key_bits)
    cloud = KeyCloud.create(generate_keypair(key_bits))
    atomic_write(path, json.dumps(_key_document(cloud)).encode())
    return cloud


# -- set-ups on disk ------------------------------------------------------------------------------

def _setup_path(data_dir: Path, setup_id: str) -> Path:
    # the id comes from S1: hash it rather than trusting it as a file name
    return data_dir / SETUP_DIR / (hashlib.sha256(setup_id.encode()).hexdigest()[:32] + SETUP_SUFFIX)


def encode_setup(setup_id: str, layers: dict[str, tuple[np.ndarray, LinearGeometry]]) -> bytes:
    msg = Message(meta={"setup_id": setup_id, "layers": []})
    for i, (name, (weights, geometry)) in enumerate(layers.items()):
        msg.meta["layers"].append({"name": name, "geometry": geometry.to_dict()})
        msg.arrays[f"w{i}"] = weights
    return encode(msg)


def decode_setup(data: bytes) -> tuple[str, dict[str, tuple[np.ndarray, LinearGeometry]]]:
    msg = decode(data)
    layers = {}
    for i, entry in enumerate(msg.get("layers", list)):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise ProtocolError(f"malformed layer entry {entry!r}")
        weights = as_int_array(msg.array(f"w{i}"))  # Python ints, as the set-up step stores them
        geometry = LinearGeometry.from_dict(entry.get("geometry", {}))
        if weights.ndim != 2 or geometry.column_indices().shape[1] != weights.shape[0]:
            raise ProtocolError(f"layer {entry['name']}: weights of shape {weights.shape} do not fit its geometry")
        layers[entry["name"]] = (weights, geometry)
    return msg.get("setup_id", str), layers


def load_setups(cloud: KeyCloud, data_dir: Path) -> int:
    """Read every stored set-up into ``cloud``; a corrupt file stops the start with its name."""
    folder = ensure_private_dir(data_dir / SETUP_DIR)
    count = 0
    for path in sorted(folder.glob("*" + SETUP_SUFFIX)):
        try:
            setup_id, layers = decode_setup(path.read_bytes())
        except (OSError, ArithmeticError, HECNNError) as e:  # ArithmeticError: e.g. int() of an infinity
            raise DataDirError(f"S2 set-up file {path} is corrupt ({e}); delete it (S1 runs the set-up again "
                               "on the next query of that model)") from e
        cloud.setups[setup_id] = layers
        count += 1
    return count


def persist_setups(cloud: KeyCloud, data_dir: Path) -> None:
    """Make ``cloud`` write each new set-up to ``data_dir`` before S1 hears that it is stored."""
    ensure_private_dir(data_dir / SETUP_DIR)

    def on_setup(setup_id: str, layers: dict[str, tuple[np.ndarray, LinearGeometry]]) -> None:
        atomic_write(_setup_path(data_dir, setup_id), encode_setup(setup_id, layers))

    cloud.on_setup = on_setup


# -- the app --------------------------------------------------------------------------------------

bp = Blueprint("s2", __name__, url_prefix="/v1")


def _cloud() -> KeyCloud:
    return current_app.extensions["he_cnn.s2"]


@bp.get("/health")
def health() -> Response:
    cloud = _cloud()
    pools: PoolFiller | None = current_app.extensions.get("he_cnn.pools")
    return jsonify({"status": "ok", "role": "s2", "key_id": cloud.keys.public.key_id,
                    "key_bits": cloud.keys.public.bits, "setups": len(cloud.setups),
                    "pools": pools.status() if pools else None, "pool_detail": pools.detail() if pools else None,
                    "running": pools.running() if pools else None,
                    "dgk_comparisons_served": bool(current_app.extensions["he_cnn.s2.dgk_served"].is_set())})


@bp.get("/public-key")
def public_key() -> Response:
    return wire_response(current_app.extensions["he_cnn.s2.public_key"])


@bp.post("/rounds/<step>")
def protocol_round(step: str) -> Response:
    require_bearer(current_app.extensions["he_cnn.s2.config"].cloud_token, "cloud token")
    body = request_body()
    cloud = _cloud()
    try:
        reply = cloud.handle(step, body)
    except ProtocolError as e:
        if step == linear.STEP and _refers_to_unknown_setup(cloud, body):
            raise UnknownSetup(f"unknown model set-up: {e}") from e
        raise
    _after_step(step)
    metrics: CloudMetrics = current_app.extensions["he_cnn.metrics"]
    metrics.observe_round(step, len(body), len(reply))
    return wire_response(reply)


def _after_step(step: str) -> None:
    """What the pool filler learns from a served step: the first DGK comparison switches the DGK pool on
    (S1 runs ``--comparison dgk``; with the OT comparison S2 never pre-computes DGK randomizers), and
    the answer to the user ends a query (each pool's draw per query sets its low watermark)."""
    pools: PoolFiller | None = current_app.extensions.get("he_cnn.pools")
    if step == comparison.BITS_STEP:
        served = current_app.extensions["he_cnn.s2.dgk_served"]
        if not served.is_set():
            served.set()
            if pools is not None:
                pools.activate("dgk")
    elif step == output.STEP and pools is not None:
        pools.mark_query()


def _refers_to_unknown_setup(cloud: KeyCloud, body: bytes) -> bool:
    try:
        setup_id = decode(body).meta.get("setup_id")
    except HECNNError:
        return False
    return isinstance(setup_id, str) and setup_id not in cloud.setups


def create_app(config: S2Config, key_cloud: KeyCloud | None = None) -> Flask:
    """The S2 app for ``config``; loads (or creates) keys and set-ups from its data directory.

    ``key_cloud`` replaces the key file (tests pass a prepared one; set-ups are still persisted).
    """
    config.validate()
    data_dir = Path(config.data_dir)
    cloud = key_cloud if key_cloud is not None else load_or_create_key_cloud(data_dir, config.key_bits)
    loaded = load_setups(cloud, data_dir)
    persist_setups(cloud, data_dir)
    install_s2_galleries(cloud, data_dir)
    cloud.workers = worker_pool(config.workers, config.ray_address, "s2",
                                (load_worker_key, str(data_dir / KEY_FILE)), cloud.keys.public.key_id)
    app = new_app(__name__, config.max_body_bytes)
    app.extensions["he_cnn.workers"] = cloud.workers
    app.extensions["he_cnn.s2"] = cloud
    app.extensions["he_cnn.s2.config"] = config
    app.extensions["he_cnn.s2.public_key"] = public_key_message(cloud.keys.public, cloud.dgk_public)
    app.extensions["he_cnn.s2.dgk_served"] = threading.Event()  # set by the first DGK comparison step
    target = pool_target()
    app.extensions["he_cnn.pools"] = PoolFiller(  # the DGK pool only once a DGK comparison came (_after_step)
        app, [(cloud.keys.public.pool, target // 5, "paillier"), (cloud.dgk_public.pool, target, "dgk", False)],
        more=(lambda: cloud.user_keys.pools(USER_KEY_POOL)) if target else None, workers=cloud.workers)
    app.register_blueprint(bp)
    install_metrics(app, "s2", app.extensions["he_cnn.pools"])
    log.info("S2 ready: key %s (%d bits), %d set-ups from %s", cloud.keys.public.key_id, cloud.keys.public.bits,
             loaded, data_dir)
    return app

