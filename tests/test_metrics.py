"""``GET /metrics`` on both clouds: the Prometheus text format, parsed with the Prometheus parser, and the
counters moving during a real query (1024-bit keys, the trust tests' tiny model, about a second).

S2 runs under waitress in a thread with a key cloud whose rounds can be held, so the test scrapes S1
and S2 while a query is running, exactly then: no timing assertions. S1 is an app driven through its
test client. Each app has its own registry: the many apps of a test session never share a count.
"""
from __future__ import annotations

import threading

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families

import he_cnn
from he_cnn.crypto.paillier import generate_keypair
from he_cnn.crypto.tensor import EncryptedTensor
from he_cnn.graph.reference import classify_reference
from he_cnn.parties.compute_cloud import encrypt_model
from he_cnn.parties.key_cloud import KeyCloud
from he_cnn.servers import s1 as s1_app
from he_cnn.servers import s2 as s2_app
from he_cnn.servers.config import S1Config, S2Config
from he_cnn.servers.http import shutdown_app
from he_cnn.transport.http_channel import parse_public_key
from he_cnn.user.query import query_message
from he_cnn.wire import decode
from test_service_errors import start_server
from test_service_load import HeldRounds
from trust_support import random_image, tiny_model
from waiting import wait_for

CLOUD_TOKEN = "metrics-cloud-token-" + "c" * 16
OWNER_TOKEN = "metrics-owner-token-" + "o" * 16
WIRE = "application/octet-stream"
#: small pools: S1 Paillier 10 (a 12th), S2 Paillier 24 (a fifth), S2's DGK pool inactive (OT comparison)
POOL = 120
CLASSIFY = "/v1/models/<model_id>/classify"

Samples = dict[tuple[str, frozenset], float]


def scrape(client, accept: str | None = None) -> Samples:
    """Every sample of ``GET /metrics`` (no token), parsed by the Prometheus text parser."""
    response = client.get("/metrics", headers={"Accept": accept} if accept else {})
    assert response.status_code == 200, response.data[:300]
    assert response.mimetype == "text/plain"
    samples: Samples = {}
    for family in text_string_to_metric_families(response.get_data(as_text=True)):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sample ``name`` with exactly ``labels`` (0 if absent: a labelled series appears when first used)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples ``name`` whose labels include ``labels``."""
    return sum(v for (n, have), v in samples.items() if n == name and frozenset(labels.items()) <= have)


@pytest.fixture(scope="module")
def service(keys1024, tmp_path_factory):
    """S2 over real HTTP (rounds can be held), S1 as an app (no offline phase: only the query talks to S2),
    small randomness pools, the tiny model uploaded."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("HECNN_RANDOMNESS_POOL", str(POOL))
        cloud = KeyCloud.create(keys1024)
        held = HeldRounds(cloud)
        s2 = s2_app.create_app(S2Config(data_dir=tmp_path_factory.mktemp("s2"), cloud_token=CLOUD_TOKEN,
                                        key_bits=1024), key_cloud=cloud)
        server = start_server(s2)
        s2_url = f"http://127.0.0.1:{server.socket.getsockname()[1]}"
        s1 = s1_app.create_app(S1Config(require_user_keys=False, data_dir=tmp_path_factory.mktemp("s1"), peer_url=s2_url,
                                        owner_token=OWNER_TOKEN, cloud_token=CLOUD_TOKEN, peer_timeout=60.0,
                                        precompute=False))
    model = tiny_model()
    reply = s1.test_client().post("/v1/models", data=encrypt_model(model, keys1024.public).serialize(),
                                  headers={"Authorization": f"Bearer {OWNER_TOKEN}"}, content_type=WIRE)
    assert reply.status_code == 201, reply.data
    yield {"s1": s1, "s2": s2, "held": held, "model": model, "model_id": reply.get_json()["model_id"],
           "cloud_key": parse_public_key(s1.test_client().get("/v1/public-key").data)}
    held.armed = False
    held.release.set()
    shutdown_app(s1)
    shutdown_app(s2)
    server.close()


