"""The channel: the one way S1 talks to S2, one request per protocol round.

A :class:`Channel` sends a :class:`~he_cnn.wire.Message` for a named protocol step and returns S2's
reply. Implementations differ only in transport: :class:`InProcessChannel` hands the encoded bytes
to a :class:`~he_cnn.parties.key_cloud.KeyCloud` object in the same process (tests, benchmarks); the HTTP channel
(:mod:`he_cnn.transport.http_channel`) posts them to the S2 service. Both encode to the same wire bytes and
both count rounds, bytes each way and seconds, per step name.
"""
from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable

from he_cnn.trace import NULL_TRACER, Tracer
from he_cnn.wire import Message, decode, encode


@dataclass
class StepStats:
    rounds: int = 0
    bytes_to_s2: int = 0
    bytes_to_s1: int = 0
    seconds: float = 0.0


@dataclass
class ChannelStats:
    """Totals and a per-step breakdown of everything that crossed the channel."""

    steps: dict[str, StepStats] = field(default_factory=lambda: defaultdict(StepStats))

    def record(self, step: str, sent: int, received: int, seconds: float) -> None:
        s = self.steps[step]
        s.rounds += 1
        s.bytes_to_s2 += sent
        s.bytes_to_s1 += received
        s.seconds += seconds

    @property
    def rounds(self) -> int:
        return sum(s.rounds for s in self.steps.values())

    @property
    def bytes_to_s2(self) -> int:
        return sum(s.bytes_to_s2 for s in self.steps.values())

    @property
    def bytes_to_s1(self) -> int:
        return sum(s.bytes_to_s1 for s in self.steps.values())

    @property
    def seconds(self) -> float:
        return sum(s.seconds for s in self.steps.values())

    def snapshot(self) -> tuple[int, int, int, float]:
        return self.rounds, self.bytes_to_s2, self.bytes_to_s1, self.seconds

    def as_dict(self) -> dict:
        return {"rounds": self.rounds, "bytes_to_s2": self.bytes_to_s2, "bytes_to_s1": self.bytes_to_s1,
                "seconds": round(self.seconds, 6)}


class Channel(ABC):
    """S1's end of the link to S2. ``request`` is one protocol round."""

    def __init__(self) -> None:
        self.stats = ChannelStats()
        self._lock = threading.Lock()
        #: hears about wire encoding (``s1_wire``) and, over a network, the exchange (``s2_http``)
        self.tracer: Tracer = NULL_TRACER

    def request(self, step: str, message: Message) -> Message:
        with self.tracer.op("s1_wire"):
            payload = encode(message)
        start = time.perf_counter()
        reply = self._exchange(step, payload)
        elapsed = time.perf_counter() - start
        with self._lock:
            self.stats.record(step, len(payload), len(reply), elapsed)
        with self.tracer.op("s1_wire"):
            return decode(reply)

    @abstractmethod
    def _exchange(self, step: str, payload: bytes) -> bytes:
        """Deliver the encoded request for ``step`` and return the encoded reply."""


class InProcessChannel(Channel):
    """Delivers to an S2 handler in the same process (no network, same bytes)."""

    def __init__(self, handler: Callable[[str, bytes], bytes]):
        super().__init__()
        self._handler = handler

    def _exchange(self, step: str, payload: bytes) -> bytes:
        return self._handler(step, payload)
