"""Load behaviour of the S1 service: a bounded number of queries run at once, a bounded FIFO queue
waits, and any further classify request gets 429 ``service_busy`` with a numeric ``Retry-After`` and a
JSON body; ``GET /v1/health`` reports ``queue``, ``running``, the limits and the pool levels. Also the
``--comparison`` / ``--max-concurrent`` / ``--max-queue`` flags, and S2 filling its DGK pool only once it
has served a DGK comparison.

S2 runs under waitress in a thread with a key cloud whose rounds can be held (an event), so a query
stays "running" exactly as long as the test wants: no timing assertions. The model is the trust
tests' tiny network (1024-bit keys, about a second per query).
"""
from __future__ import annotations

import threading

import pytest
from click.testing import CliRunner
from waitress.server import create_server

from he_cnn.crypto.dgk import DGKPublicKey
from he_cnn.crypto.tensor import EncryptedTensor
from he_cnn.errors import BadRequest, ServiceBusy
from he_cnn.graph.reference import classify_reference
from he_cnn.crypto.paillier import generate_keypair
from he_cnn.parties.compute_cloud import encrypt_model
from he_cnn.parties.key_cloud import KeyCloud
from he_cnn.servers import s1 as s1_app
from he_cnn.servers import s2 as s2_app
from he_cnn.servers import serve as serve_module
from he_cnn.servers.cli import main
from he_cnn.servers.config import DEFAULT_COMPARISON, DEFAULT_MAX_CONCURRENT, DEFAULT_MAX_QUEUE, S1Config, S2Config
from he_cnn.servers.http import QueryGate, shutdown_app
from he_cnn.transport.http_channel import parse_public_key
from he_cnn.user.query import query_message
from he_cnn.wire import decode
from waiting import wait_for
from trust_support import random_image, tiny_model

CLOUD_TOKEN = "load-cloud-token-" + "c" * 16
OWNER_TOKEN = "load-owner-token-" + "o" * 16
WIRE = "application/octet-stream"
#: small pools: S1 Paillier 20 (a 12th), S2 Paillier 48 (a fifth), DGK 240 where filled
POOL = 240




class HeldRounds:
    """Wraps a key cloud's ``handle``: while ``armed``, every round waits for ``release``."""

    def __init__(self, cloud: KeyCloud):
        self.cloud = cloud
        self.handle = cloud.handle
        self.armed = False
        self.release = threading.Event()
        self.held = 0
        self._lock = threading.Lock()
        cloud.handle = self  # the S2 app calls cloud.handle(step, body)

    def __call__(self, step: str, payload: bytes) -> bytes:
        if self.armed:
            with self._lock:
                self.held += 1
            self.release.wait(120)
        return self.handle(step, payload)


@pytest.fixture(scope="module")
def small_pools():
    with pytest.MonkeyPatch.context() as env:
        env.setenv("HECNN_RANDOMNESS_POOL", str(POOL))
        yield


@pytest.fixture(scope="module")
def service(small_pools, keys1024, tmp_path_factory):
    """S2 over real HTTP (rounds can be held), S1 as an app (comparison "dgk", one query at a time, one
    waiting), the tiny model uploaded."""
    cloud = KeyCloud.create(keys1024)
    held = HeldRounds(cloud)
    s2 = s2_app.create_app(S2Config(data_dir=tmp_path_factory.mktemp("s2"), cloud_token=CLOUD_TOKEN, key_bits=1024),
                           key_cloud=cloud)
    server = create_server(s2, host="127.0.0.1", port=0, threads=4)
    threading.Thread(target=server.run, daemon=True).start()
    s2_url = f"http://127.0.0.1:{server.socket.getsockname()[1]}"
    config = S1Config(require_user_keys=False, data_dir=tmp_path_factory.mktemp("s1"), peer_url=s2_url, owner_token=OWNER_TOKEN,
                      cloud_token=CLOUD_TOKEN, peer_timeout=60.0, precompute=False, comparison="dgk",
                      max_concurrent=1, max_queue=1, threads=4)
    s1 = s1_app.create_app(config)
    model = tiny_model()
    client = s1.test_client()
    reply = client.post("/v1/models", data=encrypt_model(model, keys1024.public).serialize(),
                        headers={"Authorization": f"Bearer {OWNER_TOKEN}"}, content_type=WIRE)
    assert reply.status_code == 201, reply.data
    yield {"s1": s1, "s2": s2, "cloud": cloud, "held": held, "model": model,
           "model_id": reply.get_json()["model_id"], "cloud_key": parse_public_key(client.get("/v1/public-key").data)}
    held.armed = False
    held.release.set()
    shutdown_app(s1)
    shutdown_app(s2)
    server.close()


def classify(app, model_id: str, body: bytes):
    return app.test_client().post(f"/v1/models/{model_id}/classify", data=body, content_type=WIRE)


def decrypted(reply_data: bytes, user) -> list[int]:
    cts = decode(reply_data).array("class_vector").reshape(-1)
    return [int(v) for v in EncryptedTensor.from_ciphertexts(user.public, cts, (cts.size,)).decrypt(user.private)]


