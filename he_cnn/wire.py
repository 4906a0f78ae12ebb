"""The binary, versioned wire format: the same bytes on the wire between clouds, to users, and on disk.

Layout of a message::

    b"HECN" | version (u16) | header length (u32) | header (UTF-8 JSON) | array payloads

The header holds small metadata (ids, shapes, bit lengths) and, per array, its name, shape and byte
width; the payload holds each array's integers as fixed-width big-endian bytes (ciphertexts
unsigned at the width of N^2 or of the DGK modulus, other integers as signed two's complement).
No decimal strings, no pickle. Decoding checks magic, version, lengths and sizes, bounds the header's
values and nesting before it is parsed (:mod:`he_cnn.bounded_json`), and raises
:class:`WireFormatError` with what was expected and what arrived.
"""
from __future__ import annotations

import json
import math
import struct
from typing import Any

import numpy as np
from gmpy2 import mpz

from he_cnn.bounded_json import JSONLimits, parse_json
from he_cnn.errors import BadRequest, WireFormatError
from he_cnn.parallel import from_blob

MAGIC = b"HECN"
VERSION = 1
_PREFIX = struct.Struct(">4sHI")
#: refuse headers and arrays beyond these (a hostile length field must not allocate gigabytes)
MAX_HEADER_BYTES = 1 << 20
MAX_ELEMENTS = 1 << 24
#: values a header may hold: the largest model spec the layer limit allows (4,096 layers of ~29 values
#: each, about 120,000) with room to spare; a 1 MiB header could otherwise hold half a million
MAX_HEADER_ITEMS = 1 << 18
HEADER_LIMITS = JSONLimits(max_bytes=MAX_HEADER_BYTES, max_items=MAX_HEADER_ITEMS)
#: dimensions an array may have (numpy's own limit is 64, and a reshape beyond it is no WireFormatError)
MAX_DIMS = 32


class Message:
    """Metadata plus named integer arrays. ``widths`` fixes the byte width of ciphertext arrays.

    Large ciphertext arrays can skip a conversion on each side: ``blobs`` holds arrays to send that
    are already fixed-width bytes (:meth:`set_blob`), and a decoded message keeps the bytes of each
    ciphertext array as they arrived (:meth:`payload`) and turns them into integers only when they are
    asked for (:meth:`array`, or any use of ``arrays``). Protocol code that hands the bytes to the
    process-pool workers, which check and convert them there, never pays for a decode in between.
    """

    def __init__(self, meta: dict[str, Any] | None = None, arrays: dict[str, np.ndarray] | None = None,
                 widths: dict[str, int] | None = None):
        self.meta: dict[str, Any] = {} if meta is None else meta
        self._arrays: dict[str, np.ndarray] = {} if arrays is None else arrays
        self.widths: dict[str, int] = {} if widths is None else widths
        self.blobs: dict[str, tuple[bytes, tuple[int, ...]]] = {}
        #: where each received ciphertext array's bytes are (a view of the message, copied only on demand)
        self.received: dict[str, memoryview] = {}
        #: received ciphertext arrays not decoded yet: name -> (shape, width as received)
        self._pending: dict[str, tuple[tuple[int, ...], int]] = {}

    def __repr__(self) -> str:
        shapes = {name: tuple(a.shape) for name, a in self._arrays.items()}
        shapes.update({name: shape for name, (shape, _) in self._pending.items()})
        shapes.update({name: shape for name, (_, shape) in self.blobs.items()})
        return f"Message(meta={self.meta!r}, arrays={shapes!r}, widths={self.widths!r})"

    @property
    def arrays(self) -> dict[str, np.ndarray]:
        """Every array by name, as integers (received ciphertext arrays are decoded here if not yet)."""
        for name in list(self._pending):
            self._decode(name)
        return self._arrays

    def array(self, name: str) -> np.ndarray:
        if name in self._pending:
            self._decode(name)
        try:
            return self._arrays[name]
        except KeyError:
            raise WireFormatError(f"message lacks array {name!r}; it has {sorted(self._arrays)}") from None

    def shape(self, name: str) -> tuple[int, ...]:
        """An array's shape, without decoding a received one."""
        if name in self._pending:
            return self._pending[name][0]
        return tuple(self.array(name).shape)

    def _decode(self, name: str) -> None:
        shape, width = self._pending.pop(name)
        values = from_blob(self.received[name], width)
        self._arrays[name] = np.fromiter(values, dtype=object, count=len(values)).reshape(shape)

    def set_blob(self, name: str, blob: bytes, width: int, shape: tuple[int, ...]) -> None:
        """Send a ciphertext array given as ``width``-byte big-endian integers (as ``to_blob`` makes them)."""
        if len(blob) != width * int(np.prod(shape)):
            raise WireFormatError(f"array {name!r}: {len(blob)} bytes do not hold {shape} values of {width} bytes")
        self.blobs[name] = (blob, tuple(shape))
        self.widths[name] = width

    def payload(self, name: str) -> bytes:
        """The fixed-width bytes of a received ciphertext array, at the width it arrived with (``widths[name]``
        unless edited since), each value checked by nobody yet: whoever uses them range-checks them."""
        try:
            return bytes(self.received[name])
        except KeyError:
            raise WireFormatError(f"message lacks ciphertext array {name!r}") from None

    def get(self, name: str, kind: type = object) -> Any:
        try:
            value = self.meta[name]
        except KeyError:
            raise WireFormatError(f"message lacks field {name!r}") from None
        if kind is not object and not isinstance(value, kind):
            raise WireFormatError(f"field {name!r} must be {kind.__name__}, got {type(value).__name__}")
        return value


