"""A cloud's Prometheus metrics: ``GET /metrics`` in the Prometheus text format, one registry per app.

Each app owns a :class:`~prometheus_client.CollectorRegistry` (never the library's global one: one
process may build many apps, as the tests do, and each must count only its own requests). What is
counted, all prefixed ``hecnn_``:

- every request, by route, method and status code; error responses also by their he-cnn error code
  (``hecnn_http_requests_total``, ``hecnn_http_errors_total``), the time each took and how many are in
  progress. Every label value comes from a set the service bounds, never from the request as sent: the
  route is the URL rule (``/v1/models/<model_id>/classify``), not the path; an unknown method is
  ``other``; a model or a protocol step is named only once it was served;
- at S1, per classification: the time waiting in the query gate and the time running, by model, and
  the protocol rounds and bytes each way from the channel statistics the engine records per layer
  (:class:`~he_cnn.parties.compute_cloud.LayerStats`);
- at S2, the protocol rounds served and their bytes, by protocol step;
- read when scraped: the randomness pools (:mod:`servers.pools`) and, at S1, the queries running,
  waiting and refused by the :class:`~servers.http.QueryGate`.

``/metrics`` needs no token. It exposes counts and timings only (no key, token, pixel, score or class;
model ids are already public through ``GET /v1/models``); operators keep it from the public network
(scrape over an internal network, or have the TLS proxy not forward ``/metrics``).
"""
from __future__ import annotations

import time
from typing import Iterator

from flask import Flask, Response, g, request
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

import he_cnn

from .http import QueryGate
from .pools import PoolFiller

METRICS_PATH = "/metrics"
#: the route label of a request that matched no route (a 404 or 405 before any view ran)
UNMATCHED = "unmatched"
#: methods that get their own label value; any other (a client may send any token) is counted as "other",
#: so that no one can grow the number of series without bound
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

