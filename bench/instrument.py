"""Where a layer's seconds go, by operation kind: the benchmark's tracer.

The parties offer hooks (:mod:`he_cnn.trace`): S1's runner calls ``layer_start`` / ``layer_end``
around every layer, and S1's context, S1's channel and S2's :class:`~he_cnn.parties.key_cloud.KeyCloud`
wrap each heavy operation in ``with tracer.op(kind)``. :class:`Profiler` listens: every layer gets a
bucket of *exclusive* seconds per kind (a per-thread stack subtracts an operation nested in another
from the outer one), and at the layer's end what no operation explains is ``s1_other``. It also lists
every reveal (count, bits) for the randomness-pool accounting. Nothing here changes what the engine
computes, and nothing replaces an engine function.

In-process, S2's handler runs in this thread too, so S2's kinds are measured; over HTTP, S2's whole
time (and the network) is one kind, ``s2_http``. Only the thread that created (or last reset) the
profiler is measured: the throughput run's concurrent queries share S2 with it.
"""
from __future__ import annotations

import threading
import time
from collections import defaultdict
from contextlib import AbstractContextManager
from typing import Any

from he_cnn.trace import NULL_TRACER, Tracer


class _Timed:
    """One operation's context: adds its exclusive seconds to the open layer's bucket."""

    __slots__ = ("_profiler", "_kind", "_stack", "_start")

    def __init__(self, profiler: "Profiler", kind: str, stack: list[float]):
        self._profiler, self._kind, self._stack = profiler, kind, stack

    def __enter__(self) -> None:
        self._stack.append(0.0)  # the seconds of the operations nested in this one
        self._start = time.perf_counter()

    def __exit__(self, *exc: Any) -> None:
        elapsed = time.perf_counter() - self._start
        nested = self._stack.pop()
        if self._stack:
            self._stack[-1] += elapsed
        bucket = self._profiler.current
        if bucket is not None:
            bucket[self._kind] += elapsed - nested


class Profiler(Tracer):
    """Exclusive seconds per operation kind, one bucket per layer, and the reveals S1 made."""

    def __init__(self) -> None:
        self._local = threading.local()
        self.owner = threading.get_ident()
        #: the open layer's seconds per kind (None between layers)
        self.current: defaultdict[str, float] | None = None
        #: (layer name, seconds per kind with the unexplained rest as ``s1_other``), in order
        self.layers: list[tuple[str, dict[str, float]]] = []
        #: every reveal (values, bit bound l) S1 made, for pool-size accounting
        self.reveals: list[tuple[int, int]] = []

    def reset(self) -> None:
        """Forget what was measured; measure the calling thread from now on."""
        self.current, self.layers, self.reveals = None, [], []
        self.owner = threading.get_ident()

    def _measured(self) -> bool:
        return threading.get_ident() == self.owner

    # -- the hooks --------------------------------------------------------------------------------
    def layer_start(self, name: str, kind: str) -> None:
        if self._measured():
            self.current = defaultdict(float)

    def layer_end(self, name: str, kind: str, stats: Any) -> None:
        if not self._measured() or self.current is None:
            return
        bucket = {k: v for k, v in self.current.items() if v > 0}
        bucket["s1_other"] = bucket.get("s1_other", 0.0) + max(0.0, stats.seconds - sum(bucket.values()))
        self.layers.append((name, bucket))
        self.current = None

    def op(self, kind: str) -> AbstractContextManager[Any]:
        if not self._measured():
            return NULL_TRACER.op(kind)
        stack = getattr(self._local, "stack", None)
        if stack is None:
            stack = self._local.stack = []
        return _Timed(self, kind, stack)

    def reveal(self, count: int, bits: int) -> None:
        if self._measured():
            self.reveals.append((int(count), int(bits)))

    # -- results ----------------------------------------------------------------------------------
    def breakdown(self, names: list[str]) -> list[dict[str, float]] | None:
        """Per layer of ``names`` (in order), its seconds per kind; None unless exactly those layers
        were measured, in that order."""
        if [name for name, _ in self.layers] != list(names):
            return None
        return [bucket for _, bucket in self.layers]
