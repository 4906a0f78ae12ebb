"""Bench-only timing of where a layer's seconds go, without touching the engine.

``install()`` wraps a handful of engine functions *in this process only* (the benchmark's), each
under an operation kind. Wrappers keep a per-thread stack so every kind gets its *exclusive* time
(a wrapped call inside another is subtracted from the outer one). Layer boundaries come from
:meth:`ChannelStats.snapshot`, which :func:`he_cnn.secure_model.secure_inference` calls exactly at the
start and at the end of every timed layer: :class:`MarkingStats` replaces a channel's stats object and
opens or closes a per-layer bucket on each call. Nothing here changes what the engine computes.

In-process, the S2 handler runs in this process too, so S2's kinds are measured; over HTTP, S2's
whole time (and the network) is one kind, ``s2_http``.
"""
from __future__ import annotations

import functools
import threading
import time
from collections import defaultdict
from typing import Any, Callable

from he_cnn.transport import channel as channel_mod
from he_cnn.parties import key_cloud as s2_mod
from he_cnn.transport import http_channel
from he_cnn.transport.channel import ChannelStats
from he_cnn.parallel import Workers
from he_cnn.protocols import common, comparison, linear, output, smp
from he_cnn.crypto.tensor import EncryptedTensor

#: kind -> (party, description); order is the plot's stacking order
KINDS: dict[str, tuple[str, str]] = {
    "s1_pack": ("S1", "mask + pack + re-randomise revealed values"),
    "s1_cross": ("S1", "cross terms E(X) @ B (Straus multi-exponentiation)"),
    "s1_blind": ("S1", "DGK bit combination and blinding"),
    "s1_combine": ("S1", "homomorphic add/sub/short exponentiations"),
    "s1_validate": ("S1", "range/unit checks of received ciphertexts"),
    "s1_wire": ("S1", "wire encode/decode"),
    "s1_other": ("S1", "everything else at S1 (Python glue)"),
    "s2_decrypt": ("S2", "CRT decryption of packs"),
    "s2_dgk_encrypt": ("S2", "DGK encryption of compared bits"),
    "s2_zero": ("S2", "DGK zero tests"),
    "s2_encrypt": ("S2", "Paillier encryption of replies"),
    "s2_plain": ("S2", "plaintext arithmetic (im2col, matmul)"),
    "s2_wire": ("S2", "wire encode/decode"),
    "s2_other": ("S2", "everything else at S2"),
    "s2_http": ("S2", "S2 and the network (HTTP; not broken down)"),
}

_MAP_KINDS = {
    "_pack_chunk": "s1_pack",
    "matmul_cipher_plain": "s1_cross",
    "_blind_chunk": "s1_blind",
    "_decrypt_chunk": "s2_decrypt",
    "_zero_chunk": "s2_zero",
}


class Profiler:
    """Exclusive seconds per kind, collected into one bucket per layer."""

    def __init__(self) -> None:
        self.enabled = True
        self._local = threading.local()
        self.current: dict[str, float] | None = None
        self.buckets: list[dict[str, float]] = []
        #: every reveal (values.size, bit bound l) S1 made, for pool-size accounting
        self.reveals: list[tuple[int, int]] = []
        self.owner: int | None = None  # thread id whose layers are being bucketed

    def reset(self) -> None:
        self.current, self.buckets, self.reveals = None, [], []
        self.owner = threading.get_ident()

    def _stack(self) -> list[float]:
        st = getattr(self._local, "stack", None)
        if st is None:
            st = self._local.stack = []
        return st

    def wrap(self, kind: str | Callable[..., str], fn: Callable) -> Callable:
        prof = self

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if not prof.enabled or threading.get_ident() != prof.owner:
                return fn(*args, **kwargs)
            k = kind(*args) if callable(kind) else kind
            st = prof._stack()
            st.append(0.0)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - t0
                children = st.pop()
                if st:
                    st[-1] += elapsed
                if prof.current is not None:
                    prof.current[k] += elapsed - children

        wrapper.__bench_wrapped__ = fn  # type: ignore[attr-defined]
        return wrapper


