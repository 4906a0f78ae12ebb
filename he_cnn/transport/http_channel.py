"""The HTTP channel: S1's link to the S2 service, plus the small HTTP vocabulary both clouds share.

:class:`HTTPChannel` is the network twin of :class:`~he_cnn.transport.channel.InProcessChannel`: one protocol
round is one ``POST {peer}/v1/rounds/{step}`` whose body and reply are the same wire bytes the
in-process channel hands over, so protocol code cannot tell the two apart. Failures come back as our
own exceptions: an unreachable or silent peer is :class:`PeerUnavailable`; a JSON error body from the
peer (``{"error": code, "message": ...}``) is re-raised as the he-cnn error class with that code
(:func:`he_cnn.errors.error_classes`), carrying the peer's message and tagged with ``peer_code`` and
``peer_status`` so the caller knows it was the peer that refused. The cloud public key travels as a wire message too
(:func:`public_key_message` / :func:`parse_public_key`), so S2, S1 and clients agree on one format.
"""
from __future__ import annotations

import re
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
WIRE_CONTENT_TYPE = "application/octet-stream"


def error_from_response(response: requests.Response, peer: str) -> HECNNError:
    """The he-cnn exception a non-2xx JSON error reply stands for (``ProtocolError`` if unknown).

    The returned exception has ``peer_code`` (the peer's ``error`` field) and ``peer_status`` (its
    HTTP status) attributes.
    """
    try:
        body = response.json()
        code, message = str(body["error"]), str(body["message"])
    except (ValueError, KeyError, TypeError):
        code = "http_error"
        message = f"HTTP {response.status_code} without a JSON error body"
    cls = errors.error_classes().get(code, ProtocolError)
    err = cls(f"{peer}: {message}")
    err.peer_code = code  # type: ignore[attr-defined]
    err.peer_status = response.status_code  # type: ignore[attr-defined]
    return err


def http_request(method: str, url: str, peer: str, timeout: float, *, token: str | None = None,
                 data: bytes | None = None, session: requests.Session | None = None) -> requests.Response:
    """One HTTP request to a he-cnn service; a 2xx response, or the he-cnn error the failure stands for.

    ``peer`` names the service in messages ("S2 at http://... is unreachable: ...").
    """
    headers = {}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if data is not None:
        headers["Content-Type"] = WIRE_CONTENT_TYPE
    base = url.split("/v1/", 1)[0]
    try:
        response = (session or requests).request(method, url, data=data, headers=headers, timeout=timeout)
    except requests.Timeout as e:
        raise PeerUnavailable(f"{peer} at {base} did not answer within {timeout:g} s") from e
    except requests.RequestException as e:
        raise PeerUnavailable(f"{peer} at {base} is unreachable: {_one_line(e)}") from e
    if not 200 <= response.status_code < 300:
        raise error_from_response(response, peer)
    return response


class HTTPChannel(Channel):
    """Posts each protocol round to the S2 service at ``peer_url`` with the cloud token."""

    def __init__(self, peer_url: str, token: str, timeout: float = DEFAULT_TIMEOUT,
                 session: requests.Session | None = None):
        super().__init__()
        self.peer_url = peer_url.rstrip("/")
        self.timeout = timeout
        self._token = token
        self._session = session or requests.Session()

    def __repr__(self) -> str:  # never show the token
        return f"HTTPChannel(peer_url={self.peer_url!r}, timeout={self.timeout})"

    def _exchange(self, step: str, payload: bytes) -> bytes:
        with self.tracer.op("s2_http"):  # S2's work and the network, seen from S1
            return http_request("POST", f"{self.peer_url}{ROUNDS_PATH}{step}", "S2", self.timeout,
                                token=self._token, data=payload, session=self._session).content

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
                     peer: str = "server") -> tuple[CloudPublicKey, bytes]:
    """``GET {base_url}/v1/public-key``: the parsed key and the raw bytes (for relaying)."""
    response = http_request("GET", base_url.rstrip("/") + PUBLIC_KEY_PATH, peer, timeout, session=session)
    return parse_public_key(response.content), response.content


def _one_line(e: BaseException) -> str:
    """The root cause of a transport error in a few words (requests nests urllib3's wrapped errors)."""
    text = " ".join(str(e).split())
    errno = _ERRNO.search(text)
    if errno:
        return errno.group(1).rstrip("'\")")
    if "Name or service not known" in text or "nodename nor servname" in text:
        return "unknown host name"
    return text if len(text) <= 160 else text[:157] + "..."


_ERRNO = re.compile(r"\[Errno -?\d+\] ([^'\")]+)")
