"""Paillier keys, signed integer encoding and fast randomness, on top of ``phe`` and ``gmpy2``.

Key generation is ``phe``'s (so keys interoperate with python-paillier); all arithmetic is gmpy2 on
raw integers, with g = N + 1 so that encrypting m is ``(1 + m N) * rho mod N^2`` where ``rho`` is an
N-th residue. Plaintexts are signed: v is stored as ``v mod N`` and decoded back into
``(-N/2, N/2)``; a value that does not fit raises :class:`EncodingOverflow` instead of wrapping.

Randomness: ``rho`` is ``h^e`` for a fixed random N-th residue ``h = r0^N`` and a fresh short
exponent ``e`` (``RANDOMIZER_EXPONENT_BITS`` bits), computed from a fixed-base window table in at most
32 modular multiplications instead of one full exponentiation. This is the standard short-exponent
randomizer (its security rests on the hardness of the short-exponent discrete log in the group of
N-th residues); ``docs/threat-model.md`` names the assumption. Randomizers can be computed ahead of
time into a :class:`RandomnessPool` (the offline phase), which makes online encryption and
re-randomisation one multiplication.
"""
from __future__ import annotations

import hashlib
import os
import secrets
import threading
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import gmpy2
import phe
from gmpy2 import mpz

from he_cnn.errors import EncodingOverflow, HECNNError, InvalidCiphertext, KeyMismatch

if TYPE_CHECKING:
    from he_cnn.parallel import Workers

DEFAULT_KEY_BITS = 2048
MIN_KEY_BITS = 1024
#: exponent size of the short-exponent randomizer: twice the 128-bit security target
RANDOMIZER_EXPONENT_BITS = 256
#: statistical security parameter: masks hide values up to statistical distance 2^-KAPPA
KAPPA = 40
_BASE_LOCK = threading.Lock()

def random_below(bound: int) -> mpz:
    """A uniform integer in [0, bound) from the operating system's CSPRNG."""
    return mpz(secrets.randbelow(int(bound)))


def random_ints(count: int, bits: int) -> list[int]:
    """``count`` independent uniform integers of ``bits`` bits from one read of the OS CSPRNG
    (one system call instead of one per value)."""
    width = (bits + 7) // 8
    buf = os.urandom(count * width)
    mask = (1 << bits) - 1
    return [int.from_bytes(buf[i:i + width], "big") & mask for i in range(0, count * width, width)]


def batch_invert(values: Sequence[mpz], modulus: mpz) -> list[mpz]:
    """The inverses of all ``values`` mod ``modulus`` with one inversion and 3 multiplications each
    (Montgomery's trick). Raises ZeroDivisionError if one of them is not invertible."""
    if not values:
        return []
    prefix = [mpz(values[0])]
    for v in values[1:]:
        prefix.append(prefix[-1] * v % modulus)
    inv = gmpy2.invert(prefix[-1], modulus)
    out = [mpz(0)] * len(values)
    for i in range(len(values) - 1, 0, -1):
        out[i] = inv * prefix[i - 1] % modulus
        inv = inv * values[i] % modulus
    out[0] = inv
    return out


