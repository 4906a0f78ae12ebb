"""The DGK cryptosystem (Damgård, Geisler, Krøigaard 2007), used only for secure comparison.

A ciphertext of m in Z_u is ``g^m h^r mod n``, where g has order ``u * v_p * v_q`` and h order
``v_p * v_q``; u is a small prime (the plaintext space), v_p, v_q are t-bit primes. The holder of the
secret key (S2) cannot decrypt in general, but it can test a ciphertext for zero cheaply:
``c^(v_p) mod p == 1`` exactly when m = 0 mod u. That is all the comparison protocol needs.

Sizes: n has as many bits as the Paillier key, its factor p a third of them
(:func:`zero_test_prime_bits`); t is twice the security level of that key size (160 for 1024-bit,
224 for 2048-bit, 256 for 3072-bit); randomness r has 2.5 t bits and is drawn through a fixed-base
table of h.
"""
from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass, field
from typing import Iterable

import gmpy2
from gmpy2 import mpz

from he_cnn.errors import HECNNError, InvalidCiphertext
from he_cnn.crypto.paillier import FixedBaseTable, PoolRecipe, RandomnessPool

#: plaintext modulus, a prime: must exceed every c_j of the comparison (at most 2 l + 1; max_bits keeps the
#: older, stricter 3 (l + 2) + 3: 211 allows 67 bits), and small, because S1 blinds every compared bit by an
#: exponent below it
DGK_U = 211


def subgroup_bits(n_bits: int) -> int:
    """t: twice the security level that an n-bit factoring modulus gives."""
    if n_bits >= 3072:
        return 256
    if n_bits >= 2048:
        return 224
    return 160


