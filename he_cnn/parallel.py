"""Spreading the heavy loops of a protocol step over all cores: each party's one executor seam.

A :class:`Workers` object maps a top-level function over chunks of work in a process pool (forked,
so workers start in milliseconds and inherit the loaded code) or, with one worker or one chunk,
in the calling process. :class:`he_cnn.ray_workers.RayWorkers` is the same seam on a Ray cluster of
the party's own, for a service that outgrows one host. Each party owns its own ``Workers`` (S1 in its
context, S2 in its KeyCloud); protocol code passes it down explicitly, never through a global. Within
one query S1 and S2 never compute at the same time (every round waits for the other side), so each may
use every core in its turn. A service shares its workers between the queries it runs at once and its
randomness pool filler (:mod:`servers.pools`), which uses :meth:`Workers.submit`; tasks run in
submission order.

Work that needs S2's secret key goes through :meth:`Workers.map_keyed`: the function's first argument
is the key (a :class:`WorkerKey`), which the backend supplies -- the local pool from the calling
process (forked workers hold the parent's memory, key included, so handing it over adds nothing), Ray
from the key each long-lived actor loaded once at start, so that the key never travels with a task.

Chunks are sized by cost (:meth:`Workers.chunks`): at least ``min_task_seconds`` of work each, so that
handing a task over (pickling, a pipe or a network hop) stays a small share of it.
"""
from __future__ import annotations

import math
import multiprocessing
import os
import threading
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, Protocol, Sequence

from gmpy2 import mpz

from he_cnn.errors import WorkersUnavailable


class WorkerKey(Protocol):
    """What keyed work receives as its first argument: S2's secret key material
    (:class:`he_cnn.protocols.common.S2WorkerKey`), named by the id of the public key it belongs to."""

    key_id: str


def powmod_seconds(modulus_bits: int, exponent_bits: int) -> float:
    """Rough seconds of one gmpy2 modular exponentiation (fit on a 2-core x86 host, within 30 % from
    1,024 to 4,096-bit moduli): what :meth:`Workers.chunks` uses to size chunks by cost."""
    return 4.5e-9 * exponent_bits * (modulus_bits / 64) ** 1.6


def _die_with_parent() -> None:
    """Worker initializer: on Linux, ask the kernel to kill this worker when its parent dies, so a
    cloud killed with SIGKILL leaves no orphaned workers behind."""
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the parent died before the call
            os._exit(0)
    except (OSError, AttributeError):
        pass


def default_worker_count() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


class Workers:
    """A lazily started process pool of ``count`` workers (1 = run inline)."""

    #: a chunk should hold at least this much work: a task handed to a forked worker costs ~0.1 ms
    min_task_seconds: float = 0.002
    #: chunks per worker at most (more than one evens out workers of unequal speed, at a cost per task)
    chunks_per_worker: int = 1

    def __init__(self, count: int | None = None):
        self.count = default_worker_count() if count is None else max(1, int(count))
        self._pool: Executor | None = None
        self._closed = False
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Workers(count={self.count})"

    def chunks(self, total: int, minimum: int = 1, item_seconds: float = 0.0) -> list[range]:
        """Split range(total) into at most ``count * chunks_per_worker`` contiguous chunks of at least
        ``minimum`` items and, when ``item_seconds`` (the estimated cost of one item) is given, at
        least ``min_task_seconds`` of work each."""
        if item_seconds > 0:
            minimum = max(minimum, math.ceil(self.min_task_seconds / item_seconds))
        parts = max(1, min(self.count * self.chunks_per_worker, total // max(1, minimum)))
        size = -(-total // parts) if total else 0
        return [range(i, min(i + size, total)) for i in range(0, total, size)] if total else []

    def map(self, fn: Callable[..., Any], calls: Sequence[tuple]) -> list[Any]:
        """[fn(*args) for args in calls], in parallel when there is more than one call and worker."""
        if self.count <= 1 or len(calls) <= 1:
            return [fn(*args) for args in calls]
        pool = self._executor()
        try:
            futures = [pool.submit(fn, *args) for args in calls]
            return [f.result() for f in futures]
        except BrokenProcessPool as e:
            self._replace_broken(pool)
            raise WorkersUnavailable("a worker process died during this request; the request was abandoned "
                                     "and the pool restarted: retry") from e

    def map_keyed(self, fn: Callable[..., Any], calls: Sequence[tuple], key: WorkerKey) -> list[Any]:
        """[fn(key, *args) for args in calls]: :meth:`map` for work that needs S2's secret key."""
        return self.map(fn, [(key, *args) for args in calls])

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        """fn(*args) in a worker process (a finished future computed here when ``count == 1``).

        Unlike :meth:`map`, one call also goes to a worker: background work (the pool filler,
        :mod:`servers.pools`) must leave the calling process's GIL to the request threads. Tasks run in
        submission order (the executor's queue is FIFO), so a caller that submits small tasks delays
        other callers' tasks by at most one task per worker.
        """
        if self.count <= 1:
            done: Future = Future()
            try:
                done.set_result(fn(*args))
            except BaseException as e:  # noqa: BLE001 -- handed to the caller through the future
                done.set_exception(e)
            return done
        pool = self._executor()
        try:
            return pool.submit(fn, *args)
        except BrokenProcessPool:  # a worker died since the last task: this caller gets a new pool
            self._replace_broken(pool)
            return self._executor().submit(fn, *args)

    def _executor(self) -> Executor:
        with self._lock:
            if self._closed:
                # a background thread outliving the service's shutdown must not start a new pool: one
                # started during interpreter exit races with concurrent.futures' exit hook (EBADF)
                raise RuntimeError("the worker pool was shut down")
            if self._pool is None:
                method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
                self._pool = ProcessPoolExecutor(self.count, mp_context=multiprocessing.get_context(method),
                                                 initializer=_die_with_parent)
            return self._pool

    def _replace_broken(self, pool: Executor) -> None:
        """Drop a pool whose worker died (every task of it fails from then on); the next call forks a new one."""
        with self._lock:
            if self._pool is pool:
                self._pool = None
        pool.shutdown(wait=False, cancel_futures=True)

    def shutdown(self) -> None:
        """Stop the worker processes for good: later parallel calls raise RuntimeError."""
        with self._lock:
            self._closed = True
            if self._pool is not None:
                self._pool.shutdown(cancel_futures=True)
                self._pool = None


def to_blob(values, width: int) -> bytes:
    """Integers in [0, 2^(8 width)) as one bytes object, ``width`` big-endian bytes each: how large
    ciphertext arrays travel to and from worker processes (pickling a bytes object is a copy;
    pickling a list of mpz costs about 2 us per element more)."""
    return b"".join(mpz(v).to_bytes(width, "big") for v in values)


def from_blob(blob: bytes | memoryview, width: int) -> list[mpz]:
    """The integers :func:`to_blob` packed."""
    return [mpz.from_bytes(blob[i:i + width], "big") for i in range(0, len(blob), width)]


#: the default for code paths that are not given a Workers object: run inline
INLINE = Workers(1)