#: a 1024-bit query of a small model takes about a second, a 2048-bit ICNN query 5-10 s on two idle
#: cores, and minutes on a busy small machine
QUERY_SECONDS_BUCKETS = (0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
WAIT_SECONDS_BUCKETS = (0.01, 0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
REQUEST_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
ROUNDS_BUCKETS = (5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0)
#: 64 KiB to 1 GiB, by factors of 4
BYTES_BUCKETS = tuple(float(4 ** k) for k in range(8, 16))


class CloudMetrics:
    """One cloud's metrics in its own registry; :func:`install` hooks them into an app."""

    def __init__(self, role: str, pools: PoolFiller | None = None, gate: QueryGate | None = None):
        self.role = role
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("hecnn_http_requests", "HTTP requests answered, by route, method and status code",
                                ["route", "method", "code"], registry=r)
        self.errors = Counter("hecnn_http_errors", "HTTP error responses (status >= 400), by route, method, status "
                              "code and he-cnn error code", ["route", "method", "code", "error"], registry=r)
        self.request_seconds = Histogram("hecnn_http_request_duration_seconds", "Time to answer a request, by route",
                                         ["route", "method"], buckets=REQUEST_SECONDS_BUCKETS, registry=r)
        self.in_progress = Gauge("hecnn_http_requests_in_progress", "Requests being answered now", registry=r)
        self.query_seconds = Histogram("hecnn_query_seconds", "S1: a classification from admission to answer, "
                                       "by model", ["model"], buckets=QUERY_SECONDS_BUCKETS, registry=r)
        self.query_wait = Histogram("hecnn_query_wait_seconds", "S1: time a classification waited in the query "
                                    "gate before it ran, by model", ["model"], buckets=WAIT_SECONDS_BUCKETS, registry=r)
        self.query_rounds = Histogram("hecnn_query_rounds", "S1: protocol rounds with S2 per classification, by model",
                                      ["model"], buckets=ROUNDS_BUCKETS, registry=r)
        self.query_bytes = Histogram("hecnn_query_bytes", "S1: protocol bytes per classification, by model and "
                                     "direction (to_s2, to_s1)", ["model", "direction"], buckets=BYTES_BUCKETS,
                                     registry=r)
        self.rounds_served = Counter("hecnn_rounds_served", "S2: protocol rounds answered, by step", ["step"],
                                     registry=r)
        self.round_bytes = Counter("hecnn_round_bytes", "S2: protocol bytes of the rounds answered, by step and "
                                   "direction (to_s2: requests, to_s1: replies)", ["step", "direction"], registry=r)
        info = Gauge("hecnn_info", "Always 1: the cloud's role and the he-cnn version", ["role", "version"], registry=r)
        info.labels(role, he_cnn.__version__).set(1)
        r.register(_StateCollector(pools, gate))

    def observe_query(self, model: str, *, waited: float, seconds: float, rounds: int, bytes_to_s2: int,
                      bytes_to_s1: int) -> None:
        """S1: one classification answered."""
        self.query_wait.labels(model).observe(waited)
        self.query_seconds.labels(model).observe(seconds)
        self.query_rounds.labels(model).observe(rounds)
        self.query_bytes.labels(model, "to_s2").observe(bytes_to_s2)
        self.query_bytes.labels(model, "to_s1").observe(bytes_to_s1)

    def observe_round(self, step: str, received: int, sent: int) -> None:
        """S2: one protocol round answered (``step`` is a known step: unknown ones fail before this)."""
        self.rounds_served.labels(step).inc()
        self.round_bytes.labels(step, "to_s2").inc(received)
        self.round_bytes.labels(step, "to_s1").inc(sent)

    # -- the request hooks ------------------------------------------------------------------------
    def _request_started(self) -> None:
        g.hecnn_metrics_started = time.perf_counter()
        self.in_progress.inc()

    def _request_answered(self, response: Response) -> Response:
        route = request.url_rule.rule if request.url_rule is not None else UNMATCHED
        method = request.method if request.method in METHODS else "other"
        code = str(response.status_code)
        self.requests.labels(route, method, code).inc()
        if response.status_code >= 400:
            self.errors.labels(route, method, code, _error_code(response)).inc()
        started = g.get("hecnn_metrics_started")
        if started is not None:
            self.request_seconds.labels(route, method).observe(time.perf_counter() - started)
        return response

    def _request_finished(self, _error: BaseException | None = None) -> None:
        if g.pop("hecnn_metrics_started", None) is not None:
            self.in_progress.dec()

    def scrape(self) -> Response:
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        return Response(encoder(self.registry), mimetype=None, content_type=content_type)


def _error_code(response: Response) -> str:
    """The ``error`` field of a JSON error body (every error the apps send has one), else ``none``."""
    body = response.get_json(silent=True) if response.is_json else None
    code = body.get("error") if isinstance(body, dict) else None
    return code if isinstance(code, str) else "none"


class _StateCollector(Collector):
    """What is read when scraped rather than counted: pool levels and the query gate."""

    def __init__(self, pools: PoolFiller | None, gate: QueryGate | None):
        self._pools = pools
        self._gate = gate

    def collect(self) -> Iterator[Metric]:
        if self._pools is not None:
            yield from _pool_metrics(self._pools)
        if self._gate is not None:
            yield from _gate_metrics(self._gate)


def _pool_metrics(filler: PoolFiller) -> Iterator[Metric]:
    detail = filler.detail()
    size = GaugeMetricFamily("hecnn_pool_size", "Precomputed randomizers in a pool (user_keys: all users' "
                             "pools together)", labels=["pool"])
    target = GaugeMetricFamily("hecnn_pool_target", "The size a pool is filled to (0 while inactive)", labels=["pool"])
    low = GaugeMetricFamily("hecnn_pool_low_watermark", "Below it a pool is filled while queries run (one "
                            "query's draw)", labels=["pool"])
    for name, pool in detail["named"].items():
        size.add_metric([name], pool["size"])
        target.add_metric([name], pool["target"])
        low.add_metric([name], pool["low_watermark"])
    size.add_metric(["user_keys"], detail["user_keys"]["size"])
    target.add_metric(["user_keys"], detail["user_keys"]["target"])
    yield from (size, target, low)
    yield GaugeMetricFamily("hecnn_user_keys", "User public keys kept (each with its randomizer pool)",
                            value=detail["user_keys"]["keys"])
    filled = CounterMetricFamily("hecnn_pool_filled_values", "Randomizers added to the pools, while the cloud was "
                                 "idle and while requests ran", labels=["mode"])
    for mode, count in detail["filled"].items():
        filled.add_metric([mode], count)
    yield filled
    yield GaugeMetricFamily("hecnn_workers", "Worker processes of the cloud", value=detail["workers"])


def _gate_metrics(gate: QueryGate) -> Iterator[Metric]:
    status = gate.status()
    yield GaugeMetricFamily("hecnn_queries_running", "S1: classifications running", value=status["running"])
    yield GaugeMetricFamily("hecnn_queries_waiting", "S1: classifications waiting in the query gate",
                            value=status["queue"])
    yield CounterMetricFamily("hecnn_queries_refused", "S1: classifications refused with 429 (gate full)",
                              value=status["refused"])
    limits = GaugeMetricFamily("hecnn_query_limit", "S1: the query gate's limits", labels=["limit"])
    for name, value in status["limits"].items():
        limits.add_metric([name], value)
    yield limits


def install(app: Flask, role: str, pools: PoolFiller | None = None, gate: QueryGate | None = None) -> CloudMetrics:
    """Give ``app`` its metrics: the request hooks and ``GET /metrics`` (no token; see the module docstring)."""
    metrics = CloudMetrics(role, pools, gate)
    app.before_request(metrics._request_started)
    app.after_request(metrics._request_answered)
    app.teardown_request(metrics._request_finished)
    app.add_url_rule(METRICS_PATH, "metrics", metrics.scrape, methods=["GET"])
    app.extensions["he_cnn.metrics"] = metrics
    return metrics
