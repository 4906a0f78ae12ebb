"""Oblivious transfer: Chou-Orlandi base OTs and IKNP random-OT extension, for the comparison.

Roles are fixed by who drives the protocol: S1 is the OT **receiver** (it picks a random choice bit c
per OT and learns one of two random bits, x_c), S2 the OT **sender** (it learns both bits x_0, x_1,
and nothing about c). Everything here is *random* OT: no party chooses the transferred messages;
:mod:`he_cnn.protocols.millionaire` turns the random bits into the correlations it needs.

Base OTs (once per S1-S2 link, :class:`BaseSender` / :class:`BaseReceiver`): 128 random OTs in the
reverse direction (S1 sends, S2 chooses the 128 bits of its secret ``s``), Chou-Orlandi's "simplest OT"
in the 3072-bit MODP group of RFC 3526 (group 15, about 128-bit security), one round trip:
  S1: a random, A = g^a                                      -> A
  S2: for each i, b_i random, B_i = g^(b_i) A^(s_i)           -> B_i;   k_i = H(i, A, B_i, A^(b_i))
  S1: k_i^0 = H(i, A, B_i, B_i^a), k_i^1 = H(i, A, B_i, (B_i / A)^a)
Exponents are 256 bits (short exponents, as the Paillier randomizers'): g^b then is indistinguishable
from a uniform group element under the short-exponent discrete-log assumption (a kangaroo search for
a 256-bit logarithm costs ~2^128), so B_i hides s_i from S1 computationally at ~128 bits (a full-size
b would make it perfect, at 12x the exponentiation cost); k_i^(1-s_i) is computational
Diffie-Hellman to S2 (random-oracle model). ``cryptography``'s X25519 gives a Diffie-Hellman but no
group addition (B = g^b A^s needs one), so this one part is gmpy2 arithmetic; the symmetric parts
(PRG and hash) are AES from ``cryptography``.

Extension (IKNP03, semi-honest), per batch of m OTs, one message S1 -> S2:
  S1: c random (m bits); t_i = G(k_i^0), u_i = t_i xor G(k_i^1) xor c   (128 columns of m bits)  -> u
  S2: q_i = G(k_i^(s_i)) xor s_i u_i = t_i xor s_i c;  row j of Q is q_j = t_j xor c_j s
  outputs  S2: x_0 = H(j, q_j), x_1 = H(j, q_j xor s);   S1: c_j, x_(c_j) = H(j, t_j)
G is AES-128-CTR keyed by the base-OT key, its counter starting at the batch number (a batch is used
once: S2 refuses a repeated batch number, which would show S2 c xor c'). H is the tweakable
correlation-robust hash of Guo-Katz-Wang-Yu (2020), H(j, x) = pi(pi(x) xor j) xor pi(x) with pi
fixed-key AES, the tweak j = (batch, index); one output bit per OT is used.
u is uniform to S2: each column is masked by G(k_i^(1-s_i)), which S2 cannot compute.
Cost: per OT, 16 bytes S1 -> S2, a few AES blocks and a bit-matrix transposition at each side.
"""
from __future__ import annotations

import hashlib
import os
import secrets
import threading
from dataclasses import dataclass, field

import gmpy2
import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from gmpy2 import mpz

from he_cnn.errors import ProtocolError, UnknownOTSession

#: computational security parameter: base OTs, seeds and hash blocks are 128 bits
KAPPA_OT = 128
#: RFC 3526 group 15: the 3072-bit safe prime 2^3072 - 2^3008 - 1 + 2^64 (floor(2^2942 pi) + 1690314)
GROUP_P = mpz(int(
    "FFFFFFFFFFFFFFFFC90FDAA22168C234C4C6628B80DC1CD129024E088A67CC74020BBEA63B139B22514A08798E3404DD"
    "EF9519B3CD3A431B302B0A6DF25F14374FE1356D6D51C245E485B576625E7EC6F44C42E9A637ED6B0BFF5CB6F406B7ED"
    "EE386BFB5A899FA5AE9F24117C4B1FE649286651ECE45B3DC2007CB8A163BF0598DA48361C55D39A69163FA8FD24CF5F"
    "83655D23DCA3AD961C62F356208552BB9ED529077096966D670C354E4ABC9804F1746C08CA18217C32905E462E36CE3B"
    "E39E772C180E86039B2783A2EC07A28FB5C55DF06F4C52C9DE2BCBF6955817183995497CEA956AE515D2261898FA0510"
    "15728E5A8AAAC42DAD33170D04507A33A85521ABDF1CBA64ECFB850458DBEF0A8AEA71575D060C7DB3970F85A6E1E4C7"
    "ABF5AE8CDB0933D71E8C94E04A25619DCEE3D2261AD2EE6BF12FFA06D98A0864D87602733EC86A64521F2B18177B200C"
    "BBE117577A615D6C770988C0BAD946E208E24FA074E5AB3143DB5BFCE0FD108E4B82D120A93AD2CAFFFFFFFFFFFFFFFF", 16))
