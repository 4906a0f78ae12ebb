"""What both Flask apps share: JSON errors with the right status, bearer tokens, wire responses.

Every error leaves a cloud as ``{"error": code, "message": one line}``. The code and status of a he-cnn
error are its class's ``code`` and ``status`` (:mod:`he_cnn.errors` holds them all). An error that S2
sent back to S1 (tagged ``peer_code`` by :class:`~he_cnn.transport.http_channel.HTTPChannel`) becomes
:class:`~he_cnn.errors.PeerError` (502), unless its class is ``relayed_as_is`` (a violated bound, 422,
is about the request, not the peer). Anything unexpected is logged with its traceback on the server
and answered with a bare 500, never a traceback. Tokens are compared in constant time and never
logged or echoed.
"""
from __future__ import annotations

import hmac
import logging

from flask import Flask, Response, current_app, jsonify, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge, Unauthorized

from he_cnn.errors import BadRequest, HECNNError, PeerError
from he_cnn.transport.http_channel import WIRE_CONTENT_TYPE
from he_cnn.parallel import Workers

MAX_MESSAGE_CHARS = 500

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


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(HTTPException)
    def http_error(e: HTTPException) -> Response:
        message = e.description or e.name
        if isinstance(e, RequestEntityTooLarge):
            message = f"request body is larger than the limit of {current_app.config['MAX_CONTENT_LENGTH']} bytes"
        headers = {"WWW-Authenticate": "Bearer"} if isinstance(e, Unauthorized) else None
        return error_response(e.code or 500, _http_code(e), message, headers)

    @app.errorhandler(HECNNError)
    def he_cnn_error(e: HECNNError) -> Response:
        status, code = status_of(e)
        if status >= 500:
            log.warning("%s %s -> %d %s: %s", request.method, request.path, status, code, one_line(str(e)))
        return error_response(status, code, str(e))

    @app.errorhandler(Exception)
    def unexpected(e: Exception) -> Response:
        log.exception("unexpected error in %s %s", request.method, request.path)
        return error_response(500, "internal_error", "internal server error (details are in the server log)")


def require_bearer(expected: str, what: str) -> None:
    """Abort with 401 unless the request carries ``Authorization: Bearer <expected>``."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized(f"this endpoint needs the {what} as 'Authorization: Bearer <token>'")
    if not hmac.compare_digest(token.strip().encode(), expected.encode()):
        raise Unauthorized(f"wrong {what}")


def wire_response(data: bytes, status: int = 200) -> Response:
    return Response(data, status=status, mimetype=WIRE_CONTENT_TYPE)


def request_body() -> bytes:
    """The raw body (the size limit is enforced by Flask's MAX_CONTENT_LENGTH)."""
    data = request.get_data(cache=False)
    if not data:
        raise BadRequest("empty request body: expected a he-cnn wire message")
    return data


def _ready() -> None:
    """A no-op task that makes the pool fork its workers."""


def worker_pool(count: int) -> Workers:
    """The cloud's process pool, forked now, while the process has no other threads (fork is safe then)."""
    workers = Workers(count)
    if workers.count > 1:
        workers.map(_ready, [()] * workers.count)
    return workers


def new_app(import_name: str, max_body_bytes: int) -> Flask:
    """A Flask app with the body limit and the JSON error handlers both clouds use."""
    app = Flask(import_name)
    app.config["MAX_CONTENT_LENGTH"] = max_body_bytes
    app.json.sort_keys = False  # type: ignore[attr-defined]
    register_error_handlers(app)
    return app


def shutdown_app(app: Flask) -> None:
    """Stop what an app started besides its request threads (background work, worker processes)."""
    for name in ("he_cnn.s1.offline", "he_cnn.pools", "he_cnn.workers"):
        if name in app.extensions:
            app.extensions[name].shutdown()
