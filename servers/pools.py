"""Refilling a cloud's randomness pools on all its workers: the offline phase of a running service.

Every Paillier and DGK encryption and re-randomisation needs a fresh randomizer (``h^e``, tens of
modular multiplications). A :class:`PoolFiller` thread computes them ahead of time into the keys'
:class:`~he_cnn.crypto.paillier.RandomnessPool` objects, so that inside a query each costs one
multiplication (or, for DGK, a slice of bytes).

**Where the work runs: the cloud's worker processes.** The filler hands chunks to the cloud's
:class:`~he_cnn.parallel.Workers` (``Workers.submit`` of :func:`~he_cnn.crypto.paillier.pool_values`
with the pool's public :class:`~he_cnn.crypto.paillier.PoolRecipe`); each worker builds the key's
fixed-base table on its first chunk, keeps it in a module-level cache, and returns the values as one
blob that the filler appends to the pool. Processes rather than threads: gmpy2 releases the GIL in
``powmod`` and in ``powmod_exp_list`` / ``powmod_base_list``, but a full 256-bit exponentiation costs 7x
the 32 table multiplications of a randomizer (1.2 ms against 0.16 ms at 2048 bits, measured), and
those short multiplications, each a separate gmpy2 call between Python bytecodes, hold the GIL: threads
running the table method would take turns on one core and slow the request threads. With one worker
(``--workers 1``) the filler computes in its own thread, 64 values at a time, as before.

**When: while idle, and under load when a pool runs low.**

- *Idle* (no POST request for ``quiet_seconds``): every pool is topped up to its target, with one
  chunk of ``IDLE_CHUNK`` values per worker at a time, so a request that arrives waits at most one
  chunk (~40 ms at 2048 bits) for the workers. Idle-only filling was the only mode before: S1 and S2
  alternate during a query, and a filler that ran whenever its own cloud waited would take the other
  cloud's cores.
- *Busy*, below the low watermark: the filler learns what one query draws from each pool
  (``RandomnessPool.taken`` between two :meth:`PoolFiller.mark_query` calls, the largest of the last
  ``DRAW_HISTORY`` queries). A pool with fewer values than that would make the next query compute
  randomizers inline, in its request thread, one at a time: far worse for that query than sharing the
  workers. So below it the filler keeps filling while requests run, at a bounded rate: tasks of
  ``BUSY_CHUNK`` values (~20 ms) on at most ``BUSY_SHARE`` of the workers. The executor's queue is FIFO,
  so a query's own tasks wait at most one such chunk per worker. With one worker there is no other
  core to use and the filler stays idle-only. Back-to-back queries thus find their randomizers
  precomputed instead of computing them inline.

The pool size comes from ``HECNN_RANDOMNESS_POOL`` (DGK randomizers; Paillier gets a fifth at S2, a 12th
at S1; 0 turns filling off). A pool can be inactive: S1 keeps no DGK pool with the OT comparison, and
S2 fills its DGK pool only once it has served a DGK comparison (:meth:`PoolFiller.activate`), so no
cloud pre-computes 130,000 DGK randomizers the default protocol never uses. Both clouds also top up,
first and while idle, the pool of every user key they keep (``USER_KEY_POOL`` randomizers each): a
user's first answer pays for the key's randomizer table, the later ones draw precomputed randomizers.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from concurrent.futures import CancelledError
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Callable, Sequence, Union

from flask import Flask, request

from he_cnn.crypto.paillier import RandomnessPool
from he_cnn.errors import WorkersUnavailable
from he_cnn.parallel import INLINE, Workers

#: one 2048-bit ICNN query with the DGK comparison draws ~123,000 DGK randomizers at each cloud,
#: ~25,000 Paillier ones at S2 and ~10,000 at S1
DEFAULT_DGK_POOL = 130_000
#: randomizers kept per user key (at each cloud): one per class per answer, for a few answers
USER_KEY_POOL = 64
#: values per step when the filler computes in its own thread (one worker)
CHUNK = 64
#: values per worker task while the cloud is idle (~40 ms at 2048 bits)
IDLE_CHUNK = 256
#: values per worker task while requests run (~20 ms at 2048 bits)
BUSY_CHUNK = 128
#: share of the workers the filler may occupy while requests run (at least one)
BUSY_SHARE = 0.5
#: queries whose draw from a pool sets its low watermark (the largest of them)
DRAW_HISTORY = 4

log = logging.getLogger("he_cnn.servers.pools")

#: a pool with its target, as given to :class:`PoolFiller`: (pool, target) or (pool, target, name) or
#: (pool, target, name, active)
PoolSpec = Union[tuple[RandomnessPool, int], tuple[RandomnessPool, int, str], tuple[RandomnessPool, int, str, bool]]
PoolList = list[tuple[RandomnessPool, int]]


def pool_target() -> int:
    try:
        return max(0, int(os.environ.get("HECNN_RANDOMNESS_POOL", DEFAULT_DGK_POOL)))
    except ValueError:
        return DEFAULT_DGK_POOL


@dataclass(eq=False)
class TrackedPool:
    """A pool the filler keeps at ``target`` (when ``active``), with what the last queries drew from it."""

    name: str
    pool: RandomnessPool
    target: int
    active: bool = True
    draws: deque = field(default_factory=lambda: deque(maxlen=DRAW_HISTORY))
    taken_at_mark: int = 0

    @property
    def goal(self) -> int:
        """The size the filler works towards: the target, or 0 while inactive."""
        return self.target if self.active else 0

    @property
    def low_watermark(self) -> int:
        """One query's draw (the largest of the last few), at most the target: below it the filler also
        works while requests run."""
        return min(self.goal, max(self.draws, default=0))


class PoolFiller:
    """A daemon thread topping up pools: ``pools`` always (while active), and those ``more()`` returns
    at the time (pools that come and go, such as the user keys'), those first and only while idle.

    ``workers`` is the cloud's process pool; the filler shares it with the requests (see the module's
    docstring for when and how much).
    """

    def __init__(self, app: Flask, pools: Sequence[PoolSpec], quiet_seconds: float = 2.0,
                 more: Callable[[], PoolList] | None = None, workers: Workers = INLINE):
        self.tracked = [TrackedPool(spec[2] if len(spec) > 2 else f"pool{i}", spec[0], spec[1],  # type: ignore[misc]
                                    spec[3] if len(spec) > 3 else True)  # type: ignore[misc]
                        for i, spec in enumerate(pools) if spec[1] > 0]
        for t in self.tracked:
            t.taken_at_mark = t.pool.taken
        self.more = more
        self.quiet_seconds = quiet_seconds
        self.workers = workers
        #: values added while the cloud was idle, and while requests ran (below a low watermark)
        self.filled = {"idle": 0, "busy": 0}
        self._last_request = time.monotonic()
        self._active = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        app.before_request(self._request_started)
        app.teardown_request(self._request_finished)
        self._thread = threading.Thread(target=self._run, name="he-cnn-pool-filler", daemon=True)
        if self.tracked or more is not None:
            self._thread.start()

    # -- what the app tells the filler ------------------------------------------------------------
    @staticmethod
    def _counts() -> bool:
        """Only POSTs (protocol rounds, uploads, queries) are work. GETs (health, public key, model
        list) are cheap: a monitor polling them must not keep the pools empty, and S1's health check
        itself fetches S2's public key."""
        return request.method != "GET"

    def _request_started(self) -> None:
        if self._counts():
            with self._lock:
                self._active += 1
                self._last_request = time.monotonic()

    def _request_finished(self, _error: BaseException | None = None) -> None:
        if self._counts():
            with self._lock:
                self._active -= 1
                self._last_request = time.monotonic()

    def mark_query(self) -> None:
        """A query ended (S1: a classification; S2: its ``to_user`` step): record each pool's draw since
        the previous mark. With queries overlapping, a draw may include part of another query's: the
        watermark errs high, which only means filling a little earlier."""
        with self._lock:
            for t in self.tracked:
                taken = t.pool.taken
                t.draws.append(taken - t.taken_at_mark)
                t.taken_at_mark = taken

    def activate(self, name: str) -> None:
        """Start filling the pool ``name`` (S2's DGK pool once S1 asked for a DGK comparison)."""
        for t in self.tracked:
            if t.name == name and not t.active:
                t.active = True
                log.info("filling the %s randomness pool from now on (target %d)", name, t.target)

    # -- reports ----------------------------------------------------------------------------------
    @property
    def pools(self) -> PoolList:
        """(pool, current goal) of every tracked pool."""
        return [(t.pool, t.goal) for t in self.tracked]

    def status(self) -> dict:
        """Whether every pool is at its goal, and (size, goal) per pool (an inactive pool's goal is 0)."""
        levels = [[len(t.pool), t.goal] for t in self.tracked]
        return {"full": all(n >= goal for n, goal in levels), "levels": levels}

    def detail(self) -> dict:
        """For the health endpoint (``pool_detail``, beside :meth:`status` as ``pools``): per pool by name
        its size, target (0 while inactive), whether it is filled, its low watermark and the last query's
        draw; the user keys' pools together; the values added while idle and while busy; the workers."""
        named = {t.name: {"size": len(t.pool), "target": t.goal, "active": t.active,
                          "low_watermark": t.low_watermark, "last_query_draw": t.draws[-1] if t.draws else None}
                 for t in self.tracked}
        extra = self.more() if self.more is not None else []
        return {"named": named,
                "user_keys": {"keys": len(extra), "size": sum(len(p) for p, _ in extra),
                              "target": sum(t for _, t in extra)},
                "filled": dict(self.filled), "workers": self.workers.count}

    def running(self) -> int:
        """POST requests in progress."""
        with self._lock:
            return self._active

    def busy(self) -> bool:
        """True while a request runs (or has just run) or some work marked itself busy."""
        with self._lock:
            return self._active > 0 or time.monotonic() - self._last_request < self.quiet_seconds

    # -- the thread -------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                worked = self._step()
            except (WorkersUnavailable, BrokenProcessPool) as e:  # a worker died (its pool restarts): no traceback
                if self._stop.is_set():
                    return
                log.warning("randomness pool filling stopped: %s; retrying in 1 s", e)
                self._stop.wait(1.0)
                continue
            except (Exception, CancelledError):  # the worker pool shut down under it
                if self._stop.is_set():
                    return
                log.exception("randomness pool filling failed; retrying in 1 s")
                self._stop.wait(1.0)
                continue
            if not worked:
                self._stop.wait(0.2)

    def _step(self) -> bool:
        """Add one round of chunks to the pool that needs it most; False if there was nothing to do."""
        if not self.busy():
            extra = self.more() if self.more is not None else []  # small pools (a user's next answer) first
            pending = [(p, t) for p, t in extra if len(p) < t] + \
                      [(t.pool, t.goal) for t in self.tracked if len(t.pool) < t.goal]
            if not pending:
                return False
            pool, goal = pending[0]
            self.filled["idle"] += self._fill(pool, goal - len(pool), IDLE_CHUNK, self.workers.count)
            return True
        if self.workers.count <= 1:
            return False  # the filler's thread would only take the request threads' GIL
        low = [t for t in self.tracked if len(t.pool) < t.low_watermark and t.pool.recipe() is not None]
        if not low:
            return False
        t = min(low, key=lambda t: len(t.pool) / t.low_watermark)
        tasks = max(1, int(self.workers.count * BUSY_SHARE))
        self.filled["busy"] += self._fill(t.pool, t.low_watermark - len(t.pool), BUSY_CHUNK, tasks)
        return True

    def _fill(self, pool: RandomnessPool, missing: int, chunk: int, tasks: int) -> int:
        """Add about ``missing`` values (at most ``tasks`` chunks of ``chunk``) to ``pool``: in the worker
        processes when there are several and the pool has a recipe, else ``CHUNK`` here. How many were added."""
        before = len(pool)
        recipe = pool.recipe() if self.workers.count > 1 else None
        if recipe is None:
            pool.fill(before + min(missing, CHUNK))
            return max(0, len(pool) - before)  # (draws meanwhile can only make this an undercount)
        # at least CHUNK values per task: a small pool (a user key's 64) goes to one worker, not one table
        # build per worker for a few values each
        per = max(1, min(chunk, max(CHUNK, -(-missing // tasks))))
        return pool.fill_on(self.workers, recipe, min(tasks, -(-missing // per)), per)

    def shutdown(self) -> None:
        self._stop.set()
