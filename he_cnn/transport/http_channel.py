"""The HTTP channel: S1's link to the S2 service, plus the small HTTP vocabulary both clouds share.

:class:`HTTPChannel` is the network twin of :class:`~he_cnn.transport.channel.InProcessChannel`: one protocol
round is one ``POST {peer}/v1/rounds/{step}`` whose body and reply are the same wire bytes the
in-process channel hands over, so protocol code cannot tell the two apart. Failures come back as our
own exceptions: an unreachable or silent peer is :class:`PeerUnavailable`, whose message says in plain
words which cloud failed, how (refused, closed the connection, timed out, TLS, unknown host) and what to
check; a JSON error body from the peer (``{"error": code, "message": ...}``) is re-raised as the he-cnn
error class with that code (:func:`he_cnn.errors.error_classes`), carrying the peer's message and tagged
with ``peer``, ``peer_code``, ``peer_status`` and ``peer_message`` so the caller knows it was the peer that
refused (:func:`he_cnn.console.describe_failure` says an error S1 reports about S2 in words for a person).
The cloud public key travels as a wire message too (:func:`public_key_message` / :func:`parse_public_key`),
so S2, S1 and clients agree on one format.

TLS: every request takes ``tls_ca`` (a CA bundle, or a self-signed server certificate, that the server's
certificate must chain to; requests' ``verify``; None for the system's CAs) and ``client_cert`` (a
``(certificate, key)`` pair that S1 presents to S2 for mutual TLS; requests' ``cert``).
"""
from __future__ import annotations

import http.client
import re
import socket
import ssl
from dataclasses import dataclass

import numpy as np
import requests
from gmpy2 import mpz

from he_cnn import errors
from he_cnn.transport.channel import Channel
from he_cnn.crypto.dgk import DGKPublicKey
from he_cnn.errors import HECNNError, PeerUnavailable, ProtocolError, WireFormatError
from he_cnn.crypto.paillier import PublicKey
from he_cnn.wire import Message, decode, encode

DEFAULT_TIMEOUT = 120.0
ROUNDS_PATH = "/v1/rounds/"
PUBLIC_KEY_PATH = "/v1/public-key"
#: S1's answer to "is this the owner token?", a request with no effect (the owner asks before its work)
OWNER_CHECK_PATH = "/v1/owner/check"
WIRE_CONTENT_TYPE = "application/octet-stream"


def error_from_response(response: requests.Response, peer: str) -> HECNNError:
    """The he-cnn exception a non-2xx JSON error reply stands for (``ProtocolError`` if unknown).

    The returned exception has ``peer`` (who answered), ``peer_code`` (the peer's ``error`` field),
    ``peer_status`` (its HTTP status) and ``peer_message`` (its message) attributes.
    """
    try:
        body = response.json()
        code, message = str(body["error"]), str(body["message"])
    except (ValueError, KeyError, TypeError):
        code = "http_error"
        message = f"HTTP {response.status_code} without a JSON error body"
    cls = errors.error_classes().get(code, ProtocolError)
    err = cls(f"{peer}: {message}")
    err.peer = peer  # type: ignore[attr-defined]
    err.peer_code = code  # type: ignore[attr-defined]
    err.peer_status = response.status_code  # type: ignore[attr-defined]
    err.peer_message = message  # type: ignore[attr-defined]
    return err


def http_request(method: str, url: str, peer: str, timeout: float, *, token: str | None = None,
                 data: bytes | None = None, session: requests.Session | None = None,
                 content_type: str = WIRE_CONTENT_TYPE, tls_ca: str | None = None,
                 client_cert: tuple[str, str] | None = None) -> requests.Response:
    """One HTTP request to a he-cnn service; a 2xx response, or the he-cnn error the failure stands for.

    ``peer`` names the service in messages ("S2 at http://... is unreachable: connection refused (...)").
    ``tls_ca`` and ``client_cert`` as in the module's docstring; left out, a ``session``'s own settings hold.
    """
    headers = {}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if data is not None:
        headers["Content-Type"] = content_type
    try:
        response = (session or requests).request(method, url, data=data, headers=headers, timeout=timeout,
                                                 **tls_options(tls_ca, client_cert))
    except requests.RequestException as e:
        raise PeerUnavailable(transport_failure(peer, url, e, timeout)) from e
    if not 200 <= response.status_code < 300:
        raise error_from_response(response, peer)
    return response


