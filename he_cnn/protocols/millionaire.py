"""The millionaires' comparison on oblivious transfer: the default way a comparison gets its bit.

S2 holds a = d mod 2^k (it decrypted d = x + M), S1 holds b = M mod 2^k; the comparison needs the
carry [a < b] (:mod:`he_cnn.protocols.comparison`, steps 2-4). Here the two clouds compute it as a
boolean circuit on XOR shares (GMW), with every AND gate paid by random OTs instead of public-key work:

  leaves  for each bit i (most significant first): lt_i = (1 - a_i) b_i, a product of S2's and S1's
          private bits: one random OT, derandomised (S1 sends e = b_i xor c, S2 answers
          y_v = x_(v xor e) xor sigma xor v (1 - a_i) for v = 0, 1; S1 keeps y_(b_i) xor x_c, S2 keeps sigma);
          eq_i = 1 xor a_i xor b_i is local (S2's share 1 xor a_i, S1's b_i);
  tree    neighbours (hi, lo) combine as lt = lt_hi xor (eq_hi and lt_lo), eq = eq_hi and eq_lo
          (lt_hi and the product exclude each other, so xor is or): ceil(log2 k) levels, the last one
          without eq; an odd last column passes through;
  AND     Beaver triples: each party opens D_i = X_i xor A_i, E_i = Y_i xor B_i, then
          Z_i = C_i xor D B_i xor E A_i (xor D E at S1), with D = D_1 xor D_2, E = E_1 xor E_2;
  triples from two random OTs (S2 sender, S1 receiver; no message beyond the extension's):
          OT p gives A_1 = c_p, B_2 = x0_p xor x1_p and shares x_(c_p), x0_p of A_1 B_2;
          OT q gives B_1 = c_q, A_2 = x0_q xor x1_q and shares x_(c_q), x0_q of A_2 B_1;
          C_1 = A_1 B_1 xor x_(c_p) xor x_(c_q),  C_2 = A_2 B_2 xor x0_p xor x0_q.

Rounds. Each party sends its openings of a level as soon as it has its inputs to that level, so a
request and its reply carry two levels: the first request (S1's reveal of d, its e bits and the
extension message u) is answered with S2's leaf messages and its openings of level 1; then every
request carries S1's openings of two levels. A k-bit comparison takes 1 + ceil(L / 2) requests with
L = ceil(log2 k) (2 for k <= 4, 3 for k <= 16, 4 for k <= 64); the last reply is S2's encrypted
result (as the DGK comparison's ``compare_zero`` reply), made with S2's share of the carry.

Cost per element of k >= 2 bits: k + 2 (2k - 3) random OTs (1 for k = 1) (16 bytes each S1 -> S2 and a few AES blocks),
a few bits per AND gate each way, and no public-key operation beyond the reveal and the reply.

What each cloud learns (semi-honest; the proof is in docs/protocol.md): S2 sees u (each column masked
by a PRG output it cannot compute), e = b xor c (c is hidden by the OT), and S1's openings (each masked
by a fresh triple share A_1 = c_p or B_1 = c_q, hidden by the OT): uniformly random bits, whatever
the inputs. S1 sees S2's y_(1 - b) (masked by x_(1 - c), which the OT hides from it) and S2's
openings (masked by A_2, B_2 = x0 xor x1, half of which the OT hides): uniform as well. The outputs
are XOR shares, each uniform alone.
"""
from __future__ import annotations

import secrets
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import numpy as np

from he_cnn.crypto import ot
from he_cnn.errors import ProtocolError, UnknownOTSession
from he_cnn.wire import Message

if TYPE_CHECKING:
    from he_cnn.parties.key_cloud import KeyCloud
    from he_cnn.protocols.common import S1Context

BASE_STEP = "ot_base"
#: widest comparison the OT circuit takes (bounds S2's memory per element; the ICNN compares <= 24 bits)
MAX_BITS = 256
START_STEP = "compare_ot"
LEVEL_STEP = "compare_ot_level"


# -- the circuit's shape ----------------------------------------------------------------------------

def level_widths(k: int) -> list[int]:
    """The number of columns entering each tree level of a k-bit comparison (none for k <= 1)."""
    widths = []
    while k > 1:
        widths.append(k)
        k = (k + 1) // 2
    return widths


def ands_per_element(width: int) -> int:
    """AND gates one element needs at a level entered by ``width`` columns (the last level has no eq)."""
    pairs = width // 2
    return 2 * pairs if width > 2 else pairs