def _signed_width(flat: np.ndarray) -> int:
    width = 1
    for v in flat:
        v = int(v)
        need = (v.bit_length() + 8) // 8 if v >= 0 else ((-v - 1).bit_length() + 8) // 8
        width = max(width, need)
    return width


def encode(message: Message) -> bytes:
    specs, blobs = [], []
    for name, arr in message.arrays.items():
        arr = np.asarray(arr, dtype=object)
        flat = arr.reshape(-1)
        if name in message.widths:
            width, signed = message.widths[name], False
        else:
            width, signed = _signed_width(flat), True
        try:
            if signed:
                blobs.append(b"".join(int(v).to_bytes(width, "big", signed=True) for v in flat))
            else:
                blobs.append(b"".join(mpz(v).to_bytes(width, "big") for v in flat))
        except OverflowError as e:
            raise WireFormatError(f"array {name!r} holds a value wider than {width} bytes") from e
        specs.append({"name": name, "shape": list(arr.shape), "width": width, "signed": signed})
    for name, (blob, shape) in message.blobs.items():
        if name not in message.arrays:
            blobs.append(blob)
            specs.append({"name": name, "shape": list(shape), "width": message.widths[name], "signed": False})
    header = json.dumps({"meta": message.meta, "arrays": specs}, separators=(",", ":")).encode()
    return _PREFIX.pack(MAGIC, VERSION, len(header)) + header + b"".join(blobs)


def decode(data: bytes) -> Message:
    if len(data) < _PREFIX.size:
        raise WireFormatError(f"message of {len(data)} bytes is shorter than the {_PREFIX.size}-byte prefix")
    magic, version, header_len = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise WireFormatError(f"not a he-cnn message: magic {magic!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise WireFormatError(f"wire format version {version} is not supported; expected {VERSION}")
    if header_len > MAX_HEADER_BYTES or _PREFIX.size + header_len > len(data):
        raise WireFormatError(f"header length {header_len} does not fit a {len(data)}-byte message")
    try:
        header = parse_json(data[_PREFIX.size:_PREFIX.size + header_len], HEADER_LIMITS, "the message header")
        meta, specs = header["meta"], header["arrays"]
        if not isinstance(meta, dict) or not isinstance(specs, list):
            raise TypeError("meta must be an object and arrays a list")
    except (BadRequest, KeyError, TypeError) as e:
        raise WireFormatError(f"malformed message header: {e}") from e
    msg = Message(meta=meta)
    view = memoryview(data)
    offset = _PREFIX.size + header_len
    for spec in specs:
        try:
            name, shape, width, signed = spec["name"], tuple(spec["shape"]), int(spec["width"]), bool(spec["signed"])
            if not isinstance(name, str) or len(shape) > MAX_DIMS \
                    or not all(type(s) is int and 0 <= s <= MAX_ELEMENTS for s in shape):  # not True
                raise TypeError("bad name or shape")
        except (KeyError, TypeError, ValueError, ArithmeticError) as e:  # ArithmeticError: int() of 1e999
            raise WireFormatError(f"malformed array spec {str(spec)[:200]}") from e
        if name in msg._arrays or name in msg._pending:  # a second array of that name could differ from the first one's checked bytes
            raise WireFormatError(f"array {name!r} appears twice")
        count = math.prod(shape)  # exact: numpy's product of [2**32, 2**32] wraps to 0
        if count > MAX_ELEMENTS or not 0 < width <= 4096:
            raise WireFormatError(f"array {name!r}: {count} elements of {width} bytes is out of range")
        end = offset + count * width
        if end > len(data):
            raise WireFormatError(f"array {name!r} needs {count * width} bytes, message has {len(data) - offset} left")
        if signed:
            items = (mpz(int.from_bytes(data[i:i + width], "big", signed=True)) for i in range(offset, end, width))
            msg._arrays[name] = np.fromiter(items, dtype=object, count=count).reshape(shape)
        else:  # decoded when asked for (Message.array)
            msg.widths[name] = width
            msg.received[name] = view[offset:end]
            msg._pending[name] = (shape, width)
        offset = end
    if offset != len(data):
        raise WireFormatError(f"{len(data) - offset} trailing bytes after the last array")
    return msg
