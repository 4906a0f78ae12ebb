"""Refilling a cloud's randomness pools while it is idle: the offline phase of a running service.

Every Paillier and DGK encryption and re-randomisation needs a fresh randomizer (``h^e``, tens of
modular multiplications). A :class:`PoolFiller` thread computes them ahead of time into the keys'
:class:`~he_cnn.crypto.paillier.RandomnessPool` objects, so that inside a query each costs one multiplication.
It works only while the app has had no POST request for ``quiet_seconds``: S1 and S2 alternate during a
query, and a filler that ran whenever its own cloud waited would take the other cloud's core.
The pool size comes from ``HECNN_RANDOMNESS_POOL`` (DGK randomizers; Paillier gets a fifth at S2, a 12th at S1;
0 turns filling off). Both clouds also top up, first, the pool of every user key they keep
(``USER_KEY_POOL`` randomizers each): a user's first answer pays for the key's randomizer table, the
later ones draw precomputed randomizers.
"""
from __future__ import annotations

import os
import threading
import time
from typing import Callable

from flask import Flask, request

from he_cnn.crypto.paillier import RandomnessPool

#: one 2048-bit ICNN query draws ~123,000 DGK randomizers at each cloud, ~25,000 Paillier ones at S2
#: and ~10,000 at S1
DEFAULT_DGK_POOL = 130_000
#: randomizers kept per user key (at each cloud): one per class per answer, for a few answers
USER_KEY_POOL = 64
CHUNK = 64

PoolList = list[tuple[RandomnessPool, int]]


def pool_target() -> int:
    try:
        return max(0, int(os.environ.get("HECNN_RANDOMNESS_POOL", DEFAULT_DGK_POOL)))
    except ValueError:
        return DEFAULT_DGK_POOL


class PoolFiller:
    """A daemon thread topping up (pool, target) pairs while the app is quiet: ``pools`` always, and
    those ``more()`` returns at the time (pools that come and go, such as the user keys'), those first."""

    def __init__(self, app: Flask, pools: PoolList, quiet_seconds: float = 2.0,
                 more: Callable[[], PoolList] | None = None):
        self.pools = [(p, t) for p, t in pools if t > 0]
        self.more = more
        self.quiet_seconds = quiet_seconds
        self._last_request = time.monotonic()
        self._active = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        app.before_request(self._request_started)
        app.teardown_request(self._request_finished)
        self._thread = threading.Thread(target=self._run, name="he-cnn-pool-filler", daemon=True)
        if self.pools or more is not None:
            self._thread.start()

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

    def status(self) -> dict:
        """For the health endpoint: whether every pool is at its target, and (size, target) per pool."""
        levels = [[len(p), t] for p, t in self.pools]
        return {"full": all(n >= t for n, t in levels), "levels": levels}

    def busy(self) -> bool:
        """True while a request runs (or has just run) or some work marked itself busy."""
        with self._lock:
            return self._active > 0 or time.monotonic() - self._last_request < self.quiet_seconds

    def _run(self) -> None:
        while not self._stop.is_set():
            extra = self.more() if self.more is not None else []  # small pools (a user's next answer) first
            pending = [(p, t) for p, t in extra + self.pools if len(p) < t]
            if not pending or self.busy():
                self._stop.wait(0.2)
                continue
            pool, target = pending[0]
            pool.fill(min(target, len(pool) + CHUNK))

    def shutdown(self) -> None:
        self._stop.set()