def test_a_full_service_answers_429_with_retry_after_and_serves_the_queue_in_order(service):
    s1, held, model_id = service["s1"], service["held"], service["model_id"]
    user = generate_keypair(1024)
    images = [random_image(40 + i) for i in range(3)]
    bodies = [query_message(pixels, service["cloud_key"], user) for pixels in images]
    gate: QueryGate = s1.extensions["he_cnn.s1.gate"]
    replies: dict[int, object] = {}
    order: list[int] = []

    def run(i: int) -> None:
        replies[i] = classify(s1, model_id, bodies[i])
        order.append(i)

    held.release.clear()
    held.armed = True
    first = threading.Thread(target=run, args=(0,))
    first.start()
    assert wait_for(lambda: held.held >= 1)  # query 0 runs: it holds S2's first round
    second = threading.Thread(target=run, args=(1,))
    second.start()
    assert wait_for(lambda: gate.status()["queue"] == 1)  # query 1 waits for the one place

    health = s1.test_client().get("/v1/health").get_json()
    assert (health["running"], health["queue"]) == (1, 1)
    assert health["limits"] == {"max_concurrent": 1, "max_queue": 1}
    assert health["status"] == "ok" and health["s2"]["reachable"] is True  # existing fields stay

    busy = classify(s1, model_id, bodies[2])
    assert busy.status_code == 429, busy.data
    assert busy.mimetype == "application/json"
    body = busy.get_json()
    assert set(body) == {"error", "message"} and body["error"] == ServiceBusy.code
    assert "1 queries running, 1 waiting" in body["message"]
    retry_after = busy.headers["Retry-After"]
    assert retry_after.isdigit() and int(retry_after) >= 1
    assert s1.test_client().get("/v1/health").get_json()["refused"] == 1

    held.armed = False
    held.release.set()
    first.join(120)
    second.join(120)
    assert order == [0, 1]  # first come, first served
    for i in (0, 1):
        assert replies[i].status_code == 200, replies[i].data
        assert decrypted(replies[i].data, user) == [int(v) for v in classify_reference(service["model"], images[i])]
    health = s1.test_client().get("/v1/health").get_json()
    assert (health["running"], health["queue"]) == (0, 0)
    assert health["mean_query_seconds"] > 0  # what the next Retry-After is estimated from


