"""S2, the key cloud: holds the cloud key pair and answers S1's protocol rounds.

A :class:`KeyCloud` takes an encoded request for a named step and returns the encoded reply
(``handle``); the in-process channel calls it directly, the S2 Flask service calls it per HTTP
request. It keeps only what the protocols need between rounds: per-model set-up state (masked
weights K + B) and short-lived tickets between the two rounds of a comparison or a linear layer.
It can record every plaintext it obtains (``record=True``) so tests can show those values do not depend on the user's image.
"""
from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from he_cnn.crypto.dgk import DGKPrivateKey, DGKPublicKey, generate_dgk_keypair
from he_cnn.errors import BadRequest, ProtocolError
from he_cnn.crypto.paillier import MIN_KEY_BITS, KeyPair, PublicKey, UserKeys
from he_cnn.crypto.ot import OTSender
from he_cnn.protocols import aggregate, comparison, identify, linear, millionaire, output, smp
from he_cnn.parallel import INLINE, Workers
from he_cnn.protocols.common import S2WorkerKey
from he_cnn.protocols.linear import LinearGeometry
from he_cnn.trace import NULL_TRACER, Tracer
from he_cnn.wire import Message, decode, encode

HANDLERS: dict[str, Callable[["KeyCloud", Message], Message]] = {
    smp.STEP: smp.s2_multiply,
    linear.SETUP_STEP: linear.s2_setup,
    linear.STEP: linear.s2_linear,
    linear.CROSS_STEP: linear.s2_linear_cross,
    comparison.BITS_STEP: comparison.s2_compare_bits,
    comparison.ZERO_STEP: comparison.s2_compare_zero,
    millionaire.BASE_STEP: millionaire.s2_base,
    millionaire.START_STEP: comparison.s2_compare_ot,
    millionaire.LEVEL_STEP: comparison.s2_compare_ot_level,
    output.STEP: output.s2_to_user,
    **identify.S2_HANDLERS,
    **aggregate.S2_HANDLERS,
}


def worker_key(keys: KeyPair, dgk_private: DGKPrivateKey) -> S2WorkerKey:
    """S2's secret key material for its workers, from the key pair and the DGK private key."""
    return S2WorkerKey(keys.public.key_id, int(keys.private.p), int(keys.private.q), int(dgk_private.public.n),
                       int(dgk_private.p), int(dgk_private.v_p))


class TicketStore:
    """State kept between the rounds of a protocol (comparison, linear layer), dropped after ``ttl``
    seconds or after its last use; with ``max_weight``, the oldest are dropped while the weights of what
    is kept (each value's ``weight`` at :meth:`put`) would exceed it (their steps then fail as for an
    expired ticket)."""

    def __init__(self, ttl: float = 600.0, max_weight: int | None = None):
        self.ttl = ttl
        self.max_weight = max_weight
        self._items: dict[str, tuple[float, int, Any]] = {}
        self._weights: dict[str, int] = {}
        self._total = 0
        self._lock = threading.Lock()

    def put(self, kind: str, value: Any, uses: int = 1, weight: int = 1) -> str:
        """A new ticket for ``value``, good for ``uses`` later steps of kind ``kind``."""
        ticket = secrets.token_hex(16)
        now = time.monotonic()
        with self._lock:
            for k in [k for k, (t, _, _) in self._items.items() if now - t > self.ttl]:
                self._drop(k)
            while self.max_weight is not None and self._items and self._total + weight > self.max_weight:
                self._drop(next(iter(self._items)))  # the oldest: dicts keep insertion order
            self._items[ticket] = (now, uses, (kind, value))
            self._weights[ticket] = weight
            self._total += weight
        return ticket

    def _drop(self, ticket: str) -> None:
        del self._items[ticket]
        self._total -= self._weights.pop(ticket)

    def pop(self, ticket: str, kind: str) -> Any:
        """The value a ``kind`` step stored under ``ticket``; a ticket works for its own kind only, and
        as many times as it was issued for."""
        with self._lock:
            item = self._items.get(ticket)
            if item is not None and item[2][0] == kind:
                if item[1] > 1:
                    self._items[ticket] = (item[0], item[1] - 1, item[2])
                else:
                    self._drop(ticket)
        if item is None:
            raise ProtocolError(f"unknown or expired {kind} ticket")
        stored_kind, value = item[2]
        if stored_kind != kind:
            raise ProtocolError(f"ticket belongs to a {stored_kind} step, not to {kind}")
        return value

    def __len__(self) -> int:
        return len(self._items)