@dataclass(eq=False)
class DGKPublicKey:
    n: mpz
    g: mpz
    h: mpz
    u: int
    t: int
    #: pool entries also hold g h^r, ready for an encryption of 1 (S2, which encrypts bits, sets this)
    pool_pairs: bool = field(default=False, kw_only=True, repr=False)
    _table: FixedBaseTable | None = field(default=None, init=False, repr=False)
    _g_powers: dict[int, mpz] = field(default_factory=dict, init=False, repr=False)
    pool: RandomnessPool = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.n, self.g, self.h = mpz(self.n), mpz(self.g), mpz(self.h)
        self.pool = RandomnessPool(self._pool_entry, self.pool_recipe)
        if not (self.n > 3 and 1 < self.g < self.n and 1 < self.h < self.n and self.u > 2 and self.t > 0):
            raise HECNNError("malformed DGK public key")

    @property
    def ciphertext_bytes(self) -> int:
        return (int(self.n.bit_length()) + 7) // 8

    @property
    def key_id(self) -> str:
        return hashlib.sha256(int(self.n).to_bytes(self.ciphertext_bytes, "big")).hexdigest()[:16]

    @property
    def max_bits(self) -> int:
        """Longest bit length the comparison may run on with this u."""
        return (self.u - 3) // 3 - 2

    def __repr__(self) -> str:
        return f"DGKPublicKey(bits={self.n.bit_length()}, u={self.u}, t={self.t}, id={self.key_id})"

    def randomizer(self) -> mpz:
        """h^r for a fresh r: from the precomputed pool, or computed now if the pool is empty."""
        return mpz.from_bytes(self.pool.take()[:self.ciphertext_bytes], "big")

    def _pool_entry(self) -> bytes:
        """What the pool holds: h^r as ``ciphertext_bytes`` big-endian bytes, with ``pool_pairs`` followed
        by g h^r. Online, a bit's ciphertext or a blinding randomizer is then a slice of bytes: no
        multiplication, no conversion (4,096 of them took 8 ms in one ReLU layer as integers)."""
        entry = self.fresh_randomizer().to_bytes(self.ciphertext_bytes, "big")
        return self._pair(entry) if self.pool_pairs else entry

    def _pair(self, entry: bytes) -> bytes:
        """h^r as bytes -> h^r and g h^r as bytes."""
        gr = self.g * mpz.from_bytes(entry, "big") % self.n
        return entry + gr.to_bytes(self.ciphertext_bytes, "big")

    def fresh_randomizer(self) -> mpz:
        """h^r for a new r of 2.5 t bits (fixed-base table built on first use)."""
        if self._table is None:
            self._table = FixedBaseTable(self.h, self.n, (5 * self.t) // 2)
        return self._table.power(secrets.randbits((5 * self.t) // 2))

    def pool_recipe(self) -> PoolRecipe:
        """What a worker process needs to compute :meth:`_pool_entry` values (all of it public key):
        h^r as bytes, and with ``pool_pairs`` g h^r after it (:func:`~he_cnn.crypto.paillier.pool_values`)."""
        return PoolRecipe(int(self.h), int(self.n), (5 * self.t) // 2, 8, self.ciphertext_bytes,
                          multiplier=int(self.g) if self.pool_pairs else 0, as_bytes=True)

    def g_power(self, m: int) -> mpz:
        """g^m for a small signed m (cached)."""
        m %= self.u
        if m not in self._g_powers:
            self._g_powers[m] = gmpy2.powmod(self.g, m, self.n)
        return self._g_powers[m]

    def encrypt(self, m: int) -> mpz:
        return self.g_power(m) * self.randomizer() % self.n

    def encrypt_bits_blob(self, bits: Iterable[int]) -> bytes:
        """:meth:`encrypt` for many 0/1 values ([0] = h^r, [1] = g h^r, one half of a pool entry: the same
        work for either bit, so S2's time does not tell S1 how many 1s it encrypted), as one buffer of
        ``ciphertext_bytes``-wide big-endian integers (the wire's and the worker processes' form, without
        a list in between)."""
        width, take = self.ciphertext_bytes, self.pool.take

        def pair() -> bytes:  # an entry from before pool_pairs was set gets its g h^r now, whatever the bit
            entry = take()
            return entry if len(entry) > width else self._pair(entry)

        return b"".join(pair()[b * width:(b + 1) * width] for b in bits)

    def randomizer_blob(self, count: int) -> bytes:
        """``count`` randomizers (:meth:`randomizer`) as one buffer, as :meth:`encrypt_bits_blob`."""
        width, take = self.ciphertext_bytes, self.pool.take
        return b"".join(take()[:width] for _ in range(count))

    def validate(self, c: int) -> mpz:
        """Range check 0 < c < n. (A non-unit c cannot crash the zero test; it only tests non-zero.)"""
        c = mpz(c)
        if not 0 < c < self.n:
            raise InvalidCiphertext("DGK ciphertext out of range: expected 0 < c < n")
        return c

    def to_dict(self) -> dict:
        return {"n": int(self.n), "g": int(self.g), "h": int(self.h), "u": self.u, "t": self.t}

    @classmethod
    def from_dict(cls, d: dict) -> "DGKPublicKey":
        try:
            return cls(mpz(int(d["n"])), mpz(int(d["g"])), mpz(int(d["h"])), int(d["u"]), int(d["t"]))
        except (KeyError, TypeError, ValueError) as e:
            raise HECNNError(f"malformed DGK public key: {e}") from e


@dataclass(eq=False)
class DGKPrivateKey:
    public: DGKPublicKey
    p: mpz
    v_p: mpz

    def __repr__(self) -> str:
        return f"DGKPrivateKey(for={self.public.key_id})"

    def is_zero(self, c: int) -> bool:
        """True when the ciphertext encrypts 0 mod u."""
        return gmpy2.powmod(c, self.v_p, self.p) == 1

    def to_dict(self) -> dict:
        return {"p": int(self.p), "v_p": int(self.v_p)}


def _prime_of_form(factor: mpz, bits: int) -> mpz:
    """A prime p = factor * f + 1 of exactly ``bits`` bits (top two bits set), f even random."""
    f_bits = bits - factor.bit_length() + 1
    if f_bits < 32:
        raise HECNNError(f"a {bits}-bit prime has no room for a random multiple of a {factor.bit_length()}-bit factor")
    while True:
        f = mpz(secrets.randbits(f_bits))
        f -= f % 2
        p = factor * f + 1
        if p.bit_length() == bits and p >> (bits - 2) == 3 and gmpy2.is_prime(p, 30):
            return p


def _element_of_order(p: mpz, order_factors: list[mpz]) -> mpz:
    """An element of Z_p* whose order is exactly the product of the given distinct primes."""
    order = mpz(1)
    for f in order_factors:
        order *= f
    cofactor = (p - 1) // order
    while True:
        x = mpz(secrets.randbelow(int(p - 3))) + 2
        y = gmpy2.powmod(x, cofactor, p)
        if all(gmpy2.powmod(y, order // f, p) != 1 for f in order_factors):
            return y


def zero_test_prime_bits(n_bits: int) -> int:
    """Size of p, the prime S2's zero test works modulo: a third of n (q takes the rest).

    The zero test costs an exponentiation mod p, so a smaller p makes it about twice as fast (41 us
    instead of 87 us at 2048 bits). n keeps its full size against the number field sieve, and its
    smallest factor stays at n/3 bits: the same as a 3-prime RSA modulus, for which the elliptic
    curve method is no faster than the sieve at these sizes (docs/threat-model.md §4).
    """
    # p = u v_p f + 1 needs room for a random f: small (test) keys keep p >= u v_p + 64 bits
    return max(n_bits // 3, subgroup_bits(n_bits) + DGK_U.bit_length() + 64)


def generate_dgk_keypair(n_bits: int, u: int = DGK_U) -> tuple[DGKPublicKey, DGKPrivateKey]:
    t = subgroup_bits(n_bits)
    u_ = mpz(u)
    v_p = gmpy2.next_prime(mpz(secrets.randbits(t)) | (mpz(1) << (t - 1)))
    v_q = gmpy2.next_prime(mpz(secrets.randbits(t)) | (mpz(1) << (t - 1)))
    p_bits = zero_test_prime_bits(n_bits)
    p = _prime_of_form(u_ * v_p, p_bits)
    q = _prime_of_form(u_ * v_q, n_bits - p_bits)
    n = p * q
    g_p, g_q = _element_of_order(p, [u_, v_p]), _element_of_order(q, [u_, v_q])
    h_p, h_q = _element_of_order(p, [v_p]), _element_of_order(q, [v_q])

    def crt(a: mpz, b: mpz) -> mpz:
        return (a + (b - a) * gmpy2.invert(p, q) % q * p) % n

    public = DGKPublicKey(n, crt(g_p, g_q), crt(h_p, h_q), u, t)
    return public, DGKPrivateKey(public, p, v_p)
