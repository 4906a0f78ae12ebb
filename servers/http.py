"""What both Flask apps share: JSON errors with the right status, bearer tokens, wire bodies.

Every error leaves a cloud as ``{"error": code, "message": one line}`` (a 429 ``service_busy`` also with
a ``Retry-After`` header). The code and status of a he-cnn
error are its class's ``code`` and ``status`` (:mod:`he_cnn.errors` holds them all). An error that S2
sent back to S1 (tagged ``peer_code`` by :class:`~he_cnn.transport.http_channel.HTTPChannel`) becomes
:class:`~he_cnn.errors.PeerError` (502), unless its class is ``relayed_as_is`` (a violated bound, 422,
is about the request, not the peer). Anything unexpected is logged with its traceback on the server
and answered with a bare 500, never a traceback. A 404 names the path no route matched (and lists the
routes), a 405 the methods the route answers; a wire body of another Content-Type gets 415. Tokens are
compared in constant time and never logged or echoed. :class:`QueryGate` bounds the queries a service
runs at once and the queue before them.
"""
from __future__ import annotations

import hmac
import logging
import math
import threading
import time
from collections import deque
from contextlib import contextmanager
from typing import Iterator

from flask import Flask, Response, current_app, jsonify, request
from werkzeug.exceptions import (HTTPException, MethodNotAllowed, NotFound, RequestEntityTooLarge, Unauthorized,
                                 UnsupportedMediaType)

from he_cnn.errors import BadRequest, HECNNError, PeerError, ServiceBusy
from he_cnn.transport.http_channel import WIRE_CONTENT_TYPE
from he_cnn.parallel import Workers
from he_cnn.ray_workers import KeyLoader, RayWorkers

MAX_MESSAGE_CHARS = 500
#: how much of a request's path an error message quotes
MAX_PATH_CHARS = 200

log = logging.getLogger("he_cnn.servers")