@dataclass
class Observation:
    step: str
    values: list[int]
    bits: int
    kappa: int


@dataclass(eq=False)
class KeyCloud:
    keys: KeyPair
    dgk_public: DGKPublicKey
    dgk_private: DGKPrivateKey
    record: bool = False
    min_user_key_bits: int = MIN_KEY_BITS
    tickets: TicketStore = field(default_factory=TicketStore)
    observations: list[Observation] = field(default_factory=list)
    setups: dict[str, dict[str, tuple[np.ndarray, LinearGeometry]]] = field(default_factory=dict)
    #: process pool for the heavy loops (inline by default)
    workers: Workers = field(default_factory=lambda: INLINE)
    #: called after a set-up is stored (the service persists it)
    on_setup: Callable[[str, dict], None] | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    #: the users' keys seen lately (S2 encrypts each answer under one)
    user_keys: UserKeys = field(default_factory=UserKeys)
    #: hears about S2's heavy operations (:mod:`he_cnn.trace`)
    tracer: Tracer = NULL_TRACER
    #: S2's ends of the OT links, by session id (:func:`he_cnn.protocols.millionaire.s2_base`; oldest first)
    ot_links: dict[str, OTSender] = field(default_factory=dict)
    #: per gallery its shape and the seeds of its masked templates (:mod:`he_cnn.protocols.identify`)
    galleries: dict[str, "identify.S2Gallery"] = field(default_factory=dict)
    #: prepared identification queries' masks, kept until used (S1 prepares them in the background)
    prepared: TicketStore = field(default_factory=lambda: TicketStore(identify.PREPARED_SECONDS,
                                                                      identify.MAX_PREPARED_FEATURES))
    #: the same for batches between their two rounds
    preparing: TicketStore = field(default_factory=lambda: TicketStore(identify.PREPARING_SECONDS,
                                                                       identify.MAX_PREPARING_FEATURES))
    #: called after a gallery's seeds change (the service persists them)
    on_gallery: Callable[[str, "identify.S2Gallery | None"], None] | None = None

    def __post_init__(self) -> None:
        self.dgk_public.pool_pairs = True  # S2 encrypts bits: its pool keeps g h^r beside h^r
        #: the key as S2's workers use it (keyed work: :meth:`he_cnn.parallel.Workers.map_keyed`)
        self.worker_key = worker_key(self.keys, self.dgk_private)

    @classmethod
    def create(cls, keys: KeyPair, **kwargs) -> "KeyCloud":
        dgk_pub, dgk_priv = generate_dgk_keypair(keys.public.bits)
        return cls(keys, dgk_pub, dgk_priv, **kwargs)

    # -- protocol entry point ---------------------------------------------------------------------
    def handle(self, step: str, payload: bytes) -> bytes:
        handler = HANDLERS.get(step)
        if handler is None:
            raise BadRequest(f"unknown protocol step {step!r}; expected one of {sorted(HANDLERS)}")
        with self.tracer.op("s2_other"):  # what the handlers' own operations leave over
            with self.tracer.op("s2_wire"):
                request = decode(payload)
            reply = handler(self, request)
            with self.tracer.op("s2_wire"):
                return encode(reply)

    # -- state used by the handlers ---------------------------------------------------------------
    def observe(self, step: str, values: list[int], bits: int, kappa: int) -> None:
        if self.record:
            with self._lock:
                self.observations.append(Observation(step, list(values), bits, kappa))

    def store_setup(self, setup_id: str, layers: dict[str, tuple[np.ndarray, LinearGeometry]]) -> None:
        with self._lock:
            self.setups[setup_id] = layers
        if self.on_setup is not None:
            self.on_setup(setup_id, layers)

    def user_key(self, n: int) -> PublicKey:
        """The user's public key for modulus n, kept with its randomizer table and pool for the user's
        next query (:class:`~he_cnn.crypto.paillier.UserKeys`; the service's pool filler tops the pools up)."""
        return self.user_keys.get(n)

    def setup_layer(self, setup_id: str, layer: str) -> tuple[np.ndarray, LinearGeometry]:
        try:
            return self.setups[setup_id][layer]
        except KeyError:
            raise ProtocolError(f"unknown model set-up {setup_id!r} / layer {layer!r}: run the set-up first") from None
