"""he-cnn: encrypted image classification with the patent's Inception CNN over Paillier.

Two non-colluding clouds run the secure functions SCVL, SMAP, SACT and SCT on encrypted images and
encrypted weights; only the user decrypts the class vector. See docs/architecture.md.
``he_cnn.compile`` (:func:`he_cnn.compiler.compile_model`) turns a user's own torch or ONNX CNN into
the integer model the clouds run; it is loaded on first use, so ``import he_cnn`` stays light
(no torch, no onnx).
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "compile":
        return importlib.import_module("he_cnn.compiler").compile_model
    raise AttributeError(f"module 'he_cnn' has no attribute {name!r}")