def rot_count(n: int, k: int) -> int:
    """Random OTs for n comparisons of k bits: one per leaf, two per AND gate."""
    return n * k + 2 * n * sum(ands_per_element(w) for w in level_widths(k))


def requests_needed(k: int) -> int:
    """Requests S1 sends for one k-bit comparison (the module docstring's rounds)."""
    return 1 + (len(level_widths(k)) + 1) // 2


def bit_matrix(values: Sequence[int], k: int) -> np.ndarray:
    """(n, k) uint8: the low k bits of each value, most significant first."""
    return np.ascontiguousarray(lsb_bits(values, k)[:, ::-1])


# -- the product's bit OTs: e * M without an exponentiation -------------------------------------------

#: bits of slack in the product pads' masks rho_j < 2^(j + PRODUCT_SLACK): each term hides its bit
#: product with statistical distance <= 2^-48, a whole element's (at most 79 terms) < 2^-41
PRODUCT_SLACK = 48
_LOW64 = (1 << 64) - 1


def product_width(l: int, kappa: int) -> int | None:
    """Bits of the masks M = 2^l + r (r < 2^(l+1+kappa)) whose product with S2's bit e the product OTs
    carry, or None when rho_j + 2^j would not fit a 128-bit pad (then S1 exponentiates instead)."""
    width = l + kappa + 2
    return width if width + PRODUCT_SLACK + 1 <= 128 else None


def lsb_bits(values: Sequence[int], width: int) -> np.ndarray:
    """(n, width) uint8: bit j of each value in column j (least significant first), 64 bits at a time."""
    out = np.empty((len(values), width), dtype=np.uint8)
    shifts = np.arange(64, dtype=np.uint64)
    for start in range(0, width, 64):
        word = np.fromiter(((int(v) >> start) & _LOW64 for v in values), dtype=np.uint64, count=len(values))
        bits = (word[:, None] >> shifts[None, :min(64, width - start)]) & np.uint64(1)
        out[:, start:start + bits.shape[1]] = bits
    return out


