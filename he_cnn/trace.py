"""Measurement hooks the parties offer: a tracer that hears about layers and operations.

S1's runner (:mod:`he_cnn.parties.compute_cloud`) calls :meth:`Tracer.layer_start` and
:meth:`Tracer.layer_end` around every layer it evaluates, and both parties wrap each kind of heavy
operation in ``with tracer.op(kind):`` (the kinds are :data:`OP_KINDS`). The default tracer does
nothing; the benchmark subscribes its own to split a layer's seconds by operation kind, instead of
replacing engine functions from outside. A tracer must not change what the engine computes.
"""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

#: operation kind -> (party, description); the order is the benchmark plot's stacking order
OP_KINDS: dict[str, tuple[str, str]] = {
    "s1_pack": ("S1", "mask + pack + re-randomise revealed values"),
    "s1_cross": ("S1", "cross terms E(X) @ B (Straus multi-exponentiation)"),
    "s1_blind": ("S1", "DGK bit combination and blinding"),
    "s1_ot": ("S1", "OT extension and the comparison circuit (AES, bit arrays)"),
    "s1_combine": ("S1", "homomorphic add/sub/short exponentiations"),
    "s1_validate": ("S1", "range/unit checks of received ciphertexts"),
    "s1_wire": ("S1", "wire encode/decode"),
    "s1_other": ("S1", "everything else at S1 (Python glue)"),
    "s2_decrypt": ("S2", "CRT decryption of packs"),
    "s2_dgk_encrypt": ("S2", "DGK encryption of compared bits"),
    "s2_zero": ("S2", "DGK zero tests"),
    "s2_ot": ("S2", "OT extension and the comparison circuit (AES, bit arrays)"),
    "s2_encrypt": ("S2", "Paillier encryption of replies"),
    "s2_plain": ("S2", "plaintext arithmetic (im2col, matmul)"),
    "s2_wire": ("S2", "wire encode/decode"),
    "s2_other": ("S2", "everything else at S2"),
    "s2_http": ("S2", "S2 and the network (HTTP; not broken down)"),
}

_NOTHING = nullcontext()


class Tracer:
    """The hooks; every method of this base class does nothing, so a subclass overrides only what
    it listens to."""

    def layer_start(self, name: str, kind: str) -> None:
        """S1 starts evaluating layer ``name`` (of catalogue kind ``kind``)."""

    def layer_end(self, name: str, kind: str, stats: Any) -> None:
        """S1 finished layer ``name``; ``stats`` is its :class:`~he_cnn.parties.compute_cloud.LayerStats`."""

    def op(self, kind: str) -> AbstractContextManager[Any]:
        """A context around one operation of ``kind`` (a key of :data:`OP_KINDS`)."""
        return _NOTHING

    def reveal(self, count: int, bits: int) -> None:
        """S1 masks and reveals ``count`` values of ``bits`` bits (randomness-pool accounting)."""


#: the tracer parties use when none is given
NULL_TRACER = Tracer()