PROFILER = Profiler()


class MarkingStats(ChannelStats):
    """Channel statistics that also open/close a profiler bucket on each ``snapshot`` call."""

    def __init__(self, profiler: Profiler = PROFILER) -> None:
        super().__init__()
        self._profiler = profiler
        self._inside = False

    def snapshot(self) -> tuple[int, int, int, float]:
        prof = self._profiler
        if prof.enabled and threading.get_ident() == prof.owner:
            if not self._inside:
                prof.current = defaultdict(float)
            else:
                prof.buckets.append(dict(prof.current or {}))
                prof.current = None
            self._inside = not self._inside
        return super().snapshot()


def mark(channel: channel_mod.Channel) -> channel_mod.Channel:
    """Give ``channel`` marking statistics (call before any round: the counters start at zero)."""
    channel.stats = MarkingStats()
    return channel


def arm(channel: channel_mod.Channel) -> None:
    """Call right before ``secure_inference``: its next ``snapshot`` call opens the first layer."""
    if isinstance(channel.stats, MarkingStats):
        channel.stats._inside = False


_installed = False


def install(profiler: Profiler = PROFILER) -> None:
    """Wrap the engine functions (idempotent)."""
    global _installed
    if _installed:
        return
    _installed = True
    w = profiler.wrap

    original_map = Workers.map

    def map_kind(self: Workers, fn: Callable, calls: Any) -> str:
        return _MAP_KINDS.get(getattr(fn, "__name__", ""), "s1_other")

    Workers.map = w(map_kind, original_map)  # type: ignore[method-assign]

    original_pack = common.pack_masked

    def recording_pack(ctx: Any, values: Any, masks: Any, l: int) -> Any:
        if threading.get_ident() == profiler.owner:
            profiler.reveals.append((int(values.size), int(l)))
        return original_pack(ctx, values, masks, l)

    common.pack_masked = w("s1_pack", recording_pack)
    linear.reveal_packs = w("s1_pack", linear.reveal_packs)  # type: ignore[attr-defined]
    for name in ("add", "neg", "mul_plain", "rerandomize"):
        setattr(EncryptedTensor, name, w("s1_combine", getattr(EncryptedTensor, name)))
    for module in (linear, comparison, smp, output):
        module.read_ciphertexts = w("s1_validate", module.read_ciphertexts)  # type: ignore[attr-defined]
    for module in (linear, comparison, smp):
        module.encrypted_reply = w("s2_encrypt", module.encrypted_reply)  # type: ignore[attr-defined]
    channel_mod.encode = w("s1_wire", channel_mod.encode)
    channel_mod.decode = w("s1_wire", channel_mod.decode)
    s2_mod.encode = w("s2_wire", s2_mod.encode)
    s2_mod.decode = w("s2_wire", s2_mod.decode)
    handler_kinds = {linear.STEP: "s2_plain", comparison.BITS_STEP: "s2_dgk_encrypt",
                     output.STEP: "s2_encrypt"}
    for step, fn in list(s2_mod.HANDLERS.items()):
        s2_mod.HANDLERS[step] = w(handler_kinds.get(step, "s2_other"), fn)
    s2_mod.KeyCloud.handle = w("s2_other", s2_mod.KeyCloud.handle)  # type: ignore[method-assign]
    http_channel.HTTPChannel._exchange = w("s2_http", http_channel.HTTPChannel._exchange)  # type: ignore[method-assign]


def layer_breakdown(buckets: list[dict[str, float]], layer_seconds: list[float]) -> list[dict[str, float]]:
    """Per layer: exclusive seconds per kind, with the unexplained rest as ``s1_other``."""
    out = []
    for bucket, total in zip(buckets, layer_seconds):
        b = {k: v for k, v in bucket.items() if v > 0}
        b["s1_other"] = b.get("s1_other", 0.0) + max(0.0, total - sum(b.values()))
        out.append(b)
    return out