def test_metrics_move_during_a_query(service):
    s1, s2 = service["s1"].test_client(), service["s2"].test_client()
    held, model_id = service["held"], service["model_id"]
    user = generate_keypair(1024)
    pixels = random_image(7)
    body = query_message(pixels, service["cloud_key"], user)
    before1, before2 = scrape(s1), scrape(s2)
    replies = []

    held.release.clear()
    held.armed = True
    query = threading.Thread(target=lambda: replies.append(
        service["s1"].test_client().post(f"/v1/models/{model_id}/classify", data=body, content_type=WIRE)))
    query.start()
    try:
        assert wait_for(lambda: held.held >= 1)  # the query runs: S2 holds its first round
        during1, during2 = scrape(s1), scrape(s2)
        assert value(during1, "hecnn_queries_running") == 1 and value(during1, "hecnn_queries_waiting") == 0
        assert value(during1, "hecnn_http_requests_in_progress") == 2  # the query and this scrape
        assert value(during2, "hecnn_http_requests_in_progress") == 2  # the held round and this scrape
    finally:
        held.armed = False
        held.release.set()
        query.join(60)
    reply = replies[0]
    assert reply.status_code == 200, reply.data[:300]
    meta = decode(reply.data).meta
    cts = decode(reply.data).array("class_vector").reshape(-1)
    vector = EncryptedTensor.from_ciphertexts(user.public, cts, (cts.size,)).decrypt(user.private)
    assert [int(v) for v in vector] == [int(v) for v in classify_reference(service["model"], pixels)]

    after1, after2 = scrape(s1), scrape(s2)
    answered = {"route": CLASSIFY, "method": "POST", "code": "200"}
    assert value(after1, "hecnn_http_requests_total", **answered) - \
        value(before1, "hecnn_http_requests_total", **answered) == 1
    assert value(after1, "hecnn_queries_running") == 0
    moved = {name: value(after1, name, model=model_id) - value(before1, name, model=model_id)
             for name in ("hecnn_query_seconds_count", "hecnn_query_wait_seconds_count", "hecnn_query_rounds_count",
                          "hecnn_query_rounds_sum", "hecnn_query_seconds_sum")}
    assert moved["hecnn_query_seconds_count"] == moved["hecnn_query_wait_seconds_count"] == 1
    assert moved["hecnn_query_rounds_count"] == 1 and moved["hecnn_query_rounds_sum"] == meta["rounds"] > 0
    assert moved["hecnn_query_seconds_sum"] >= meta["seconds"] > 0
    for direction in ("to_s2", "to_s1"):
        grew = (value(after1, "hecnn_query_bytes_sum", model=model_id, direction=direction)
                - value(before1, "hecnn_query_bytes_sum", model=model_id, direction=direction))
        assert grew == meta[f"bytes_{direction}"] > 0
    # S2 served exactly the rounds S1 counted, and the same bytes each way (the OT link's one-time base OTs
    # were made during the upload's set-up, before the first scrape)
    assert total(after2, "hecnn_rounds_served_total") - total(before2, "hecnn_rounds_served_total") == meta["rounds"]
    for direction in ("to_s2", "to_s1"):
        served = total(after2, "hecnn_round_bytes_total", direction=direction) - \
            total(before2, "hecnn_round_bytes_total", direction=direction)
        assert served == meta[f"bytes_{direction}"]
    rounds_route = {"route": "/v1/rounds/<step>", "method": "POST", "code": "200"}
    assert value(after2, "hecnn_http_requests_total", **rounds_route) - \
        value(before2, "hecnn_http_requests_total", **rounds_route) == meta["rounds"]


