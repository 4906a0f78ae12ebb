"""What every protocol shares: S1's context, statistical masks, and packed reveals to S2.

A *reveal* is how S2 gets to see a value at all: S1 adds a mask ``M = 2^l + r`` with r uniform in
``[0, 2^(l+1+kappa))`` to a value |x| < 2^l, so that ``x + M`` is non-negative, below
``2^(l+2+kappa)``, and statistically independent of x (distance <= 2^-kappa). S1 packs as many
masked values as fit into one Paillier plaintext (slots of ``l + kappa + 3`` bits: one guard bit
on top), re-randomises, and sends one ciphertext per pack; S2 decrypts once per pack and splits the
slots. A set guard bit means a value was outside its declared bound, which S2 reports as
:class:`BoundExceeded` instead of computing on garbage.
"""
from __future__ import annotations

import functools

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import gmpy2
import numpy as np
from gmpy2 import mpz

from he_cnn.transport.channel import Channel
from he_cnn.crypto.dgk import DGKPublicKey
from he_cnn.errors import BoundExceeded, ProtocolError
from he_cnn.crypto.paillier import KAPPA, PrivateKey, PublicKey, keypair_from_primes, random_ints
from he_cnn.parallel import INLINE, Workers, from_blob, powmod_seconds, to_blob
from he_cnn.protocols.millionaire import OTLink  # (millionaire needs this module for typing only)
from he_cnn.trace import NULL_TRACER, Tracer
from he_cnn.crypto.tensor import EncryptedTensor, object_array
from he_cnn.wire import Message

if TYPE_CHECKING:
    from he_cnn.parties.key_cloud import KeyCloud


@dataclass
class S1Context:
    """Everything S1 needs to run protocols: public keys and the channel. No secret key, ever."""

    public_key: PublicKey
    dgk_key: DGKPublicKey
    channel: Channel
    kappa: int = KAPPA
    #: process pool for the heavy loops (inline by default)
    workers: Workers = INLINE
    #: counts of public-key operations by kind, for the benchmark
    ops: dict[str, int] = field(default_factory=dict)
    #: hears about S1's layers and heavy operations (:mod:`he_cnn.trace`); the channel has its own
    #: (``Channel.tracer``) for wire encoding and transport
    tracer: Tracer = NULL_TRACER
    #: how comparisons get their bit: "ot" (oblivious-transfer millionaires', :mod:`he_cnn.protocols.millionaire`)
    #: or "dgk" (DGK/Veugen, public-key work per bit); S2 serves both, S1 picks
    comparison: str = "ot"
    #: the OT link to S2 for the "ot" comparison; a service shares one between all its contexts (base OTs once)
    ot_link: OTLink = field(default_factory=OTLink)

    def count(self, kind: str, n: int = 1) -> None:
        self.ops[kind] = self.ops.get(kind, 0) + n


#: the comparison protocols S1 can pick (S2 serves both)
COMPARISONS = ("ot", "dgk")


def slot_bits(l: int, kappa: int) -> int:
    return l + kappa + 3


def sample_masks(count: int, l: int, kappa: int) -> list[int]:
    """Masks 2^l + r, r uniform in [0, 2^(l+1+kappa)): x + M hides |x| < 2^l statistically."""
    offset = 1 << l
    return [offset + r for r in random_ints(count, l + 1 + kappa)]


def slots_per_pack(n_bits: int, slot: int) -> int:
    k = (n_bits - 2) // slot
    if k < 1:
        raise BoundExceeded(f"a {slot}-bit slot does not fit a {n_bits}-bit plaintext")
    return k


