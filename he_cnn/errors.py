"""The exception hierarchy of he-cnn.

Every error the library raises on purpose derives from :class:`HECNNError`, so a caller (a CLI, a
Flask error handler) can turn any of them into one clear message. Messages say what was expected and
what arrived.
"""
from __future__ import annotations


class HECNNError(Exception):
    """Base class of every error he-cnn raises on purpose."""

    #: short machine-readable code, used as the ``error`` field of JSON error bodies
    code = "he_cnn_error"


class KeyMismatch(HECNNError):
    """Two operands (or a ciphertext and a key) belong to different public keys."""

    code = "key_mismatch"


class EncodingOverflow(HECNNError):
    """A value does not fit the signed encoding range of the key (|v| < N/2) or its declared bound."""

    code = "encoding_overflow"


class BoundExceeded(HECNNError):
    """A masked value revealed during a protocol lies outside the bound the protocol was given."""

    code = "bound_exceeded"


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


class InvalidCiphertext(HECNNError):
    """A ciphertext is out of range (not 0 < c < N^2) or not a unit (gcd(c, N) != 1)."""

    code = "invalid_ciphertext"


class PeerUnavailable(HECNNError):
    """The other cloud could not be reached or did not answer in time."""

    code = "peer_unavailable"


class BadRequest(HECNNError):
    """A request to a service is malformed or refers to something that does not exist."""

    code = "bad_request"