#: 2 is a quadratic residue mod GROUP_P (p = 7 mod 8): it generates the subgroup of prime order (p-1)/2
GROUP_G = mpz(2)
GROUP_BYTES = 384
#: exponents of 256 bits: 128-bit security against the generic attacks on the discrete logarithm
EXPONENT_BITS = 256
#: the fixed AES key of the hash's permutation pi (public: GKWY20's fixed-key model)
_PI_KEY = hashlib.sha256(b"he-cnn OT tccr hash v1").digest()[:16]
#: most OTs in one extension batch (16 bytes each on the wire: 256 MiB at the limit, beyond any body a
#: cloud accepts; a batch is transposed and hashed in slices, so memory beyond the message is bounded)
MAX_BATCH = 1 << 24
#: batches one link serves; then S2 answers as for an unknown link and S1 makes a new one (bounds the
#: record of used batch numbers S2 keeps per link: ~2,000 ICNN queries, 0.35 s of base OTs to renew)
MAX_LINK_BATCHES = 1 << 16


def _hash_key(i: int, *elements: mpz) -> bytes:
    h = hashlib.sha256(b"he-cnn base OT v1" + i.to_bytes(4, "big"))
    for e in elements:
        h.update(int(e).to_bytes(GROUP_BYTES, "big"))
    return h.digest()[:16]


def group_element(v: int, what: str) -> mpz:
    """``v`` if it lies in the prime-order subgroup (1 < v < p - 1, a quadratic residue), else ProtocolError."""
    v = mpz(v)
    if not 1 < v < GROUP_P - 1 or gmpy2.legendre(v, GROUP_P) != 1:
        raise ProtocolError(f"{what} is not an element of the OT group")
    return v


def _exponent() -> mpz:
    return mpz(secrets.randbits(EXPONENT_BITS) | 1 << (EXPONENT_BITS - 1))


# -- base OTs -------------------------------------------------------------------------------------

class BaseSender:
    """S1's side of the base OTs: ``first()`` -> A; ``keys(B)`` -> the 128 pairs (k^0, k^1)."""

    def __init__(self) -> None:
        self._a = _exponent()
        self.A = gmpy2.powmod(GROUP_G, self._a, GROUP_P)

    def keys(self, bs: list[int]) -> list[tuple[bytes, bytes]]:
        if len(bs) != KAPPA_OT:
            raise ProtocolError(f"expected {KAPPA_OT} base-OT replies, got {len(bs)}")
        a_inv = gmpy2.invert(self.A, GROUP_P)
        out = []
        for i, b in enumerate(bs):
            b = group_element(b, "a base-OT reply")
            if b == self.A:  # B / A = 1: k^1 would be public (an honest S2 never sends it)
                raise ProtocolError("a base-OT reply equal to the sender's element")
            k0 = _hash_key(i, self.A, b, gmpy2.powmod(b, self._a, GROUP_P))
            k1 = _hash_key(i, self.A, b, gmpy2.powmod(b * a_inv % GROUP_P, self._a, GROUP_P))
            out.append((k0, k1))
        return out


def base_receive(a: int, choices: np.ndarray) -> tuple[list[mpz], list[bytes]]:
    """S2's side of the base OTs for its secret bits ``choices``: (B_i to send, k_i^(s_i) to keep)."""
    a = group_element(a, "the base-OT sender's A")
    bs, keys = [], []
    for i, s in enumerate(choices):
        b = _exponent()
        gb = gmpy2.powmod(GROUP_G, b, GROUP_P)
        gba = gb * a % GROUP_P  # computed whatever s_i is
        bs.append(gba if s else gb)
        keys.append(_hash_key(i, a, bs[-1], gmpy2.powmod(a, b, GROUP_P)))
    return bs, keys


# -- extension --------------------------------------------------------------------------------------