def test_health_reports_the_pools_by_name_with_size_and_target(service):
    s1, s2 = service["s1"], service["s2"]
    health = s1.test_client().get("/v1/health").get_json()
    assert set(health["pools"]) == {"full", "levels"}  # as before: [size, target] per pool
    assert sorted(t for _, t in health["pools"]["levels"]) == sorted([POOL // 12, POOL])
    s1_pools = health["pool_detail"]
    assert set(s1_pools) == {"named", "user_keys", "filled", "workers"}
    assert s1_pools["named"]["paillier"]["target"] == POOL // 12
    assert "dgk" in s1_pools["named"]  # this S1 runs the DGK comparison, so it keeps DGK randomizers
    assert s1_pools["named"]["dgk"]["target"] == POOL
    for entry in s1_pools["named"].values():
        assert isinstance(entry["size"], int) and 0 <= entry["size"]
    assert wait_for(lambda: s1.test_client().get("/v1/health").get_json()["pools"]["full"])
    named = s1.test_client().get("/v1/health").get_json()["pool_detail"]["named"]
    assert named["paillier"]["size"] >= POOL // 12 and named["dgk"]["size"] >= POOL
    s2_health = s2.test_client().get("/v1/health").get_json()
    assert s2_health["pool_detail"]["named"]["paillier"]["target"] == POOL // 5
    assert isinstance(s2_health["running"], int)


def test_s2_fills_its_dgk_pool_only_after_a_dgk_comparison(small_pools, keys1024, tmp_path, service):
    # a fresh S2 (fresh pools) on the same keys: no comparison served yet, so its DGK pool stays off and empty
    cloud = KeyCloud(keys1024, DGKPublicKey.from_dict(service["cloud"].dgk_public.to_dict()),
                     service["cloud"].dgk_private)
    fresh = s2_app.create_app(S2Config(data_dir=tmp_path, cloud_token=CLOUD_TOKEN, key_bits=1024), key_cloud=cloud)
    try:
        assert wait_for(lambda: len(cloud.keys.public.pool) >= POOL // 5)  # Paillier fills meanwhile
        health = fresh.test_client().get("/v1/health").get_json()
        dgk = health["pool_detail"]["named"]["dgk"]
        assert dgk == {"size": 0, "target": 0, "active": False, "low_watermark": 0, "last_query_draw": None}
        assert health["dgk_comparisons_served"] is False
        assert len(cloud.dgk_public.pool) == 0
    finally:
        shutdown_app(fresh)
    # the service's S2 serves a query of S1, which runs the DGK comparison: its DGK pool is on and fills
    user, pixels = generate_keypair(1024), random_image(7)
    reply = classify(service["s1"], service["model_id"], query_message(pixels, service["cloud_key"], user))
    assert reply.status_code == 200, reply.data
    s2 = service["s2"]
    assert s2.test_client().get("/v1/health").get_json()["dgk_comparisons_served"] is True
    assert wait_for(lambda: s2.test_client().get("/v1/health").get_json()["pool_detail"]["named"]["dgk"]["size"] >= POOL)
    assert s2.test_client().get("/v1/health").get_json()["pool_detail"]["named"]["dgk"]["target"] == POOL


def test_an_ot_s1_keeps_no_dgk_pool_and_passes_its_comparison_to_every_context(small_pools, service, tmp_path):
    s2_url = service["s1"].extensions["he_cnn.s1.peer"].url
    config = S1Config(require_user_keys=False, data_dir=tmp_path, peer_url=s2_url, owner_token=OWNER_TOKEN, cloud_token=CLOUD_TOKEN,
                      precompute=False)
    assert config.comparison == DEFAULT_COMPARISON == "ot"
    app = s1_app.create_app(config)
    try:
        pools = app.test_client().get("/v1/health").get_json()["pool_detail"]
        assert set(pools["named"]) == {"paillier"}
        with app.extensions["he_cnn.s1.peer"].context() as ctx:
            assert ctx.comparison == "ot"
        with service["s1"].extensions["he_cnn.s1.peer"].context() as ctx:
            assert ctx.comparison == "dgk"
    finally:
        shutdown_app(app)


# -- the gate on its own ------------------------------------------------------------------------------

def test_the_gate_is_fifo_bounded_and_estimates_from_durations():
    gate = QueryGate(max_concurrent=1, max_queue=2, default_seconds=30.0)
    release = {i: threading.Event() for i in range(3)}
    started: list[int] = []

    def query(i: int) -> None:
        with gate.slot():
            started.append(i)
            release[i].wait(30)

    threads = [threading.Thread(target=query, args=(0,))]
    threads[0].start()
    assert wait_for(lambda: started == [0])
    for i in (1, 2):
        threads.append(threading.Thread(target=query, args=(i,)))
        threads[-1].start()
        assert wait_for(lambda i=i: gate.status()["queue"] == i)
    with pytest.raises(ServiceBusy) as refused:
        with gate.slot():
            pass
    assert refused.value.status == 429 and 1 <= refused.value.retry_after <= 30  # no durations yet: the default
    for i in range(3):
        release[i].set()
        assert wait_for(lambda i=i: len(started) == min(i + 2, 3))
    for t in threads:
        t.join(30)
    assert started == [0, 1, 2]
    assert gate.status() == {"queue": 0, "running": 0, "limits": {"max_concurrent": 1, "max_queue": 2},
                             "mean_query_seconds": gate.status()["mean_query_seconds"], "refused": 1}
    assert gate.status()["mean_query_seconds"] < 30  # measured durations replaced the default
    assert gate.retry_after() >= 1


# -- flags ------------------------------------------------------------------------------------------

def test_serve_s1_passes_comparison_and_limits_into_the_config(monkeypatch, tmp_path):
    built = []
    monkeypatch.setattr(s1_app, "create_app", lambda config: config)
    monkeypatch.setattr(serve_module, "_start", lambda role, build, *args: built.append(build()))
    env = {"HECNN_S1_CLOUD_TOKEN": CLOUD_TOKEN, "HECNN_S1_OWNER_TOKEN": OWNER_TOKEN}
    base = ["serve", "s1", "--data-dir", str(tmp_path), "--quiet"]
    assert CliRunner().invoke(main, base, env=env).exit_code == 0
    assert (built[-1].comparison, built[-1].max_concurrent, built[-1].max_queue) == \
        (DEFAULT_COMPARISON, DEFAULT_MAX_CONCURRENT, DEFAULT_MAX_QUEUE)
    result = CliRunner().invoke(main, base + ["--comparison", "dgk", "--max-concurrent", "3", "--max-queue", "0"], env=env)
    assert result.exit_code == 0, result.output
    assert (built[-1].comparison, built[-1].max_concurrent, built[-1].max_queue) == ("dgk", 3, 0)
    assert CliRunner().invoke(main, base, env={**env, "HECNN_S1_COMPARISON": "dgk"}).exit_code == 0
    assert built[-1].comparison == "dgk"
    assert CliRunner().invoke(main, base + ["--comparison", "paillier"], env=env).exit_code == 2  # not a choice


def test_the_limits_must_leave_a_request_thread_free(tmp_path):
    def config(**kwargs) -> S1Config:
        return S1Config(data_dir=tmp_path, peer_url="http://127.0.0.1:9", owner_token=OWNER_TOKEN,
                        cloud_token=CLOUD_TOKEN, **kwargs)

    config().validate()  # the defaults fit the default 8 threads
    config(threads=4, max_concurrent=1, max_queue=2).validate()
    with pytest.raises(BadRequest, match="request threads"):
        config(threads=4, max_concurrent=2, max_queue=2).validate()
    with pytest.raises(BadRequest, match="comparison"):
        config(comparison="yao").validate()
    with pytest.raises(BadRequest, match="at least 1"):
        config(max_concurrent=0).validate()