def pack_masked(ctx: S1Context, values: EncryptedTensor, masks: Sequence[int], l: int) -> np.ndarray:
    """S1: ciphertexts of sum_i (x_i + M_i) 2^(slot*i), one per pack, re-randomised."""
    pk = ctx.public_key
    nsq = pk.nsq
    slot = slot_bits(l, ctx.kappa)
    k = slots_per_pack(pk.bits, slot)
    flat = values.data.reshape(-1)
    if len(masks) != flat.size:
        raise ProtocolError(f"{len(masks)} masks for {flat.size} values")
    ctx.tracer.reveal(flat.size, l)
    n_packs = -(-flat.size // k)
    with ctx.tracer.op("s1_pack"):
        randomizers = [pk.randomizer() for _ in range(n_packs)]  # drawn here, in order; used in the workers
        calls = [(pk.n, nsq, flat[r.start * k:r.stop * k], list(masks[r.start * k:r.stop * k]), slot, k,
                  randomizers[r.start:r.stop])
                 for r in ctx.workers.chunks(n_packs, item_seconds=k * powmod_seconds(2 * pk.bits, slot))]
        packs = [c for part in ctx.workers.map(_pack_chunk, calls) for c in part]
    ctx.count("pack_values", flat.size)
    ctx.count("rerandomize", len(packs))
    return object_array(packs, len(packs))


def _pack_chunk(n: mpz, nsq: mpz, values: np.ndarray, masks: list[int], slot: int, k: int,
                randomizers: list[mpz]) -> list[mpz]:
    """Horner packing of consecutive groups of k masked values, each pack re-randomised with its
    randomizer: the ciphertexts shifted and multiplied, the masks packed in the clear and added once
    per pack."""
    shift = mpz(1) << slot
    packs = []
    for start in range(0, len(values), k):
        acc, mask = mpz(1), 0
        for i in range(min(start + k, len(values)) - 1, start - 1, -1):
            if acc != 1:
                acc = gmpy2.powmod(acc, shift, nsq)
            acc = acc * values[i] % nsq
            mask = (mask << slot) + masks[i]
        packs.append(acc * (1 + mask % n * n) % nsq * randomizers[len(packs)] % nsq)
    return packs


@functools.lru_cache(maxsize=4)
def _private_key(p: int, q: int) -> PrivateKey:
    return keypair_from_primes(p, q).private


@dataclass(frozen=True)
class S2WorkerKey:
    """S2's secret key material as its workers use it: the Paillier primes (decryption) and the DGK
    prime and order (zero tests), named by the cloud key's id.

    Keyed work receives it as its first argument through :meth:`he_cnn.parallel.Workers.map_keyed`; on
    Ray each of S2's actors loads it once from S2's key file and a task carries only ``key_id``
    (:mod:`he_cnn.ray_workers`). Its repr shows the id only.
    """

    key_id: str
    p: int
    q: int
    dgk_n: int
    dgk_p: int
    dgk_v_p: int

    def __repr__(self) -> str:
        return f"S2WorkerKey(key_id={self.key_id!r})"

    def paillier(self) -> PrivateKey:
        return _private_key(self.p, self.q)


def _decrypt_chunk(key: S2WorkerKey, packs: list[mpz]) -> list[int]:
    private = key.paillier()
    return [int(private.decrypt_raw(private.public.validate(c))) for c in packs]


def decrypt_many(key: S2WorkerKey, workers: Workers, ciphertexts: Sequence[int]) -> list[int]:
    """Raw plaintexts of validated ciphertexts, spread over ``workers``."""
    bits = int(key.p * key.q).bit_length()
    chunks = workers.chunks(len(ciphertexts), minimum=2, item_seconds=2 * powmod_seconds(bits, bits // 2))
    return [m for part in workers.map_keyed(_decrypt_chunk, [(list(ciphertexts[r.start:r.stop]),) for r in chunks], key)
            for m in part]


def unpack_revealed(key: S2WorkerKey, key_bits: int, packs: np.ndarray, count: int, l: int, kappa: int,
                    workers: Workers = INLINE) -> list[int]:
    """S2: decrypt each pack (``key_bits``-bit key) and split it into ``count`` masked values, checking
    the guard bits."""
    slot = slot_bits(l, kappa)
    k = slots_per_pack(key_bits, slot)
    if len(packs) != -(-count // k):
        raise ProtocolError(f"{len(packs)} packs cannot hold {count} values of {slot} bits")
    values: list[int] = []
    slot_mask = (1 << slot) - 1
    limit = 1 << (slot - 1)
    for m in decrypt_many(key, workers, list(packs.reshape(-1))):
        for _ in range(min(k, count - len(values))):
            v = m & slot_mask
            if v >= limit:
                raise BoundExceeded(
                    f"a masked value exceeds its declared bound of {l} bits: the input or the model "
                    "is outside the range the protocol was set up for"
                )
            values.append(v)
            m >>= slot
        if m:
            raise BoundExceeded(f"pack holds more than its slots: a value exceeds its declared {l}-bit bound")
    return values


def reveal_message(ctx: S1Context, name: str, values: EncryptedTensor, l: int, masks: Sequence[int]) -> Message:
    """A message field holding ``values`` (|x| < 2^l) masked by ``masks`` (from sample_masks) and packed."""
    msg = Message(meta={f"{name}_count": values.size, f"{name}_bits": l, "kappa": ctx.kappa})
    msg.arrays[name] = pack_masked(ctx, values, masks, l)
    msg.widths[name] = ctx.public_key.ciphertext_bytes
    return msg


def pack_plain(values: np.ndarray, slot: int) -> np.ndarray:
    """(G, k) integers -> (G,) plaintexts sum_j values[g, j] 2^(slot j): slot j of pack g."""
    shifts = np.array([1 << (slot * j) for j in range(values.shape[1])], dtype=object)
    return (values * shifts).sum(axis=1)


def reveal_packs(ctx: S1Context, name: str, packs: Sequence[mpz], masks: np.ndarray, l: int) -> Message:
    """A message field revealing values S1 already holds packed (k slots of ``slot_bits(l)`` per
    ciphertext, values in [0, 2^l)): ``masks`` (G, k) from sample_masks are added slot by slot and
    every pack is re-randomised. S2 reads it with :func:`read_revealed`, like any reveal."""
    pk = ctx.public_key
    msg = Message(meta={f"{name}_count": masks.size, f"{name}_bits": l, "kappa": ctx.kappa})
    with ctx.tracer.op("s1_pack"):
        msg.arrays[name] = object_array([pk.rerandomize(c * pk.plain_term(int(m)) % pk.nsq)
                                         for c, m in zip(packs, pack_plain(masks, slot_bits(l, ctx.kappa)))], len(packs))
    msg.widths[name] = pk.ciphertext_bytes
    ctx.count("rerandomize", len(packs))
    return msg


def masked_reveal(ctx: S1Context, name: str, values: EncryptedTensor, l: int) -> tuple[Message, list[int]]:
    """Fresh masks for ``values`` and the message revealing them; returns both."""
    masks = sample_masks(values.size, l, ctx.kappa)
    return reveal_message(ctx, name, values, l, masks), masks


def read_revealed(cloud: "KeyCloud", msg: Message, name: str) -> tuple[list[int], int]:
    """S2: the masked values of field ``name`` and their declared bit bound."""
    count, l, kappa = (msg.get(f"{name}_count", int), msg.get(f"{name}_bits", int), msg.get("kappa", int))
    if kappa < KAPPA or l < 0 or count < 0:
        raise ProtocolError(f"reveal parameters out of range: count={count}, bits={l}, kappa={kappa} (min {KAPPA})")
    with cloud.tracer.op("s2_decrypt"):
        values = unpack_revealed(cloud.worker_key, cloud.keys.public.bits, msg.array(name), count, l, kappa,
                                 cloud.workers)
    cloud.observe(name, values, l, kappa)
    return values, l


def ciphertext_field(msg: Message, name: str, cts: Sequence[mpz], width: int) -> None:
    msg.arrays[name] = object_array(cts)
    msg.widths[name] = width


#: fewest values a reply field must have before its encryptions go to the workers
PARALLEL_ENCRYPTIONS = 64


def encrypted_reply(cloud: "KeyCloud", fields: dict[str, Sequence[int]], meta: dict | None = None,
                    shapes: dict[str, tuple[int, ...]] | None = None) -> Message:
    """S2: a reply whose fields are fresh Paillier encryptions of the given signed integers.

    The randomizers come from the key's pool here, in order; with several workers and enough values
    the multiplications run there (:func:`_encrypt_chunk`) and the ciphertexts come back as the
    fixed-width bytes the wire sends, so the request thread does not hold the GIL for them."""
    pk = cloud.keys.public
    width = pk.ciphertext_bytes
    msg = Message(meta=dict(meta or {}))
    with cloud.tracer.op("s2_encrypt"):
        for name, values in fields.items():
            values = [int(v) for v in values]
            shape = (shapes or {}).get(name, (len(values),))
            if cloud.workers.count == 1 or len(values) < PARALLEL_ENCRYPTIONS:
                ciphertext_field(msg, name, [pk.encrypt(v) for v in values], width)
                msg.arrays[name] = msg.arrays[name].reshape(shape)
                continue
            randomizers = [pk.randomizer() for _ in values]
            calls = [(pk.n, pk.nsq, values[r.start:r.stop], to_blob(randomizers[r.start:r.stop], width), width)
                     for r in cloud.workers.chunks(len(values), minimum=PARALLEL_ENCRYPTIONS // 2,
                                                   item_seconds=powmod_seconds(2 * pk.bits, 2))]
            msg.set_blob(name, b"".join(cloud.workers.map(_encrypt_chunk, calls)), width, shape)
    return msg


def _encrypt_chunk(n: mpz, nsq: mpz, values: list[int], randomizers: bytes, width: int) -> bytes:
    """E(v) = (1 + (v mod N) N) r mod N^2 for each value with its randomizer, as fixed-width bytes."""
    return to_blob([(1 + v % n * n) * r % nsq for v, r in zip(values, from_blob(randomizers, width))], width)


def read_ciphertexts(pk: PublicKey, msg: Message, name: str, shape: tuple[int, ...]) -> EncryptedTensor:
    """Ciphertexts of field ``name``, validated, with the expected shape."""
    arr = msg.array(name)
    if arr.size != int(np.prod(shape)):
        raise ProtocolError(f"field {name!r} has {arr.size} ciphertexts, expected shape {shape}")
    return EncryptedTensor.from_ciphertexts(pk, arr.reshape(-1), shape)
