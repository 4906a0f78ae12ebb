"""Bounded JSON: every JSON document he-cnn reads from outside is measured before it is parsed.

``json.loads`` recurses once per level of nesting (a 2 KB document of ``[`` ends in a ``RecursionError``)
and builds every value it reads (a file of a billion small numbers is tens of gigabytes of Python
objects). :func:`parse_json` therefore checks, in this order and before ``json.loads`` sees the text,
its size, that it is UTF-8, how many values it holds and how deep it nests, each against the reader's
:class:`JSONLimits`. Values and depth come from one cheap pass outside string literals: a regular
expression drops the strings (whatever they hold is no structure), and what is left is counted in C
(commas and brackets). ``NaN`` and ``Infinity``, which ``json.loads`` accepts but are not JSON, are
refused, and so are numbers too large for a float (``1e999``). Every failure, the parser's own
included, is a :class:`~he_cnn.errors.BadRequest` that names the document and says what is wrong.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from he_cnn.errors import BadRequest

#: deeper than any document he-cnn writes (a model spec nests 5 levels) and far below the ~1,000
#: levels at which ``json.loads`` runs out of stack
MAX_DEPTH = 32

#: a string literal, from its opening quote to its closing one; an unterminated string runs to the end
#: (json.loads stops there too). Every quote the scan meets starts a match that cannot fail, so the
#: scan is linear however the quotes and backslashes are arranged.
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*(?:"|\\?\Z)', re.DOTALL)
#: every byte that is not a bracket or a comma, deleted to leave the structure
_NOT_STRUCTURE = bytes(b for b in range(256) if b not in b"[]{},")


@dataclass(frozen=True)
class JSONLimits:
    """What one kind of document may hold: its size in bytes, its values (array items, object members
    and the top value: commas plus opening brackets plus one), and its depth of nesting."""

    max_bytes: int
    max_items: int
    max_depth: int = MAX_DEPTH


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed: it is not a JSON value")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999: a JSON number, but Infinity once read
        raise ValueError(f"number {text[:40]} is too large for a float")
    return value


def _check_structure(data: bytes, limits: JSONLimits, what: str) -> None:
    """Refuse ``data`` if it holds more values or nests deeper than ``limits`` allow."""
    structure = _STRING.sub(b"", data).translate(None, _NOT_STRUCTURE)
    opening = structure.count(b"[") + structure.count(b"{")
    items = structure.count(b",") + opening + 1
    if items > limits.max_items:
        raise BadRequest(f"{what} holds more than {limits.max_items} values")
    if structure.count(b"]") + structure.count(b"}") > opening:
        raise BadRequest(f"{what} is not readable JSON: it closes more brackets than it opens")
    brackets = np.frombuffer(structure.translate(None, b","), dtype=np.uint8)
    if brackets.size:  # at most 2 * max_items of them: both counts were bounded above
        steps = np.where((brackets == ord("[")) | (brackets == ord("{")), 1, -1).astype(np.int32)
        if int(np.cumsum(steps).max()) > limits.max_depth:
            raise BadRequest(f"{what} nests deeper than {limits.max_depth} levels")


def parse_json(data: bytes, limits: JSONLimits, what: str) -> Any:
    """The JSON value in ``data`` (UTF-8), checked against ``limits`` before it is parsed;
    :class:`BadRequest` naming ``what`` (e.g. ``"key file /x/key.json"``) if anything is off."""
    if len(data) > limits.max_bytes:
        raise BadRequest(f"{what} is {len(data)} bytes, more than the limit of {limits.max_bytes}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRequest(f"{what} is not UTF-8 text: {e.reason} at byte {e.start}") from None
    _check_structure(data, limits, what)
    try:
        return json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except (ValueError, RecursionError) as e:  # RecursionError: unreachable under MAX_DEPTH, never a 500
        raise BadRequest(f"{what} is not readable JSON: {e}") from e


def read_json_file(path: Path, limits: JSONLimits, what: str) -> Any:
    """The JSON value in the file ``path``, read no further than ``limits.max_bytes`` + 1 bytes.

    :class:`OSError` (``FileNotFoundError`` included) passes through for the caller to explain;
    anything wrong with the content is :class:`BadRequest`.
    """
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > limits.max_bytes:
            raise BadRequest(f"{what} is {size} bytes, more than the limit of {limits.max_bytes}")
        data = f.read(limits.max_bytes + 1)  # a file that grew since the stat is still cut here
    return parse_json(data, limits, what)