def random_bits(count: int) -> np.ndarray:
    """``count`` uniform bits (uint8 0/1) from the operating system's generator."""
    return np.unpackbits(np.frombuffer(os.urandom((count + 7) // 8), dtype=np.uint8))[:count]


def padded(m: int) -> int:
    """OTs are computed in multiples of 128 (whole AES blocks per column)."""
    return -(-m // KAPPA_OT) * KAPPA_OT


def _prg(key: bytes, batch: int, nbytes: int) -> np.ndarray:
    enc = Cipher(algorithms.AES(key), modes.CTR((batch << 64).to_bytes(16, "big"))).encryptor()
    return np.frombuffer(enc.update(bytes(nbytes)), dtype=np.uint8)


def _columns(keys: list[bytes], batch: int, m: int) -> np.ndarray:
    """(128, m/8) bytes: column i is G(keys[i]) for this batch."""
    return np.stack([_prg(k, batch, m // 8) for k in keys])


def _transpose(columns: np.ndarray) -> np.ndarray:
    """(128, m/8) bit columns -> (m, 16) byte rows: bit i of row j is bit j of column i."""
    bits = np.unpackbits(columns, axis=1)  # (128, m)
    return np.ascontiguousarray(np.packbits(bits, axis=0).T)  # byte b of row j packs bits 8b..8b+7 of column j


#: OTs transposed and hashed at a time: the transposition's bit array takes 128 bytes per OT
SLICE = 1 << 16


def _hashed(columns: np.ndarray, batch: int, xor_row: np.ndarray | None = None) -> list[np.ndarray]:
    """tccr_blocks of every row of the (128, m/8) columns, and with ``xor_row`` also of every row xored
    with it; slice by slice, so that the transposition's memory stays bounded whatever m is."""
    m = columns.shape[1] * 8
    outs = [np.empty((m, 16), dtype=np.uint8) for _ in range(1 if xor_row is None else 2)]
    for start in range(0, m, SLICE):
        rows = _transpose(columns[:, start // 8:(start + SLICE) // 8])
        outs[0][start:start + rows.shape[0]] = tccr_blocks(rows, batch, start)
        if xor_row is not None:
            outs[1][start:start + rows.shape[0]] = tccr_blocks(rows ^ xor_row[None, :], batch, start)
    return outs


def tccr_blocks(rows: np.ndarray, batch: int, start: int = 0) -> np.ndarray:
    """H(j, row_j) = pi(pi(x) xor j) xor pi(x), 16 bytes, for each 16-byte row, row j of the batch
    being ``rows[j - start]`` (the tweak j = (batch, index in the batch) is unique per link). A random
    OT's bit is the low bit of its block; a whole block is a 128-bit pad (:func:`low_bits`)."""
    m = rows.shape[0]
    pi = Cipher(algorithms.AES(_PI_KEY), modes.ECB()).encryptor()
    first = np.frombuffer(pi.update(np.ascontiguousarray(rows).tobytes()), dtype=np.uint8).reshape(m, 16)
    tweak = np.zeros((m, 2), dtype=">u8")
    tweak[:, 0] = batch
    tweak[:, 1] = np.arange(start, start + m, dtype=np.uint64)
    second = np.frombuffer(pi.update((first ^ tweak.view(np.uint8).reshape(m, 16)).tobytes()),
                           dtype=np.uint8).reshape(m, 16)
    return second ^ first


def low_bits(blocks: np.ndarray) -> np.ndarray:
    """The OT bit of each hash block (its last byte's low bit)."""
    return blocks[:, 15] & 1


@dataclass
class ReceiverBatch:
    """S1's outputs of one batch: the message ``u`` for S2, the choice bits c, and for each OT the
    chosen block x_c (``pads``, 16 bytes) and its bit (``chosen``)."""

    batch: int
    count: int
    u: bytes
    choices: np.ndarray
    pads: np.ndarray

    @property
    def chosen(self) -> np.ndarray:
        return low_bits(self.pads)


@dataclass
class OTReceiver:
    """S1's end of an established OT link: the base-OT key pairs and the next batch number."""

    session: str
    keys: list[tuple[bytes, bytes]]
    _next: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def extend(self, count: int) -> ReceiverBatch:
        if not 0 < count <= MAX_BATCH:
            raise ProtocolError(f"an OT batch holds 1 to {MAX_BATCH} OTs, not {count}")
        with self._lock:
            batch, self._next = self._next, self._next + 1
        m = padded(count)
        c = random_bits(m)
        t = _columns([k0 for k0, _ in self.keys], batch, m)
        u = t ^ _columns([k1 for _, k1 in self.keys], batch, m) ^ np.packbits(c)
        (pads,) = _hashed(t, batch)
        return ReceiverBatch(batch, count, u.tobytes(), c[:count], pads[:count])


@dataclass
class OTSender:
    """S2's end of an OT link: its secret bits s, the keys k_i^(s_i), and the batches already used."""

    s: np.ndarray
    keys: list[bytes]
    used: set[int] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def extend(self, batch: int, count: int, u: bytes) -> tuple[np.ndarray, np.ndarray]:
        """(x_0, x_1), ``count`` bits each, for S1's message ``u`` of batch ``batch``."""
        x0, x1 = self.extend_pads(batch, count, u)
        return low_bits(x0), low_bits(x1)

    def extend_pads(self, batch: int, count: int, u: bytes) -> tuple[np.ndarray, np.ndarray]:
        """(x_0, x_1) as whole hash blocks, (count, 16) bytes each (the bits are their low bits)."""
        if not 0 < count <= MAX_BATCH or not 0 <= batch < 1 << 62:
            raise ProtocolError(f"OT batch {batch} of {count} OTs is out of range (at most {MAX_BATCH})")
        m = padded(count)
        if len(u) != KAPPA_OT * m // 8:
            raise ProtocolError(f"OT extension message of {len(u)} bytes: expected {KAPPA_OT * m // 8} for {count} OTs")
        with self._lock:
            if batch in self.used:
                raise ProtocolError(f"OT batch {batch} was already used on this link")
            if len(self.used) >= MAX_LINK_BATCHES:
                raise UnknownOTSession(f"this OT link has served its {MAX_LINK_BATCHES} batches: make a new one")
            self.used.add(batch)
        cols = np.frombuffer(u, dtype=np.uint8).reshape(KAPPA_OT, m // 8)
        q = _columns(self.keys, batch, m) ^ (cols * self.s[:, None].astype(np.uint8))
        x0, x1 = _hashed(q, batch, np.packbits(self.s))
        return x0[:count], x1[:count]