def test_errors_are_counted_by_route_code_and_error(service):
    s1, s2 = service["s1"].test_client(), service["s2"].test_client()
    before1, before2 = scrape(s1), scrape(s2)
    assert s1.get("/v1/no/such/thing").status_code == 404
    secret_looking = "0123456789abcdef"
    assert s1.post(f"/v1/models/{secret_looking}/classify", data=b"HECN", content_type=WIRE).status_code == 404
    assert s2.post("/v1/rounds/smp", data=b"HECN", content_type=WIRE).status_code == 401  # no cloud token
    assert s1.open("/v1/health", method="BREW").status_code == 405
    after1, after2 = scrape(s1), scrape(s2)

    def moved(before: Samples, after: Samples, name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved(before1, after1, "hecnn_http_requests_total", route="unmatched", method="GET", code="404") == 1
    assert moved(before1, after1, "hecnn_http_errors_total", route="unmatched", method="GET", code="404",
                 error="not_found") == 1
    assert moved(before1, after1, "hecnn_http_errors_total", route=CLASSIFY, method="POST", code="404",
                 error=s1.post(f"/v1/models/{secret_looking}/classify").get_json()["error"]) == 1
    assert moved(before2, after2, "hecnn_http_errors_total", route="/v1/rounds/<step>", method="POST", code="401",
                 error="unauthorized") == 1
    assert moved(before1, after1, "hecnn_http_requests_total", route="unmatched", method="other", code="405") == 1
    # labels come from bounded sets: no path or method a client chose appears, nor a step S2 did not serve
    text = s1.get("/metrics").get_data(as_text=True) + s2.get("/metrics").get_data(as_text=True)
    assert secret_looking not in text and "/v1/no/such" not in text and "BREW" not in text


def test_metrics_need_no_token_and_report_pools_gate_and_role(service):
    s1, s2 = service["s1"].test_client(), service["s2"].test_client()
    samples1, samples2 = scrape(s1), scrape(s2)
    assert value(samples1, "hecnn_info", role="s1", version=he_cnn.__version__) == 1
    assert value(samples2, "hecnn_info", role="s2", version=he_cnn.__version__) == 1
    assert value(samples1, "hecnn_pool_target", pool="paillier") == POOL // 12
    assert value(samples2, "hecnn_pool_target", pool="paillier") == POOL // 5
    assert value(samples2, "hecnn_pool_target", pool="dgk") == 0  # inactive until a DGK comparison comes
    assert ("hecnn_pool_size", frozenset({("pool", "user_keys")})) in samples1
    config = service["s1"].extensions["he_cnn.s1.config"]
    assert value(samples1, "hecnn_query_limit", limit="max_concurrent") == config.max_concurrent
    assert value(samples1, "hecnn_query_limit", limit="max_queue") == config.max_queue
    assert ("hecnn_queries_refused_total", frozenset()) in samples1
    assert not any(name.startswith("hecnn_queries_") for name, _ in samples2)  # S2 has no query gate
    # a scraper that asks for OpenMetrics gets it
    response = s1.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert response.mimetype == "application/openmetrics-text"
    assert any(f.name == "hecnn_http_requests" for f in openmetrics_families(response.get_data(as_text=True)))


def test_each_app_counts_only_its_own_requests(keys1024, tmp_path, monkeypatch):
    monkeypatch.setenv("HECNN_RANDOMNESS_POOL", "0")
    cloud = KeyCloud.create(keys1024)
    apps = [s2_app.create_app(S2Config(data_dir=tmp_path / name, cloud_token=CLOUD_TOKEN, key_bits=1024),
                              key_cloud=KeyCloud(cloud.keys, cloud.dgk_public, cloud.dgk_private)) for name in "ab"]
    try:
        first, second = (app.test_client() for app in apps)
        for _ in range(3):
            assert first.get("/v1/public-key").status_code == 200
        labels = {"route": "/v1/public-key", "method": "GET", "code": "200"}
        assert value(scrape(first), "hecnn_http_requests_total", **labels) == 3
        assert value(scrape(second), "hecnn_http_requests_total", **labels) == 0
    finally:
        for app in apps:
            shutdown_app(app)