def _blocks(hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
    """(..., 16) big-endian bytes of the 128-bit values hi * 2^64 + lo."""
    def be(a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(a, dtype=">u8").view(np.uint8).reshape(a.shape + (8,))

    return np.concatenate([be(hi), be(lo)], axis=-1)


def _words(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    words = np.ascontiguousarray(blocks, dtype=np.uint8).view(">u8").astype(np.uint64)  # (..., 2)
    return words[..., 0], words[..., 1]


def _row_sums(hi: np.ndarray, lo: np.ndarray) -> list[int]:
    """Exact sum over axis 1 of (n, w) 128-bit values (w < 2^31): 32-bit limbs summed in 64 bits."""
    m32 = np.uint64(0xFFFFFFFF)
    limbs = [(lo & m32).sum(axis=1), (lo >> np.uint64(32)).sum(axis=1),
             (hi & m32).sum(axis=1), (hi >> np.uint64(32)).sum(axis=1)]
    return [int(a) + (int(b) << 32) + (int(c) << 64) + (int(d) << 96) for a, b, c, d in zip(*limbs)]


def product_answer(pads0: np.ndarray, pads1: np.ndarray, corrections: np.ndarray, e: np.ndarray
                   ) -> tuple[np.ndarray, list[int]]:
    """S2: the product OTs' answers y_v = P_(v xor w) xor (rho_j + v e 2^j), shape (2, n, w, 16), and
    R = sum_j rho_j per element (S1 unmasks Q = R + e M)."""
    n, width = corrections.shape
    words = np.frombuffer(ot.os.urandom(n * width * 16), dtype=">u8").astype(np.uint64).reshape(n, width, 2)
    bits = [j + PRODUCT_SLACK for j in range(width)]  # rho_j < 2^bits, bits <= 127
    lo_mask = np.array([_LOW64 if b >= 64 else (1 << b) - 1 for b in bits], dtype=np.uint64)
    hi_mask = np.array([(1 << (b - 64)) - 1 if b >= 64 else 0 for b in bits], dtype=np.uint64)
    hi, lo = words[..., 0] & hi_mask, words[..., 1] & lo_mask
    ev = e[:, None].astype(np.uint64)
    add_lo = np.array([1 << j if j < 64 else 0 for j in range(width)], dtype=np.uint64)[None, :] * ev
    add_hi = np.array([1 << (j - 64) if j >= 64 else 0 for j in range(width)], dtype=np.uint64)[None, :] * ev
    lo1 = lo + add_lo
    hi1 = hi + add_hi + (lo1 < lo).astype(np.uint64)
    w = corrections[..., None] == 1
    y0 = np.where(w, pads1, pads0) ^ _blocks(hi, lo)
    y1 = np.where(w, pads0, pads1) ^ _blocks(hi1, lo1)
    return np.stack([y0, y1]), _row_sums(hi, lo)


def product_sums(answers: np.ndarray, m_bits: np.ndarray, pads: np.ndarray) -> list[int]:
    """S1: Q = sum_j (rho_j + M_j e 2^j) per element, from S2's answers (2, n, w, 16), its mask bits
    M_j (n, w) and its chosen pads x_c (n, w, 16)."""
    chosen = np.where(m_bits[..., None] == 1, answers[1], answers[0]) ^ pads
    return _row_sums(*_words(chosen))


# -- triples and the AND levels ---------------------------------------------------------------------

def receiver_triples(choices: np.ndarray, chosen: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """S1's shares (A_1, B_1, C_1) of the triples made from OT pairs (p, q) = (2t, 2t + 1)."""
    c_p, c_q, x_p, x_q = choices[0::2], choices[1::2], chosen[0::2], chosen[1::2]
    return c_p, c_q, (c_p & c_q) ^ x_p ^ x_q


def sender_triples(x0: np.ndarray, x1: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """S2's shares (A_2, B_2, C_2) of the same triples."""
    b2, a2 = x0[0::2] ^ x1[0::2], x0[1::2] ^ x1[1::2]
    return a2, b2, (a2 & b2) ^ x0[0::2] ^ x0[1::2]


@dataclass
class CircuitState:
    """One party's shares of the comparison circuit between rounds (``party`` 0 is S1, 1 is S2)."""

    party: int
    lt: np.ndarray  # (n, width) shares
    eq: np.ndarray
    triples: tuple[np.ndarray, np.ndarray, np.ndarray]
    widths: list[int]
    opened: int = 0
    completed: int = 0
    _offset: int = 0
    _open: tuple | None = None

    @property
    def done(self) -> bool:
        return self.completed == len(self.widths)

    def result(self) -> np.ndarray:
        """This party's share of [a < b] per element (zeros for a 0-bit comparison)."""
        if not self.done:
            raise ProtocolError("the comparison circuit is not finished")
        n = self.lt.shape[0]
        return self.lt[:, 0].copy() if self.lt.shape[1] else np.zeros(n, dtype=np.uint8)

    def opening_size(self, level: int) -> int:
        return 2 * self.lt.shape[0] * ands_per_element(self.widths[level])

    def open(self) -> np.ndarray:
        """This party's openings (D, E) of the next level's AND gates, as one bit vector."""
        if self.opened != self.completed or self.done:
            raise ProtocolError("comparison circuit opened out of order")
        w = self.widths[self.opened]
        p = w // 2
        eq_hi, lt_lo, eq_lo = self.eq[:, 0:2 * p:2], self.lt[:, 1:2 * p:2], self.eq[:, 1:2 * p:2]
        if w > 2:
            x, y = np.concatenate([eq_hi, eq_hi], axis=1), np.concatenate([lt_lo, eq_lo], axis=1)
        else:
            x, y = eq_hi, lt_lo
        x, y = x.reshape(-1), y.reshape(-1)
        count = x.size
        a, b, c = (t[self._offset:self._offset + count] for t in self.triples)
        if a.size != count:
            raise ProtocolError("the comparison ran out of AND triples")
        self._offset += count
        d, e = x ^ a, y ^ b
        self._open = (a, b, c, d, e)
        self.opened += 1
        return np.concatenate([d, e])

    def complete(self, other: np.ndarray) -> None:
        """Finish the opened level with the other party's openings."""
        if self.opened != self.completed + 1 or self._open is None:
            raise ProtocolError("comparison circuit completed out of order")
        a, b, c, d, e = self._open
        if other.shape != (2 * d.size,):
            raise ProtocolError(f"expected {2 * d.size} opening bits, got {other.size}")
        dd, ee = d ^ other[:d.size], e ^ other[d.size:]
        z = c ^ (dd & b) ^ (ee & a)
        if self.party == 0:
            z ^= dd & ee
        n, w = self.lt.shape
        p = w // 2
        lt_hi = self.lt[:, 0:2 * p:2]
        if w > 2:
            z = z.reshape(n, 2 * p)  # per element: its p lt gates, then its p eq gates (as opened)
            new_lt, new_eq = lt_hi ^ z[:, :p], z[:, p:]
        else:
            new_lt, new_eq = lt_hi ^ z.reshape(n, p), np.zeros((n, p), dtype=np.uint8)
        if w % 2:
            new_lt = np.concatenate([new_lt, self.lt[:, -1:]], axis=1)
            new_eq = np.concatenate([new_eq, self.eq[:, -1:]], axis=1)
        self.lt, self.eq = new_lt, new_eq
        self._open = None
        self.completed += 1


def s1_round(state: CircuitState, received: list[np.ndarray]) -> list[np.ndarray]:
    """S1 completes the levels S2's openings allow, opening each level first if it has not yet, and
    opens the next one: what goes in its next request."""
    ops = []
    for other in received:
        if state.opened == state.completed:
            ops.append(state.open())
        state.complete(other)
    if not state.done and state.opened == state.completed:
        ops.append(state.open())
    return ops


def s2_round(state: CircuitState, received: list[np.ndarray]) -> list[np.ndarray]:
    """S2 completes a level per opening of S1's and opens the next one right away: its reply's openings."""
    out = []
    for other in received:
        state.complete(other)
        if not state.done:
            out.append(state.open())
    return out


# -- bits on the wire -------------------------------------------------------------------------------

def set_bits(msg: Message, name: str, bits: np.ndarray) -> None:
    packed = np.packbits(bits.reshape(-1)).tobytes()
    msg.set_blob(name, packed, 1, (len(packed),))


def read_bits(msg: Message, name: str, count: int) -> np.ndarray:
    data = msg.payload(name)
    if len(data) != (count + 7) // 8:
        raise ProtocolError(f"field {name!r} holds {len(data)} bytes, expected {(count + 7) // 8} for {count} bits")
    return np.unpackbits(np.frombuffer(data, dtype=np.uint8))[:count]


def set_openings(msg: Message, ops: list[np.ndarray]) -> None:
    msg.meta["openings"] = [int(o.size) for o in ops]
    set_bits(msg, "openings", np.concatenate(ops) if ops else np.zeros(0, dtype=np.uint8))


def read_openings(msg: Message, state: CircuitState, first_level: int) -> list[np.ndarray]:
    """The openings in ``msg``, checked against the sizes the circuit expects from ``first_level`` on."""
    sizes = msg.get("openings", list)
    if not all(type(v) is int for v in sizes):
        raise ProtocolError("opening sizes must be integers")
    if len(sizes) > len(state.widths) - first_level:
        raise ProtocolError(f"{len(sizes)} levels of openings, but only {len(state.widths) - first_level} remain")
    expected = [state.opening_size(first_level + i) for i in range(len(sizes))]
    if sizes != expected:
        raise ProtocolError(f"opening sizes {sizes}, expected {expected}")
    bits = read_bits(msg, "openings", sum(sizes))
    return list(np.split(bits, np.cumsum(sizes)[:-1])) if sizes else []


# -- the OT link ------------------------------------------------------------------------------------

@dataclass
class OTLink:
    """S1's end of the OT link to S2, shared by every query S1 runs (the base OTs are made once: one
    round trip, ~0.3 s of exponentiations at each cloud). Made again when S2 no longer knows it."""

    _receiver: ot.OTReceiver | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def receiver(self, ctx: "S1Context") -> ot.OTReceiver:
        with self._lock:
            if self._receiver is None:
                self._receiver = establish(ctx)
            return self._receiver

    def forget(self, receiver: ot.OTReceiver) -> None:
        with self._lock:
            if self._receiver is receiver:
                self._receiver = None


def establish(ctx: "S1Context") -> ot.OTReceiver:
    """The base OTs with S2: S1 sends A, S2 answers its B_i; both derive their keys."""
    sender = ot.BaseSender()
    msg = Message(meta={"A": format(int(sender.A), "x")})
    with ctx.tracer.op("s1_ot"):
        reply = ctx.channel.request(BASE_STEP, msg)
        bs = reply.get("B", list)
        if not all(isinstance(b, str) and 0 < len(b) <= 2 * ot.GROUP_BYTES for b in bs):
            raise ProtocolError("malformed base-OT reply")
        try:
            keys = sender.keys([int(b, 16) for b in bs])
        except ValueError:
            raise ProtocolError("malformed base-OT reply") from None
    return ot.OTReceiver(reply.get("session", str), keys)


#: OT links S2 keeps at once (one per S1 process; the oldest is dropped beyond this)
MAX_LINKS = 64


def s2_base(cloud: "KeyCloud", msg: Message) -> Message:
    a = msg.get("A", str)
    if not 0 < len(a) <= 2 * ot.GROUP_BYTES:
        raise ProtocolError("malformed base-OT message")
    try:
        a_value = int(a, 16)
    except ValueError:
        raise ProtocolError("malformed base-OT message") from None
    s = ot.random_bits(ot.KAPPA_OT)
    bs, keys = ot.base_receive(a_value, s)
    session = secrets.token_hex(16)
    with cloud._lock:
        links = cloud.ot_links
        while len(links) >= MAX_LINKS:
            links.pop(next(iter(links)))
        links[session] = ot.OTSender(s, keys)
    return Message(meta={"session": session, "B": [format(int(b), "x") for b in bs]})


def s2_link(cloud: "KeyCloud", session: str) -> ot.OTSender:
    """S2's end of the link ``session``, moved to the back of the eviction order (least recently used
    links go first when S2 holds :data:`MAX_LINKS`)."""
    with cloud._lock:
        link = cloud.ot_links.pop(session, None)
        if link is not None:
            cloud.ot_links[session] = link
    if link is None:
        raise UnknownOTSession("S2 does not know this OT link (restarted?): S1 makes a new one")
    return link


# -- the comparison's rounds ------------------------------------------------------------------------

@dataclass
class S1Product:
    """S1's part of the product OTs of one comparison: its mask bits and its chosen pads."""

    m_bits: np.ndarray  # (n, w)
    pads: np.ndarray  # (n, w, 16)


def s1_start(ctx: "S1Context", msg: Message, b_values: Sequence[int], k: int,
             m_bits: np.ndarray | None = None) -> tuple[Message, CircuitState, S1Product | None]:
    """Add the OT fields to the comparison's first request (the reveal ``msg``) and send it; returns
    S2's reply, S1's circuit state with its leaf shares, and, when ``m_bits`` (the bits of S1's masks,
    :func:`lsb_bits`) are given, its part of the product OTs (:func:`product_answer`)."""
    n = len(b_values)
    b = bit_matrix(b_values, k)
    circuit = rot_count(n, k)
    total = circuit + (m_bits.size if m_bits is not None else 0)
    link = ctx.ot_link
    for attempt in (0, 1):
        receiver = link.receiver(ctx) if total else None  # a 0-bit comparison needs no OT (nor a link)
        with ctx.tracer.op("s1_ot"):
            batch = receiver.extend(total) if receiver else None
            leaves = n * k
            e = (b.reshape(-1) ^ batch.choices[:leaves]) if batch else np.zeros(0, dtype=np.uint8)
            msg.meta.update({"ot_session": receiver.session if receiver else "", "ot_batch": batch.batch if batch else -1,
                             "ot_count": total})
            if batch:
                msg.set_blob("ot_u", batch.u, 16, (len(batch.u) // 16,))
            set_bits(msg, "ot_e", e)
            if m_bits is not None:  # the product OTs' choices: S1's mask bits, derandomised
                set_bits(msg, "ot_m", m_bits.reshape(-1) ^ batch.choices[circuit:])
        try:
            reply = ctx.channel.request(START_STEP, msg)
            break
        except UnknownOTSession:  # S2 restarted, dropped the link, or the link served all its batches
            if receiver is None or attempt:
                raise
            link.forget(receiver)
    ctx.count("ot", total)
    with ctx.tracer.op("s1_ot"):
        if batch:
            y = read_bits(reply, "ot_y", 2 * leaves).reshape(2, n, k)
            lt = np.where(b == 1, y[1], y[0]) ^ batch.chosen[:leaves].reshape(n, k)
            triples = receiver_triples(batch.choices[leaves:circuit], batch.chosen[leaves:circuit])
        else:
            lt = np.zeros((n, k), dtype=np.uint8)
            triples = (np.zeros(0, dtype=np.uint8),) * 3
        state = CircuitState(0, lt, b, triples, level_widths(k))
        product = S1Product(m_bits, batch.pads[circuit:].reshape(m_bits.shape + (16,))) if m_bits is not None else None
    return reply, state, product


def s1_finish(ctx: "S1Context", reply: Message, state: CircuitState) -> tuple[Message, np.ndarray]:
    """Run the circuit's levels to the end from S2's first reply; returns S2's final reply and S1's
    share of the carry."""
    while True:
        with ctx.tracer.op("s1_ot"):
            received = read_openings(reply, state, state.completed)
            ops = s1_round(state, received)
        if not ops:  # S1 is done (s1_round opens a level whenever it is not) and S2 has all it needs
            if not reply.meta.get("final"):
                raise ProtocolError("S2 did not end the comparison when the circuit was done")
            return reply, state.result()
        if reply.meta.get("final"):
            raise ProtocolError("S2 ended the comparison before S1's last openings")
        msg = Message(meta={"ticket": reply.get("ticket", str)})
        set_openings(msg, ops)
        reply = ctx.channel.request(LEVEL_STEP, msg)


@dataclass
class S2Comparison:
    """What S2 keeps under a ticket between the rounds of one comparison; ``pads`` (x_0, x_1 of the
    product OTs, (n, w, 16) each) and ``corrections`` (S1's M_j xor c, (n, w)) for a product by OT."""

    d: list[int]
    l: int
    k: int
    product: bool
    state: CircuitState
    pads: tuple[np.ndarray, np.ndarray] | None = None
    corrections: np.ndarray | None = None


def s2_start(cloud: "KeyCloud", msg: Message, link: ot.OTSender | None, d: list[int], l: int, k: int,
             product: bool, width: int | None = None) -> tuple[Message, S2Comparison]:
    """S2's answer to the first request, on the OT link ``link`` (looked up before the reveal was
    decrypted; None when the comparison needs no OT): leaf messages and its first openings (or, for
    k <= 1, nothing more: the caller adds the final fields). ``width``: the product OTs' bits per
    element (:func:`product_width`), None without them."""
    n = len(d)
    total = msg.get("ot_count", int)
    circuit = rot_count(n, k)
    expected = circuit + (n * width if width else 0)
    if total != expected:
        raise ProtocolError(f"{total} OTs for {n} comparisons of {k} bits: expected {expected}")
    leaves = n * k
    a = bit_matrix(d, k)
    e = read_bits(msg, "ot_e", leaves).reshape(n, k)
    cloud.observe("ot_e", e.reshape(-1).tolist(), 1, 0)
    reply = Message()
    with cloud.tracer.op("s2_ot"):
        if total:
            if link is None:
                raise ProtocolError("an OT comparison without its OT link")
            u = msg.payload("ot_u")
            cloud.observe("ot_u", np.unpackbits(np.frombuffer(u[:512], dtype=np.uint8)).tolist(), 1, 0)
            pads0, pads1 = link.extend_pads(msg.get("ot_batch", int), total, u)
            x0, x1 = ot.low_bits(pads0[:circuit]), ot.low_bits(pads1[:circuit])
            lx0, lx1 = x0[:leaves].reshape(n, k), x1[:leaves].reshape(n, k)
            sigma = ot.random_bits(leaves).reshape(n, k)
            not_a = 1 ^ a
            y0 = np.where(e == 1, lx1, lx0) ^ sigma
            y1 = np.where(e == 1, lx0, lx1) ^ sigma ^ not_a
            set_bits(reply, "ot_y", np.concatenate([y0.reshape(-1), y1.reshape(-1)]))
            triples = sender_triples(x0[leaves:], x1[leaves:])
        else:
            sigma = np.zeros((n, k), dtype=np.uint8)
            triples = (np.zeros(0, dtype=np.uint8),) * 3
        state = CircuitState(1, sigma, 1 ^ a, triples, level_widths(k))
        set_openings(reply, [] if state.done else [state.open()])
        cmp = S2Comparison(d, l, k, product, state)
        if width:
            cmp.corrections = read_bits(msg, "ot_m", n * width).reshape(n, width)
            cloud.observe("ot_m", cmp.corrections.reshape(-1).tolist(), 1, 0)
            shape = (n, width, 16)
            cmp.pads = (pads0[circuit:].reshape(shape), pads1[circuit:].reshape(shape))
    return reply, cmp


def s2_level(cloud: "KeyCloud", msg: Message, cmp: S2Comparison) -> Message:
    """S2's answer to a level request: its next openings."""
    reply = Message()
    with cloud.tracer.op("s2_ot"):
        received = read_openings(msg, cmp.state, cmp.state.completed)
        if not received:
            raise ProtocolError("a comparison level request without openings")
        cloud.observe("ot_open", np.concatenate(received).tolist(), 1, 0)
        set_openings(reply, s2_round(cmp.state, received))
    return reply