def tls_options(tls_ca: str | None = None, client_cert: tuple[str, str] | None = None) -> dict[str, object]:
    """requests' ``verify`` and ``cert`` keywords for these settings, only those given (a request's
    ``verify=True`` would override its session's CA). Passed with each request rather than set on a
    session: requests lets ``REQUESTS_CA_BUNDLE`` override a session's ``verify``, not a request's."""
    options: dict[str, object] = {}
    if tls_ca:
        options["verify"] = str(tls_ca)
    if client_cert:
        options["cert"] = (str(client_cert[0]), str(client_cert[1]))
    return options


class HTTPChannel(Channel):
    """Posts each protocol round to the S2 service at ``peer_url`` with the cloud token (over mutual TLS
    when ``tls_ca`` / ``client_cert`` are given)."""

    def __init__(self, peer_url: str, token: str, timeout: float = DEFAULT_TIMEOUT,
                 session: requests.Session | None = None, tls_ca: str | None = None,
                 client_cert: tuple[str, str] | None = None):
        super().__init__()
        self.peer_url = peer_url.rstrip("/")
        self.timeout = timeout
        self._token = token
        self._session = session or requests.Session()
        self._tls_ca = tls_ca
        self._client_cert = client_cert

    def __repr__(self) -> str:  # never show the token
        return f"HTTPChannel(peer_url={self.peer_url!r}, timeout={self.timeout})"

    def _exchange(self, step: str, payload: bytes) -> bytes:
        with self.tracer.op("s2_http"):  # S2's work and the network, seen from S1
            return http_request("POST", f"{self.peer_url}{ROUNDS_PATH}{step}", "S2", self.timeout,
                                token=self._token, data=payload, session=self._session, tls_ca=self._tls_ca,
                                client_cert=self._client_cert).content

    def close(self) -> None:
        self._session.close()


@dataclass(frozen=True)
class CloudPublicKey:
    """What the clouds publish: the Paillier public key and the DGK public key for comparisons."""

    paillier: PublicKey
    dgk: DGKPublicKey

    @property
    def key_id(self) -> str:
        return self.paillier.key_id


def public_key_message(paillier: PublicKey, dgk: DGKPublicKey) -> bytes:
    """The wire bytes of ``GET /v1/public-key``: meta {key_id, bits, dgk: {u, t}}, arrays n, dgk_n/g/h."""
    msg = Message(meta={"key_id": paillier.key_id, "bits": paillier.bits, "dgk": {"u": dgk.u, "t": dgk.t}})
    for name, value in (("n", paillier.n), ("dgk_n", dgk.n), ("dgk_g", dgk.g), ("dgk_h", dgk.h)):
        arr = np.empty(1, dtype=object)
        arr[0] = mpz(value)
        msg.arrays[name] = arr
    return encode(msg)


def parse_public_key(data: bytes) -> CloudPublicKey:
    """Inverse of :func:`public_key_message`; checks that the advertised key id matches the modulus."""
    msg = decode(data)

    def single(name: str) -> mpz:
        arr = msg.array(name).reshape(-1)
        if arr.size != 1:
            raise WireFormatError(f"public key field {name!r} must hold one integer, got {arr.size}")
        return mpz(arr[0])

    dgk_meta = msg.get("dgk", dict)
    try:
        paillier = PublicKey(single("n"))
        dgk = DGKPublicKey.from_dict({"n": single("dgk_n"), "g": single("dgk_g"), "h": single("dgk_h"),
                                      "u": dgk_meta["u"], "t": dgk_meta["t"]})
    except KeyError as e:
        raise WireFormatError(f"public key message lacks DGK parameter {e}") from e
    if msg.get("key_id", str) != paillier.key_id:
        raise WireFormatError(f"public key message claims id {msg.meta['key_id']!r}, "
                              f"but its modulus has id {paillier.key_id!r}")
    return CloudPublicKey(paillier, dgk)


