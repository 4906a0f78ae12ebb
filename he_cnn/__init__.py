"""he-cnn: encrypted image classification with the patent's Inception CNN over Paillier.

Two non-colluding clouds run the secure functions SCVL, SMAP, SACT and SCT on encrypted images and
encrypted weights; only the user decrypts the class vector. See docs/architecture.md.
``he_cnn.compile`` (:func:`he_cnn.compiler.compile_model`) turns a user's own torch or ONNX CNN into
the integer model the clouds run; ``he_cnn.Client`` (:class:`he_cnn.user.client.Client`) classifies
images from a program, as ``he-cnn user query`` does. Both are loaded on first use, so ``import he_cnn``
stays light (no torch, no onnx, no HTTP client).
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"


#: name -> (module, attribute), imported on first use; the client lives in the user's package, which
#: the library never imports by name (tests/test_layout.py), only on request here
_LAZY = {"compile": ("he_cnn.compiler", "compile_model"), "Client": ("he_cnn.user.client", "Client")}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attribute = _LAZY[name]
        return getattr(importlib.import_module(module), attribute)
    raise AttributeError(f"module 'he_cnn' has no attribute {name!r}")
