"""The exception hierarchy of he-cnn.

Every error the library raises on purpose derives from :class:`HECNNError`, so a caller (a CLI, a
Flask error handler) can turn any of them into one clear message. Messages say what was expected and
what arrived. This module is also the one definition of the errors that cross HTTP: each class carries
the ``code`` of its JSON error body and the HTTP ``status`` a service answers with, and
:func:`error_classes` maps a code back to its class, so the servers and the client share one table.
"""
from __future__ import annotations

from typing import ClassVar


class HECNNError(Exception):
    """Base class of every error he-cnn raises on purpose."""

    #: short machine-readable code, used as the ``error`` field of JSON error bodies
    code: ClassVar[str] = "he_cnn_error"
    #: HTTP status of a service's reply when this error ends a request
    status: ClassVar[int] = 400
    #: a cloud that got this error from its peer passes it on as it is (it is about the request) rather
    #: than answering :class:`PeerError`
    relayed_as_is: ClassVar[bool] = False


class KeyMismatch(HECNNError):
    """Two operands (or a ciphertext and a key) belong to different public keys."""

    code = "key_mismatch"


class EncodingOverflow(HECNNError):
    """A value does not fit the signed encoding range of the key (|v| < N/2) or its declared bound."""

    code = "encoding_overflow"


class BoundExceeded(HECNNError):
    """A masked value revealed during a protocol lies outside the bound the protocol was given."""

    code = "bound_exceeded"
    status = 422
    relayed_as_is = True


class ShapeError(HECNNError):
    """A tensor has a different shape than the operation expects."""

    code = "shape_error"


class UnsupportedLayer(HECNNError):
    """A model contains a layer the secure engine cannot evaluate."""

    code = "unsupported_layer"


class ProtocolError(HECNNError):
    """A protocol message is malformed, out of order, or the peer reported a failure."""

    code = "protocol_error"


class WireFormatError(ProtocolError):
    """Bytes that do not parse as a he-cnn wire message (bad magic, version, lengths or values)."""

    code = "wire_format"


class UnknownSetup(ProtocolError):
    """S1 referred to a model set-up S2 does not hold (S2 lost its data): S1 should run it again."""

    code = "unknown_setup"


class UnknownGallery(ProtocolError):
    """S2 does not hold the gallery S1 named, or holds other chunks of it (S2 lost or restored its data):
    S1 relays the gallery's seeds again."""

    code = "unknown_gallery"


class UnknownPrepared(ProtocolError):
    """S2 no longer holds the prepared identification S1 named (a restart, or the oldest dropped):
    S1 prepares again."""

    code = "unknown_prepared"


class UnknownOTSession(ProtocolError):
    """S2 does not know the OT link S1 named (S2 restarted or dropped it): S1 makes a new one."""

    code = "unknown_ot_session"


class PeerError(ProtocolError):
    """The other cloud refused a request; S1 answers with this in place of the peer's own error."""

    code = "peer_error"
    status = 502


class InvalidCiphertext(HECNNError):
    """A ciphertext is out of range (not 0 < c < N^2) or not a unit (gcd(c, N) != 1)."""

    code = "invalid_ciphertext"


class PeerUnavailable(HECNNError):
    """The other cloud could not be reached or did not answer in time."""

    code = "peer_unavailable"
    status = 503


class PeerKeyChanged(HECNNError):
    """S2 now presents another public key than the one S1 pinned (S2 lost or replaced its key)."""

    code = "peer_key_changed"
    status = 502


class ServiceBusy(HECNNError):
    """The service runs as many queries as it may and its waiting queue is full: retry later.

    ``retry_after`` (whole seconds) is the service's estimate of when a place frees up; the service
    sends it as the ``Retry-After`` header of its 429 reply.
    """

    code = "service_busy"
    status = 429

    def __init__(self, message: str = "the service is busy", retry_after: int | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class WorkersUnavailable(HECNNError):
    """A cloud's workers failed during a request (a worker process or a Ray actor died, a node was lost):
    the request is abandoned whole, never answered from partial results; the next one runs on the
    restarted workers. A cloud relays its peer's as it is, so the user sees 503 and may retry."""

    code = "workers_unavailable"
    status = 503
    relayed_as_is = True


class BadRequest(HECNNError):
    """A request to a service is malformed or refers to something that does not exist."""

    code = "bad_request"


class UnknownModel(BadRequest):
    """No model with this id is stored."""

    code = "unknown_model"
    status = 404


class RoundNotReady(HECNNError):
    """A federated round's sum is asked for before every owner uploaded (retry later), or an upload
    names a round that is not the session's open one."""

    code = "round_not_ready"
    status = 409


class EnrolmentExpired(HECNNError):
    """An enrolment's uploaded chunks were dropped after it stayed idle too long: start it again."""

    code = "enrolment_expired"
    status = 409


def error_classes() -> dict[str, type[HECNNError]]:
    """Every error class of this module, by its ``code``: what a JSON error body's ``error`` stands for.

    Subclasses defined elsewhere (a server's start-up errors) are left out: they never cross HTTP.
    """
    found: dict[str, type[HECNNError]] = {}
    stack: list[type[HECNNError]] = [HECNNError]
    while stack:
        cls = stack.pop()
        if cls.__module__ == __name__:
            found[cls.code] = cls
        stack.extend(cls.__subclasses__())
    return found