def fetch_public_key(base_url: str, timeout: float = 30.0, session: requests.Session | None = None,
                     peer: str = "server", tls_ca: str | None = None,
                     client_cert: tuple[str, str] | None = None) -> tuple[CloudPublicKey, bytes]:
    """``GET {base_url}/v1/public-key``: the parsed key and the raw bytes (for relaying)."""
    response = http_request("GET", base_url.rstrip("/") + PUBLIC_KEY_PATH, peer, timeout, session=session,
                            tls_ca=tls_ca, client_cert=client_cert)
    return parse_public_key(response.content), response.content


def transport_failure(peer: str, url: str, error: requests.RequestException, timeout: float) -> str:
    """What went wrong on the way to ``peer``, in one sentence that says what to check.

    requests wraps urllib3's errors, which wrap the socket's: the cause is looked for in the whole chain.
    """
    base = url.split("/v1/", 1)[0]
    where = f"{peer} at {base}"
    causes = _causes(error)

    def caused_by(*kinds: type[BaseException]) -> bool:
        return any(isinstance(c, kinds) for c in causes)

    if caused_by(requests.exceptions.InvalidURL, requests.exceptions.InvalidSchema, requests.exceptions.MissingSchema):
        return f"{peer}'s URL {base!r} is not valid (expected http://host:port or https://host:port)"
    tls = next((c for c in causes if isinstance(c, ssl.SSLError)), None)
    if tls is not None or isinstance(error, requests.exceptions.SSLError):
        reason = getattr(tls, "reason", None)  # OpenSSL's code, e.g. WRONG_VERSION_NUMBER (plain HTTP answered)
        detail = (getattr(tls, "verify_message", None) or (reason and reason.replace("_", " ").lower())
                  or _one_line(tls or error))
        if getattr(tls, "verify_message", None):  # the server's certificate is not one this client trusts
            return (f"{where} is unreachable: the TLS handshake failed: {detail} (pass the CA that signed "
                    f"{peer}'s certificate: --tls-ca or HECNN_TLS_CA; S1 to S2: --peer-ca)")
        return (f"{where} is unreachable: the TLS handshake failed: {detail} (check the URL's scheme and the "
                "certificates)")
    if caused_by(socket.gaierror):
        return f"{where} is unreachable: unknown host name (check the URL)"
    if caused_by(ConnectionRefusedError):
        return f"{where} is unreachable: connection refused (is {peer} running, and is the URL right?)"
    if isinstance(error, requests.ConnectTimeout):
        return f"{where} did not accept a connection within {timeout:g} s (is {peer} running, and is the URL right?)"
    if isinstance(error, requests.Timeout):
        return f"{where} did not answer within {timeout:g} s (overloaded or stuck? try again later)"
    if caused_by(ConnectionResetError, ConnectionAbortedError, BrokenPipeError, http.client.RemoteDisconnected,
                 http.client.IncompleteRead) or isinstance(error, requests.exceptions.ChunkedEncodingError):
        return f"{where} is unreachable: it closed the connection without answering (did {peer} stop or restart?)"
    return f"{where} is unreachable: {_one_line(error)}"


def _causes(error: BaseException) -> list[BaseException]:
    """``error`` and every exception it wraps (causes, contexts, urllib3's ``reason``, exception arguments)."""
    found: list[BaseException] = []
    stack: list[object] = [error]
    while stack:
        item = stack.pop()
        if not isinstance(item, BaseException) or any(item is seen for seen in found):
            continue
        found.append(item)
        stack.extend([item.__cause__, item.__context__, getattr(item, "reason", None), *item.args])
    return found


def _one_line(e: BaseException) -> str:
    """The root cause of a transport error in a few words (requests nests urllib3's wrapped errors)."""
    text = " ".join(str(e).split())
    errno = _ERRNO.search(text)
    if errno:
        return errno.group(1).rstrip("'\")")
    return text if len(text) <= 160 else text[:157] + "..."


_ERRNO = re.compile(r"\[Errno -?\d+\] ([^'\")]+)")
