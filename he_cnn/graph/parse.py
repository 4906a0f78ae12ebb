"""Checked readers for values that arrive from outside (model files, uploaded specs).

Each reader takes the raw JSON value and a description of where it sits (``what``) and returns the
checked value, or raises :class:`~he_cnn.errors.BadRequest` saying what was expected and what arrived.
The layer catalogue names one reader per field, so a layer's file and spec parsing need no code of
their own.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from he_cnn.errors import BadRequest

Reader = Callable[[Any, str], Any]


def shown(value: Any, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters: messages quote what arrived without echoing a
    hostile megabyte back."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def field(fields: dict[str, Any], name: str) -> Any:
    if name not in fields:
        raise BadRequest(f"missing field {name!r}")
    return fields[name]


def expect_dict(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BadRequest(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def text(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise BadRequest(f"{what} must be a non-empty string, got {value!r:.80}")
    return value


def integer(value: Any, what: str) -> int:
    if type(value) is not int:  # bool and float are not ints here
        raise BadRequest(f"{what} must be an integer, got {value!r:.80}")
    return value


def positive_int(value: Any, what: str) -> int:
    if integer(value, what) < 1:
        raise BadRequest(f"{what} must be positive, got {value}")
    return value


def non_negative_int(value: Any, what: str) -> int:
    if integer(value, what) < 0:
        raise BadRequest(f"{what} must not be negative, got {value}")
    return value


def int_in(low: int, high: int) -> Reader:
    """A reader of an integer in ``[low, high]``."""
    def read(value: Any, what: str) -> int:
        if not low <= integer(value, what) <= high:
            raise BadRequest(f"{what} must lie in [{low}, {high}], got {value}")
        return value
    return read


def int_list(value: Any, what: str) -> list[int]:
    if not isinstance(value, list):
        raise BadRequest(f"{what} must be a list of integers, got {type(value).__name__}")
    return [integer(v, what) for v in value]


def text_tuple(value: Any, what: str) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or not value:
        raise BadRequest(f"{what} must be a non-empty list of strings, got {value!r:.80}")
    return tuple(text(v, what) for v in value)


def int_array(rank: int) -> Reader:
    """A reader of ``{"shape": [...], "values": [...]}`` as an object array of Python ints of ``rank`` dimensions."""
    def read(value: Any, what: str) -> np.ndarray:
        array = expect_dict(value, what)
        shape = int_list(field(array, "shape"), f"{what} shape")
        values = int_list(field(array, "values"), f"{what} values")
        if min(shape, default=0) < 1 or math.prod(shape) != len(values):
            raise BadRequest(f"{what}: shape {shape} does not hold {len(values)} values")
        if len(shape) != rank:
            raise BadRequest(f"{what} must have {rank} dimensions, got {len(shape)}")
        return np.array(values, dtype=object).reshape(shape)
    return read


def array_to_json(value: np.ndarray) -> dict[str, Any]:
    """The inverse of :func:`int_array`'s readers."""
    return {"shape": list(value.shape), "values": [int(v) for v in value.ravel()]}


def pair_of(read: Reader) -> Reader:
    """A reader of a window dimension: one value (both axes) or a list of two, each checked by
    ``read``; gives the pair (along H, along W)."""
    def read_pair(value: Any, what: str) -> tuple[Any, Any]:
        if isinstance(value, list):
            if len(value) != 2:
                raise BadRequest(f"{what} must be one integer or a list of two, got {len(value)} values")
            return read(value[0], what), read(value[1], what)
        return read(value, what), read(value, what)
    return read_pair