def one_line(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= MAX_MESSAGE_CHARS else text[:MAX_MESSAGE_CHARS - 3] + "..."


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
    response = jsonify({"error": code, "message": one_line(message)})
    response.status_code = status
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def status_of(error: HECNNError) -> tuple[int, str]:
    """HTTP status and error code for a he-cnn error, raised here or relayed from the peer."""
    if getattr(error, "peer_code", None) is not None and not error.relayed_as_is:
        return PeerError.status, PeerError.code
    return error.status, error.code


def _http_code(e: HTTPException) -> str:
    if isinstance(e, RequestEntityTooLarge):
        return "body_too_large"
    return "_".join((e.name or "http_error").lower().replace("'", "").split())


def _quoted_path() -> str:
    path = request.path
    return repr(path if len(path) <= MAX_PATH_CHARS else path[:MAX_PATH_CHARS] + "...")


def _routes() -> str:
    """The app's routes, for a 404 that says what there is instead: each family once, by its first two
    segments (``/v1/models/...``), so that the list stays short as the service grows."""
    families = set()
    for rule in current_app.url_map.iter_rules():
        if rule.endpoint != "static":
            parts = rule.rule.strip("/").split("/")
            families.add("/" + "/".join(parts[:2]) + ("/..." if len(parts) > 2 else ""))
    return ", ".join(sorted(families))


def _http_message(e: HTTPException) -> tuple[str, dict[str, str] | None]:
    """The one-line message and extra headers of a werkzeug error: what was not found, not allowed, too large."""
    if isinstance(e, RequestEntityTooLarge):
        return f"request body is larger than the limit of {current_app.config['MAX_CONTENT_LENGTH']} bytes", None
    if isinstance(e, Unauthorized):
        return e.description or e.name, {"WWW-Authenticate": "Bearer"}
    if isinstance(e, NotFound) and request.url_rule is None:  # no route matched (a view's own 404 says more)
        return f"no route for {_quoted_path()} on this service; its routes are {_routes()}", None
    if isinstance(e, MethodNotAllowed) and e.valid_methods:
        allowed = ", ".join(sorted(e.valid_methods))
        return f"{request.method} is not allowed on {_quoted_path()}; it answers {allowed}", {"Allow": allowed}
    return e.description or e.name, None


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(HTTPException)
    def http_error(e: HTTPException) -> Response:
        message, headers = _http_message(e)
        return error_response(e.code or 500, _http_code(e), message, headers)

    @app.errorhandler(HECNNError)
    def he_cnn_error(e: HECNNError) -> Response:
        status, code = status_of(e)
        if status >= 500:
            log.warning("%s %s -> %d %s: %s", request.method, request.path, status, code, one_line(str(e)))
        retry_after = getattr(e, "retry_after", None)
        headers = {"Retry-After": str(int(retry_after))} if status == 429 and retry_after is not None else None
        return error_response(status, code, str(e), headers)

    @app.errorhandler(Exception)
    def unexpected(e: Exception) -> Response:
        log.exception("unexpected error in %s %s", request.method, request.path)
        return error_response(500, "internal_error", "internal server error (details are in the server log)")


def bearer_token(missing: str) -> str:
    """The token of the request's ``Authorization: Bearer <token>``; 401 saying ``missing`` without one."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized(missing)
    return token.strip()


def require_bearer(expected: str, what: str) -> None:
    """Abort with 401 unless the request carries ``Authorization: Bearer <expected>``."""
    token = bearer_token(f"this endpoint needs the {what} as 'Authorization: Bearer <token>'")
    if not hmac.compare_digest(token.encode(), expected.encode()):
        raise Unauthorized(f"wrong {what}")


def require_owner() -> None:
    """Abort with 401 unless the request carries S1's owner token."""
    require_bearer(current_app.extensions["he_cnn.s1.config"].owner_token, "owner token")


def wire_response(data: bytes, status: int = 200) -> Response:
    return Response(data, status=status, mimetype=WIRE_CONTENT_TYPE)


def request_body() -> bytes:
    """The raw body of a wire endpoint (the size limit is enforced by Flask's MAX_CONTENT_LENGTH).

    A body declared as anything but :data:`WIRE_CONTENT_TYPE` (parameters aside) is refused with 415
    before it is read; a body without a Content-Type is taken as wire bytes (plain HTTP clients such as
    ``requests`` send none for raw bytes), and the wire decoder judges it.
    """
    declared = request.mimetype
    if declared and declared != WIRE_CONTENT_TYPE:
        raise UnsupportedMediaType(f"request body is declared as {declared[:80]!r}; send a he-cnn wire message "
                                   f"as {WIRE_CONTENT_TYPE}")
    data = request.get_data(cache=False)
    if not data:
        raise BadRequest("empty request body: expected a he-cnn wire message")
    return data


def _ready() -> None:
    """A no-op task that makes the pool fork its workers."""


def worker_pool(count: int, ray_address: str | None = None, role: str = "s1", key_loader: KeyLoader | None = None,
                key_id: str | None = None) -> Workers:
    """The cloud's workers: with ``ray_address``, actors on the cloud's own Ray cluster (S2's load its key
    with ``key_loader``, :mod:`he_cnn.ray_workers`); else a process pool, forked now, while the process has
    no other threads (fork is safe then)."""
    if ray_address is not None:
        return RayWorkers(ray_address, role, key_loader=key_loader, key_id=key_id)
    workers = Workers(count)
    if workers.count > 1:
        workers.map(_ready, [()] * workers.count)
    return workers


def new_app(import_name: str, max_body_bytes: int) -> Flask:
    """A Flask app with the body limit and the JSON error handlers both clouds use."""
    app = Flask(import_name)
    # a path with "//" is an unknown route (404 JSON), not a redirect to the merged path: a 308 would
    # send a client's body and token to wherever werkzeug's guess leads
    app.url_map.merge_slashes = False
    app.config["MAX_CONTENT_LENGTH"] = max_body_bytes
    app.json.sort_keys = False  # type: ignore[attr-defined]
    register_error_handlers(app)
    return app


def shutdown_app(app: Flask) -> None:
    """Stop what an app started besides its request threads (background work, worker processes)."""
    for name in ("he_cnn.s1.offline", "he_cnn.s1.gallery_preparer", "he_cnn.pools", "he_cnn.workers"):
        if name in app.extensions:
            app.extensions[name].shutdown()


#: what a query is assumed to take before the gate has seen one finish (a 2048-bit ICNN query on an idle
#: 2-core machine takes 6-11 s; the estimate is replaced by measured durations as soon as there are some)
DEFAULT_QUERY_SECONDS = 10.0
#: finished queries whose durations the Retry-After estimate averages
DURATION_HISTORY = 16


class _Ticket:
    """A place in the gate: waiting (``granted`` unset) or running since ``started``."""

    __slots__ = ("granted", "started")

    def __init__(self) -> None:
        self.granted = threading.Event()
        self.started = 0.0


class QueryGate:
    """At most ``max_concurrent`` queries at once, at most ``max_queue`` more waiting (first come, first
    served); any further one is refused at once with :class:`~he_cnn.errors.ServiceBusy` (429).

    Never an unbounded queue: a waiting query holds a request thread, so the service's configuration
    keeps ``max_concurrent + max_queue`` below its thread count (``S1Config.validate``), and requests
    beyond the gate's capacity are answered rather than piling up in the WSGI server. A finishing query
    hands its place directly to the longest-waiting one, so a newcomer never overtakes the queue.

    ``retry_after`` for a refused query is an honest estimate from the durations of the last
    ``DURATION_HISTORY`` queries (``DEFAULT_QUERY_SECONDS`` before any): the time until the running query
    that started first is expected to finish -- then the head of the queue moves up and a waiting place
    frees, which is all a retry needs to be admitted. The refusal's message adds the expected wait for a
    query admitted then (its queue position over ``max_concurrent``, times the mean duration).
    """

    def __init__(self, max_concurrent: int, max_queue: int, default_seconds: float = DEFAULT_QUERY_SECONDS):
        if max_concurrent < 1 or max_queue < 0:
            raise ValueError(f"max_concurrent must be >= 1 and max_queue >= 0, got {max_concurrent}, {max_queue}")
        self.max_concurrent = max_concurrent
        self.max_queue = max_queue
        self.default_seconds = default_seconds
        self._lock = threading.Lock()
        self._running: list[_Ticket] = []
        self._waiting: deque[_Ticket] = deque()
        self._durations: deque[float] = deque(maxlen=DURATION_HISTORY)
        self.refused = 0

    @contextmanager
    def slot(self) -> Iterator[None]:
        """Run the body as one of the admitted queries; raises ServiceBusy if the gate is full."""
        ticket = self._admit()
        try:
            yield
        finally:
            self._release(ticket)

    def _admit(self) -> _Ticket:
        ticket = _Ticket()
        with self._lock:
            if len(self._running) < self.max_concurrent and not self._waiting:
                ticket.started = time.monotonic()
                self._running.append(ticket)
                return ticket
            if len(self._waiting) >= self.max_queue:
                self.refused += 1
                wait = self._retry_after_locked()
                served = (len(self._waiting) + 1) / self.max_concurrent * self._mean_locked()
                raise ServiceBusy(f"the service is busy: {len(self._running)} queries running, "
                                  f"{len(self._waiting)} waiting (the limits are {self.max_concurrent} and "
                                  f"{self.max_queue}); retry in {wait} s (a query admitted then waits about "
                                  f"{math.ceil(served)} s before it runs)", retry_after=wait)
            self._waiting.append(ticket)
        ticket.granted.wait()  # _release hands the place over and sets started
        return ticket

    def _release(self, ticket: _Ticket) -> None:
        with self._lock:
            now = time.monotonic()
            self._running.remove(ticket)
            self._durations.append(now - ticket.started)
            if self._waiting:
                head = self._waiting.popleft()
                head.started = now
                self._running.append(head)
                head.granted.set()

    def _mean_locked(self) -> float:
        return sum(self._durations) / len(self._durations) if self._durations else self.default_seconds

    def _retry_after_locked(self) -> int:
        mean, now = self._mean_locked(), time.monotonic()
        remaining = min((max(0.0, mean - (now - t.started)) for t in self._running), default=0.0)
        return max(1, math.ceil(remaining))

    def retry_after(self) -> int:
        """Seconds until a place is expected to free up (what a refusal would say now)."""
        with self._lock:
            return self._retry_after_locked()

    def status(self) -> dict:
        """For the health endpoint: queries waiting and running, the limits, and the mean duration."""
        with self._lock:
            return {"queue": len(self._waiting), "running": len(self._running),
                    "limits": {"max_concurrent": self.max_concurrent, "max_queue": self.max_queue},
                    "mean_query_seconds": round(self._mean_locked(), 3) if self._durations else None,
                    "refused": self.refused}