class FixedBaseTable:
    """Precomputed powers ``base^(j * 2^(w*i))`` so that ``base^e`` costs ``bits/w`` multiplications."""

    def __init__(self, base: mpz, modulus: mpz, exponent_bits: int, window: int = 8):
        self.modulus = modulus
        self.window = window
        self.exponent_bits = exponent_bits
        self.mask = (1 << window) - 1
        self.rows: list[list[mpz]] = []
        b = mpz(base)
        for _ in range((exponent_bits + window - 1) // window):
            row = [mpz(1), b]
            for _ in range(2, 1 << window):
                row.append(row[-1] * b % modulus)
            self.rows.append(row)
            b = row[-1] * b % modulus  # base^(2^window) for the next row
        self.exponent_bound = 1 << (len(self.rows) * window)

    def power(self, e: int) -> mpz:
        if not 0 <= e < self.exponent_bound:
            raise ValueError("exponent out of the table's range")
        acc = mpz(1)
        w, mask, mod = self.window, self.mask, self.modulus
        for row in self.rows:
            digit = e & mask
            if digit:
                acc = acc * row[digit] % mod
            e >>= w
            if not e:
                break
        return acc


@dataclass(frozen=True)
class PoolRecipe:
    """How to compute a pool's values in another process: everything public, nothing secret.

    A value is ``base^e mod modulus`` for a fresh uniform e of ``exponent_bits`` bits, as ``width``
    big-endian bytes; with ``multiplier`` (non-zero) it is followed by ``multiplier * base^e mod
    modulus`` (S2's DGK pool entries: h^r beside g h^r). ``as_bytes`` says whether the pool holds the
    bytes themselves (DGK) or the integer (Paillier). The base h of a key is public information in the
    sense that matters here: it is an N-th residue (Paillier) or the DGK key's published h, it hides no
    key material, and it stays inside the party's own processes anyway.
    """

    base: int
    modulus: int
    exponent_bits: int
    window: int
    width: int
    multiplier: int = 0
    as_bytes: bool = False

    def table_bytes(self) -> int:
        """Memory of the fixed-base table a worker builds for this recipe."""
        return -(-self.exponent_bits // self.window) * (1 << self.window) * self.width

    def unpack(self, blob: bytes) -> list[Any]:
        """The pool values in a blob :func:`pool_values` returned."""
        step = self.width * (2 if self.multiplier else 1)
        if self.as_bytes:
            return [blob[i:i + step] for i in range(0, len(blob), step)]
        return [mpz.from_bytes(blob[i:i + self.width], "big") for i in range(0, len(blob), step)]


#: fixed-base tables of the recipes this process has computed values for, most recently used last:
#: a worker process builds a key's table on its first chunk and reuses it for every later one
_TABLES: "OrderedDict[tuple[int, int, int, int], tuple[FixedBaseTable, int]]" = OrderedDict()
#: memory the cached tables may take together in one process (a 2048-bit key's Paillier table is 4 MiB,
#: its DGK table 4.4 MiB, a user key's 0.5 MiB)
TABLE_CACHE_BYTES = 48 << 20
_TABLES_LOCK = threading.Lock()


def _cached_table(recipe: PoolRecipe) -> FixedBaseTable:
    """The recipe's fixed-base table, from this process's cache (least recently used tables go first)."""
    key = (recipe.base, recipe.modulus, recipe.exponent_bits, recipe.window)
    with _TABLES_LOCK:
        if key in _TABLES:
            _TABLES.move_to_end(key)
            return _TABLES[key][0]
    table = FixedBaseTable(mpz(recipe.base), mpz(recipe.modulus), recipe.exponent_bits, recipe.window)
    with _TABLES_LOCK:
        _TABLES[key] = (table, recipe.table_bytes())
        while len(_TABLES) > 1 and sum(size for _, size in _TABLES.values()) > TABLE_CACHE_BYTES:
            _TABLES.popitem(last=False)
    return table


def pool_values(recipe: PoolRecipe, count: int) -> bytes:
    """``count`` fresh pool values of ``recipe`` as one blob (:meth:`PoolRecipe.unpack` reads it).

    A top-level function for :meth:`he_cnn.parallel.Workers.submit`: the worker builds the recipe's
    fixed-base table on its first call and keeps it in a module-level cache (``_TABLES``), so every
    later chunk costs ``exponent_bits / window`` multiplications per value. The exponents come from the
    operating system's CSPRNG in one read (safe in forked workers: nothing is inherited).
    """
    table = _cached_table(recipe)
    width, modulus = recipe.width, mpz(recipe.modulus)
    multiplier = mpz(recipe.multiplier)
    out = []
    for e in random_ints(count, recipe.exponent_bits):
        value = table.power(e)
        out.append(value.to_bytes(width, "big"))
        if multiplier:
            out.append((multiplier * value % modulus).to_bytes(width, "big"))
    return b"".join(out)


class RandomnessPool:
    """Randomizers computed ahead of time (offline), handed out once each (online: free).

    ``take`` falls back to computing one on the spot when the pool is empty, so the pool only ever
    changes speed, never results. Each value is used once: deque.popleft is atomic across threads.
    A value is whatever ``make`` returns (an integer for Paillier, bytes for DGK: ``DGKPublicKey._pool_entry``).
    ``recipe`` (optional) returns a :class:`PoolRecipe` that computes the same values in another
    process (:func:`pool_values`), which :meth:`extend` then appends: how a service's pool filler uses
    every worker (:mod:`servers.pools`).
    """

    def __init__(self, make: Callable[[], Any], recipe: Callable[[], PoolRecipe] | None = None):
        self._make = make
        self._recipe = recipe
        self._ready: deque[Any] = deque()
        #: how many values were handed out (pooled or not): tells how large a pool a query needs
        self.taken = 0

    def take(self) -> Any:
        self.taken += 1
        try:
            return self._ready.popleft()
        except IndexError:
            return self._make()

    def fill(self, count: int) -> None:
        """Top the pool up to ``count`` values (computed here, in the calling thread)."""
        while len(self._ready) < count:
            self._ready.append(self._make())

    def recipe(self) -> PoolRecipe | None:
        """How a worker process computes this pool's values, or None if only ``make`` can."""
        return self._recipe() if self._recipe is not None else None

    def extend(self, values: Iterable[Any]) -> None:
        """Append values computed elsewhere (from :func:`pool_values` through :meth:`PoolRecipe.unpack`)."""
        self._ready.extend(values)

    def fill_on(self, workers: "Workers", recipe: PoolRecipe, tasks: int, per: int) -> int:
        """Append ``tasks`` chunks of ``per`` values computed in ``workers``' processes from ``recipe``
        (this pool's :meth:`recipe`); how many were added."""
        futures = [workers.submit(pool_values, recipe, per) for _ in range(tasks)]
        added = 0
        for future in futures:
            values = recipe.unpack(future.result())
            self.extend(values)
            added += len(values)
        return added

    def __len__(self) -> int:
        return len(self._ready)


@dataclass(eq=False)
class PublicKey:
    """A Paillier public key (g = N + 1) with gmpy2 fields and a short id for messages and logs."""

    n: mpz
    #: window of the randomizer table (8: 8,192 entries, 32 multiplications per randomizer)
    randomizer_window: int = field(default=8, repr=False, kw_only=True)
    nsq: mpz = field(init=False)
    _randomizer: FixedBaseTable | None = field(default=None, init=False, repr=False)
    #: h = r0^N mod N^2, the base of every randomizer (chosen on first use)
    _base: mpz | None = field(default=None, init=False, repr=False)
    pool: RandomnessPool = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.n = mpz(self.n)
        self.nsq = self.n * self.n
        self.pool = RandomnessPool(self.fresh_randomizer, self.pool_recipe)
        if self.n.bit_length() < 16 or self.n % 2 == 0:
            raise HECNNError(f"not a Paillier modulus: {self.n.bit_length()}-bit even or tiny number")

    # -- identity ---------------------------------------------------------------------------------
    @property
    def bits(self) -> int:
        return int(self.n.bit_length())

    @property
    def key_id(self) -> str:
        return hashlib.sha256(int(self.n).to_bytes((self.bits + 7) // 8, "big")).hexdigest()[:16]

    @property
    def ciphertext_bytes(self) -> int:
        return (int(self.nsq.bit_length()) + 7) // 8

    @property
    def max_abs(self) -> int:
        """Largest magnitude the signed encoding holds: |v| <= (N - 1) / 2."""
        return int((self.n - 1) // 2)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PublicKey) and self.n == other.n

    def __hash__(self) -> int:
        return hash(int(self.n))

    def __repr__(self) -> str:
        return f"PublicKey(bits={self.bits}, id={self.key_id})"

    def require_same(self, other: "PublicKey", what: str = "operand") -> None:
        if self != other:
            raise KeyMismatch(f"{what} is under key {other.key_id}, expected key {self.key_id}")

    def to_phe(self) -> phe.PaillierPublicKey:
        return phe.PaillierPublicKey(int(self.n))

    # -- encoding ---------------------------------------------------------------------------------
    def encode(self, v: int) -> mpz:
        """Signed integer -> plaintext in [0, N). Raises EncodingOverflow if |v| > (N-1)/2."""
        v = int(v)
        if abs(v) > self.max_abs:
            raise EncodingOverflow(
                f"value of {v.bit_length()} bits does not fit the signed range of a {self.bits}-bit key "
                f"(|v| <= (N-1)/2, {self.bits - 1} bits)"
            )
        return mpz(v) % self.n

    def decode(self, m: int) -> int:
        """Plaintext in [0, N) -> signed integer in [-(N-1)/2, (N-1)/2]."""
        m = int(m)
        return m - int(self.n) if m > self.max_abs else m

    # -- randomness and encryption ----------------------------------------------------------------
    def randomizer(self) -> mpz:
        """A fresh N-th residue: from the precomputed pool, or computed now if the pool is empty."""
        return self.pool.take()

    def randomizer_base(self) -> mpz:
        """h = r0^N mod N^2 for a random r0, chosen once per key object (all its randomizers are powers of h)."""
        if self._base is None:
            with _BASE_LOCK:  # two threads must not pick two bases (the pool filler's workers use this one)
                if self._base is None:
                    r0 = random_below(self.n - 2) + 2
                    self._base = gmpy2.powmod(r0, self.n, self.nsq)
        return self._base

    def fresh_randomizer(self) -> mpz:
        """A new N-th residue ``h^e`` (short exponent, fixed-base table built on first use)."""
        if self._randomizer is None:
            self._randomizer = FixedBaseTable(self.randomizer_base(), self.nsq, RANDOMIZER_EXPONENT_BITS,
                                              self.randomizer_window)
        return self._randomizer.power(secrets.randbits(RANDOMIZER_EXPONENT_BITS))

    def pool_recipe(self) -> PoolRecipe:
        """What a worker process needs to compute :meth:`fresh_randomizer` values (h is an N-th residue
        of a random r0: public, it reveals nothing of the key or of r0)."""
        return PoolRecipe(int(self.randomizer_base()), int(self.nsq), RANDOMIZER_EXPONENT_BITS,
                          self.randomizer_window, self.ciphertext_bytes)

    def plain_term(self, v: int) -> mpz:
        """The deterministic part ``1 + m N`` of an encryption of v (also how plaintexts are added)."""
        return (1 + self.encode(v) * self.n) % self.nsq

    def encrypt(self, v: int) -> mpz:
        return self.plain_term(v) * self.randomizer() % self.nsq

    def rerandomize(self, c: mpz) -> mpz:
        return c * self.randomizer() % self.nsq

    def validate(self, c: int) -> mpz:
        """Check that c is a well-formed ciphertext (0 < c < N^2, gcd(c, N) = 1)."""
        return self.validate_many([c])[0]

    def validate_many(self, cts: Iterable[int]) -> list[mpz]:
        """:meth:`validate` for many ciphertexts: the unit check is one gcd of their product mod N
        (a product of residues is a unit exactly when each of them is)."""
        out = [mpz(c) for c in cts]
        acc = mpz(1)
        for c in out:
            if not 0 < c < self.nsq:
                raise InvalidCiphertext(f"ciphertext out of range: expected 0 < c < N^2 for key {self.key_id}")
            acc = acc * (c % self.n) % self.n
        if gmpy2.gcd(acc, self.n) != 1:
            raise InvalidCiphertext(f"ciphertext is not a unit mod N for key {self.key_id}")
        return out


@dataclass(eq=False)
class PrivateKey:
    """The Paillier secret key with CRT decryption (used by S2 and by the user)."""

    public: PublicKey
    p: mpz
    q: mpz

    def __post_init__(self) -> None:
        p, q = mpz(min(self.p, self.q)), mpz(max(self.p, self.q))
        if p * q != self.public.n:
            raise KeyMismatch("private key primes do not match the public key")
        self.p, self.q = p, q
        self.psq, self.qsq = p * p, q * q
        n = self.public.n
        # h_p = L_p(g^(p-1) mod p^2)^-1 mod p, with g = n + 1
        self.hp = gmpy2.invert((gmpy2.powmod(n + 1, p - 1, self.psq) - 1) // p, p)
        self.hq = gmpy2.invert((gmpy2.powmod(n + 1, q - 1, self.qsq) - 1) // q, q)
        self.p_inv_q = gmpy2.invert(p, q)

    def __repr__(self) -> str:
        return f"PrivateKey(for={self.public.key_id})"

    def decrypt_raw(self, c: int) -> mpz:
        """Ciphertext -> plaintext in [0, N), by CRT."""
        c = mpz(c)
        mp = (gmpy2.powmod(c, self.p - 1, self.psq) - 1) // self.p * self.hp % self.p
        mq = (gmpy2.powmod(c, self.q - 1, self.qsq) - 1) // self.q * self.hq % self.q
        return mp + (mq - mp) * self.p_inv_q % self.q * self.p

    def decrypt(self, c: int) -> int:
        return self.public.decode(self.decrypt_raw(c))

    def to_phe(self) -> phe.PaillierPrivateKey:
        return phe.PaillierPrivateKey(self.public.to_phe(), int(self.p), int(self.q))


@dataclass(frozen=True, eq=False)
class KeyPair:
    public: PublicKey
    private: PrivateKey

    def __repr__(self) -> str:
        return f"KeyPair(bits={self.public.bits}, id={self.public.key_id})"


def generate_keypair(bits: int = DEFAULT_KEY_BITS, *, allow_small: bool = False) -> KeyPair:
    """A fresh Paillier key pair of ``bits`` bits (>= 1024, or any size >= 256 for unit tests)."""
    if bits < MIN_KEY_BITS and not (allow_small and bits >= 256):
        raise HECNNError(f"key size {bits} bits is too small: expected at least {MIN_KEY_BITS}")
    pub, priv = phe.generate_paillier_keypair(n_length=bits)
    public = PublicKey(mpz(pub.n))
    return KeyPair(public, PrivateKey(public, mpz(priv.p), mpz(priv.q)))


def keypair_from_primes(p: int, q: int) -> KeyPair:
    public = PublicKey(mpz(p) * mpz(q))
    return KeyPair(public, PrivateKey(public, mpz(p), mpz(q)))


#: user keys a cloud keeps (most recently used), each with its randomizer table and pool
MAX_USER_KEYS = 64
#: largest user key a cloud accepts (its tables and ciphertexts grow with it)
MAX_USER_KEY_BITS = 8192
#: window of a user key's randomizer table: 1,024 entries (0.5 MB at 2048 bits) built in ~1,000
#: multiplications, 64 per randomizer -- a user's answer needs a few, not thousands
USER_KEY_WINDOW = 4
#: memory the kept user keys' tables may take together (least recently used keys go first)
USER_KEYS_TABLE_BYTES = 64 << 20


class UserKeys:
    """The users' public keys a cloud has recently seen, most recently used last: at most ``limit``
    keys and ``max_bytes`` of randomizer tables.

    Each is one :class:`PublicKey` object kept across queries, with its randomizer table (window
    ``USER_KEY_WINDOW``, built at the key's first use) and its pool, which the cloud's pool filler tops
    up between queries (:meth:`pools`).
    """

    def __init__(self, limit: int = MAX_USER_KEYS, max_bytes: int = USER_KEYS_TABLE_BYTES):
        self.limit = limit
        self.max_bytes = max_bytes
        self._keys: OrderedDict[int, PublicKey] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def table_bytes(key: PublicKey) -> int:
        """Memory of the key's randomizer table (entries x ciphertext width)."""
        rows = -(-RANDOMIZER_EXPONENT_BITS // USER_KEY_WINDOW)
        return rows * (1 << USER_KEY_WINDOW) * key.ciphertext_bytes

    def get(self, n: int) -> PublicKey:
        """The kept key for modulus n (a new one if not seen lately). Raises HECNNError for a malformed n."""
        n = int(n)
        with self._lock:
            key = self._keys.get(n)
            if key is not None:
                self._keys.move_to_end(n)
                return key
        new = PublicKey(mpz(n), randomizer_window=USER_KEY_WINDOW)  # outside the lock: checking n is not free
        with self._lock:
            key = self._keys.setdefault(n, new)  # another request may have added it meanwhile
            self._keys.move_to_end(n)
            total = sum(self.table_bytes(k) for k in self._keys.values())
            while len(self._keys) > 1 and (len(self._keys) > self.limit or total > self.max_bytes):
                _, old = self._keys.popitem(last=False)
                total -= self.table_bytes(old)
            return key

    def pools(self, target: int) -> list[tuple[RandomnessPool, int]]:
        """(randomness pool, target) of every kept key, for a :class:`~servers.pools.PoolFiller`."""
        with self._lock:
            return [(key.pool, target) for key in self._keys.values()]

    def __len__(self) -> int:
        return len(self._keys)
