"""Federated averaging through the two clouds: K owners' updates added at S1, the sum only to the owners.

Each owner holds an update v (``count`` fixed-point integers, |v| < 2^b) and a public weight n_k (its
sample count); T = sum n_k. The public :class:`AggregationLayout` fixes b, the weights and the packing:
a slot holds the offset value u = v + 2^b in [0, 2^(b+1)), so a weighted sum of slots lies in
[0, T 2^(b+1)), below 2^l; slots are ``l + kappa + 3`` bits wide (the reveal's slot, guard bit on
top), k = floor((n - 2) / slot) per plaintext, G = ceil(count / k) packs per update.

Steps (one round between the clouds):
  0. Owner k packs its offset values, k per plaintext (unused slots 0), encrypts each pack under the
     cloud key pk and uploads E(P_k) with n_k (:func:`encrypt_update`).
  1. S1 adds the weighted updates: E(S_g) = prod_k E(P_k,g)^(n_k) (:func:`aggregate_updates`); slot j of
     S_g is sum_k n_k u_k,j < 2^l, so no slot carries into the next.
  2. S1 adds packed masks, M = 2^l + r per slot (r uniform in [0, 2^(l+1+kappa))), re-randomises and
     sends the packs with the consortium's public key pk_c (step ``to_consortium``).
  3. S2 decrypts each pack, checks every guard bit, packs the masked slots again and encrypts each
     pack under pk_c (:func:`s2_to_consortium`).
  4. S1 subtracts the packed masks under pk_c and re-randomises: E_c(S_g), sent to the owners.
  5. Each owner decrypts with sk_c, splits the slots and subtracts T 2^b: the exact weighted sum
     s = sum_k n_k v_k; the average is s / T rounded to the nearest integer, halves up:
     floor((2 s + T) / (2 T)) (:func:`divide_rounded`; :func:`plaintext_average` is the reference).

Cost per pack (k values): each owner one encryption (and one decryption of the sum); S1 K
exponentiations by the weights' bits, K - 1 multiplications, one masking multiplication and one
re-randomisation under pk, one subtraction and one re-randomisation under pk_c; S2 one decryption
and one encryption under pk_c. Bytes: per owner G ciphertexts up; S1 to S2 and back G each; G to
each owner. For the ICNN's 11,416 weights at b = 24 bits, T = 1,347: l = 36, 79-bit slots, G = 952 packs
at 1024 bits (12 slots each), 457 at 2048 (25).
S1 learns: ciphertexts only, and the public layout (count, b, the weights n_k).
S2 learns: S + M per slot, statistically independent of the updates and of their sum (2^-kappa), the
count, l and pk_c. Each owner learns the weighted sum, so with K = 2 each owner learns the other's
update from it and its own (docs/threat-model.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np

from he_cnn.crypto.paillier import KAPPA, MIN_KEY_BITS, PrivateKey, PublicKey
from he_cnn.crypto.tensor import EncryptedTensor, as_int_array, object_array
from he_cnn.errors import BadRequest, EncodingOverflow, ProtocolError
from he_cnn.protocols.common import (S1Context, encrypted_reply, masked_reveal, pack_plain, read_ciphertexts, read_revealed,
                                     reveal_packs, sample_masks, slot_bits, slots_per_pack)
from he_cnn.protocols.output import attach_receiver_key, receiver_key
from he_cnn.wire import Message

if TYPE_CHECKING:
    from he_cnn.parties.key_cloud import KeyCloud

STEP = "to_consortium"

#: widest fixed-point value an update may declare (a slot must fit a 1024-bit plaintext many times)
MAX_VALUE_BITS = 64
#: most owners in one aggregation
MAX_OWNERS = 1024


@dataclass(frozen=True)
class AggregationLayout:
    """The public shape of one aggregation: ``count`` values of at most ``value_bits`` bits (|v| <
    2^value_bits) per owner, each owner's integer weight, and the cloud key's size."""

    count: int
    value_bits: int
    weights: tuple[int, ...]
    key_bits: int
    kappa: int = KAPPA

    def __post_init__(self) -> None:
        if type(self.count) is not int or self.count < 1:
            raise BadRequest(f"an update needs at least one value, got count={self.count!r}")
        if type(self.value_bits) is not int or not 1 <= self.value_bits <= MAX_VALUE_BITS:
            raise BadRequest(f"value_bits must be an int in [1, {MAX_VALUE_BITS}], got {self.value_bits!r}")
        if not 2 <= len(self.weights) <= MAX_OWNERS or any(type(w) is not int or w < 1 for w in self.weights):
            raise BadRequest(f"expected 2 to {MAX_OWNERS} positive integer weights, got {self.weights!r}")
        if self.kappa < KAPPA:
            raise BadRequest(f"kappa {self.kappa} is below the minimum {KAPPA}")
        slots_per_pack(self.key_bits, self.slot)  # refuses a slot wider than the plaintext

    @property
    def total(self) -> int:
        return sum(self.weights)

    @property
    def offset(self) -> int:
        """What each owner adds to a value so that its slot is non-negative."""
        return 1 << self.value_bits

    @property
    def sum_bits(self) -> int:
        """l: every slot of the weighted sum lies in [0, 2^l)."""
        return (self.total * (2 << self.value_bits) - 1).bit_length()

    @property
    def slot(self) -> int:
        return slot_bits(self.sum_bits, self.kappa)

    @property
    def per_pack(self) -> int:
        return slots_per_pack(self.key_bits, self.slot)

    @property
    def packs(self) -> int:
        return -(-self.count // self.per_pack)


def pack_update(values: np.ndarray, layout: AggregationLayout) -> np.ndarray:
    """The owner's plaintext packs (G,) of ``values`` (|v| < 2^b each), offset and padded with zeros."""
    flat = as_int_array(values).reshape(-1)
    if flat.size != layout.count:
        raise BadRequest(f"an update of {flat.size} values, the layout expects {layout.count}")
    if flat.size and max(abs(int(v)) for v in flat) >= layout.offset:
        raise EncodingOverflow(f"an update value does not fit {layout.value_bits} bits")
    slots = object_array([0] * (layout.packs * layout.per_pack))
    slots[:layout.count] = flat + layout.offset
    return pack_plain(slots.reshape(layout.packs, layout.per_pack), layout.slot)


def encrypt_update(pk: PublicKey, values: np.ndarray, layout: AggregationLayout) -> EncryptedTensor:
    """Step 0, owner: E(P) under the cloud key, one ciphertext per pack."""
    if pk.bits != layout.key_bits:
        raise BadRequest(f"a {pk.bits}-bit key for a layout of {layout.key_bits}-bit packs")
    return EncryptedTensor.encrypt(pk, pack_update(values, layout))


def aggregate_updates(updates: Sequence[EncryptedTensor], layout: AggregationLayout) -> EncryptedTensor:
    """Step 1, S1: E(sum_k n_k P_k), the updates in the order of ``layout.weights``."""
    if len(updates) != len(layout.weights):
        raise ProtocolError(f"{len(updates)} updates for {len(layout.weights)} owners")
    for update in updates:
        if update.shape != (layout.packs,):
            raise ProtocolError(f"an update of shape {update.shape}, expected ({layout.packs},) packs")
    total = updates[0].mul_plain(layout.weights[0])
    for update, weight in zip(updates[1:], layout.weights[1:]):
        total = total.add(update.mul_plain(weight))
    return total


def reencrypt_for_consortium(ctx: S1Context, total: EncryptedTensor, layout: AggregationLayout,
                             consortium_key: PublicKey) -> EncryptedTensor:
    """Steps 2 and 4, S1: the packs E(S) under the cloud key become E_c(S) under the consortium key."""
    _check_consortium_key(ctx, consortium_key)
    if total.shape != (layout.packs,) or layout.kappa != ctx.kappa:
        raise ProtocolError(f"packs of shape {total.shape} do not match the layout's ({layout.packs},)")
    masks = object_array(sample_masks(layout.packs * layout.per_pack, layout.sum_bits, ctx.kappa))
    masks = masks.reshape(layout.packs, layout.per_pack)
    msg = reveal_packs(ctx, "sum", list(total.data), masks, layout.sum_bits)
    return _exchange(ctx, msg, layout.packs, pack_plain(masks, layout.slot), consortium_key)


def reencrypt_values_for_consortium(ctx: S1Context, values: EncryptedTensor, bits: int,
                                    consortium_key: PublicKey) -> EncryptedTensor:
    """The same round for one ciphertext per value (|v| < 2^bits): S1 packs them masked (the reveal's
    Horner packing), S2 re-packs and encrypts each pack under pk_c, S1 removes all of each mask but its
    2^bits, so slot j holds v_j + 2^bits, non-negative (:func:`read_values` undoes it). Used to tell the
    owners the integers S1 serves as their model (:func:`unpack_scaled`)."""
    _check_consortium_key(ctx, consortium_key)
    msg, masks = masked_reveal(ctx, "sum", values.flatten(), bits)
    slot = slot_bits(bits, ctx.kappa)
    per_pack = slots_per_pack(ctx.public_key.bits, slot)
    packs = -(-len(masks) // per_pack)
    rest = object_array([m - (1 << bits) for m in masks] + [0] * (packs * per_pack - len(masks)))
    return _exchange(ctx, msg, packs, pack_plain(rest.reshape(packs, per_pack), slot), consortium_key)


def _check_consortium_key(ctx: S1Context, consortium_key: PublicKey) -> None:
    if consortium_key.bits < ctx.public_key.bits:
        raise ProtocolError(f"a consortium key of {consortium_key.bits} bits cannot hold the cloud key's "
                            f"{ctx.public_key.bits}-bit packs")


def _exchange(ctx: S1Context, msg: Message, packs: int, unmask: np.ndarray, consortium_key: PublicKey) -> EncryptedTensor:
    """Step ``to_consortium`` for a revealing ``msg``: the packs S2 returns under pk_c, less ``unmask``."""
    attach_receiver_key(msg, consortium_key, MIN_KEY_BITS)
    reply = ctx.channel.request(STEP, msg)
    with ctx.tracer.op("s1_validate"):
        out = read_ciphertexts(consortium_key, reply, "sum_c", (packs,))
    with ctx.tracer.op("s1_combine"):
        return out.sub(unmask).rerandomize()


def s2_to_consortium(cloud: "KeyCloud", msg: Message) -> Message:
    """Step 3, S2: the masked packs again, each encrypted under the consortium key."""
    values, l = read_revealed(cloud, msg, "sum")
    slot = slot_bits(l, msg.get("kappa", int))
    per_pack = slots_per_pack(cloud.keys.public.bits, slot)
    key = receiver_key(cloud, msg)
    if key.bits < cloud.keys.public.bits:
        raise ProtocolError(f"a consortium key of {key.bits} bits cannot hold the cloud key's packs")
    padded = object_array(list(values) + [0] * (-len(values) % per_pack))  # a last pack may be part full
    packs = pack_plain(padded.reshape(-1, per_pack), slot)
    with cloud.tracer.op("s2_encrypt"):
        reply = Message()
        reply.arrays["sum_c"] = object_array([key.encrypt(int(p)) for p in packs])
        reply.widths["sum_c"] = key.ciphertext_bytes
    return reply


def decrypt_sum(private: PrivateKey, total: EncryptedTensor, layout: AggregationLayout) -> np.ndarray:
    """Step 5, owner: the exact weighted sum sum_k n_k v_k (``count`` ints) from E_c(S)."""
    if total.shape != (layout.packs,):
        raise ProtocolError(f"packs of shape {total.shape}, expected ({layout.packs},)")
    return _split(private, total, layout.slot, layout.per_pack, layout.count, layout.total * layout.offset)


def read_values(private: PrivateKey, packs: EncryptedTensor, bits: int, count: int, cloud_key_bits: int,
                kappa: int = KAPPA) -> np.ndarray:
    """Owner: the ``count`` values of :func:`reencrypt_values_for_consortium`'s packs."""
    slot = slot_bits(bits, kappa)
    per_pack = slots_per_pack(cloud_key_bits, slot)
    if packs.shape != (-(-count // per_pack),):
        raise ProtocolError(f"packs of shape {packs.shape} cannot hold {count} values of {slot} bits")
    return _split(private, packs, slot, per_pack, count, 1 << bits)


def _split(private: PrivateKey, packs: EncryptedTensor, slot: int, per_pack: int, count: int, shift: int) -> np.ndarray:
    """The first ``count`` slots of the decrypted packs, each less ``shift``."""
    slot_mask, slots = (1 << slot) - 1, []
    for pack in packs.decrypt(private):
        pack = int(pack)
        for _ in range(per_pack):
            slots.append((pack & slot_mask) - shift)
            pack >>= slot
    return object_array(slots[:count])


def divide_rounded(sums: np.ndarray, total: int) -> np.ndarray:
    """The average: each sum divided by ``total``, rounded to the nearest integer, halves up."""
    return object_array([(2 * int(s) + total) // (2 * total) for s in as_int_array(sums).reshape(-1)])


def plaintext_average(updates: Sequence[np.ndarray], weights: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """The reference: (weighted sum, rounded average) of plaintext integer updates."""
    sums = sum(as_int_array(u).reshape(-1) * int(w) for u, w in zip(updates, weights))
    return sums, divide_rounded(sums, int(sum(weights)))



UNPACK_STEP = "unpack_scaled"
#: most runs of one scale factor in an unpack request, and the widest numerator or denominator
MAX_RUNS = 4096
MAX_FACTOR_BITS = 128


def unpack_scaled(ctx: S1Context, total: EncryptedTensor, layout: AggregationLayout,
                  runs: Sequence[tuple[int, int, int]]) -> EncryptedTensor:
    """The packed sum E(S) becomes one ciphertext per value, scaled: E(round(S_j num_j / den_j) + c_j), c_j in
    {0, 1}, the (count, num, den) ``runs`` covering the values in order. Used to publish the last round's
    aggregate as a model (the owners learn the exact result through :func:`reencrypt_for_consortium`'s
    sibling, the per-value re-encryption, before they name its public spec).

    Steps (one round): 1. S1 subtracts the packed offsets T 2^b, adds packed masks M_j = 2^l + r_j,
    re-randomises and sends the packs with the runs (step ``unpack_scaled``). 2. S2 decrypts, checks the
    guard bits and returns fresh E(floor((d_j num_j + floor(den_j / 2)) / den_j)) for d_j = S_j + M_j.
    3. S1 subtracts floor(M_j num_j / den_j). Cost: S2 one decryption per pack and one encryption per
    value; S1 one subtraction per value. S1 learns: ciphertexts. S2 learns: S_j + M_j (2^-kappa each),
    the runs (public scale factors of the served model: its layers' weight shifts), the count.
    """
    if total.shape != (layout.packs,) or layout.kappa != ctx.kappa:
        raise ProtocolError(f"packs of shape {total.shape} do not match the layout's ({layout.packs},)")
    expanded = _expand_runs(runs, layout.count)
    masks = object_array(sample_masks(layout.packs * layout.per_pack, layout.sum_bits, ctx.kappa))
    masks = masks.reshape(layout.packs, layout.per_pack)
    offsets = np.full((layout.packs, layout.per_pack), layout.total * layout.offset, dtype=object)
    unoffset = total.sub(pack_plain(offsets, layout.slot))
    msg = reveal_packs(ctx, "sum", list(unoffset.data), masks, layout.sum_bits)
    msg.meta["runs"] = [list(r) for r in runs]
    reply = ctx.channel.request(UNPACK_STEP, msg)
    with ctx.tracer.op("s1_validate"):
        out = read_ciphertexts(ctx.public_key, reply, "scaled", (layout.count,))
    with ctx.tracer.op("s1_combine"):
        flat = masks.reshape(-1)
        return out.sub([int(m) * num // den for m, (num, den) in zip(flat, expanded)]).rerandomize()


def scaled_bits(layout: AggregationLayout, runs: Sequence[Sequence[int]]) -> int:
    """A bit bound of every value :func:`unpack_scaled` returns for these (count, num, den) runs."""
    return max(layout.sum_bits + 1 + (run[1] // run[2]).bit_length() for run in runs)


def _expand_runs(runs: Sequence[Sequence[int]], count: int) -> list[tuple[int, int]]:
    """(num, den) per value from (count, num, den) runs, checked: they must cover exactly ``count`` values."""
    if not isinstance(runs, (list, tuple)) or not 1 <= len(runs) <= MAX_RUNS:
        raise ProtocolError(f"expected 1 to {MAX_RUNS} runs of scale factors")
    out: list[tuple[int, int]] = []
    for run in runs:
        if not (isinstance(run, (list, tuple)) and len(run) == 3 and all(type(v) is int for v in run)
                and run[0] >= 1 and 1 <= run[1] < 1 << MAX_FACTOR_BITS and 1 <= run[2] < 1 << MAX_FACTOR_BITS):
            raise ProtocolError("a run is (count >= 1, num >= 1, den >= 1), each below the limits")
        if len(out) + run[0] > count:
            raise ProtocolError(f"the runs cover more than the {count} values")
        out.extend([(run[1], run[2])] * run[0])
    if len(out) != count:
        raise ProtocolError(f"the runs cover {len(out)} values, expected {count}")
    return out


def s2_unpack_scaled(cloud: "KeyCloud", msg: Message) -> Message:
    """Step 2 of :func:`unpack_scaled`, S2."""
    values, _ = read_revealed(cloud, msg, "sum")
    runs = msg.get("runs", list)
    count = sum(r[0] for r in runs if isinstance(r, list) and r and type(r[0]) is int)
    if count > len(values):
        raise ProtocolError(f"the runs cover {count} values, the packs hold {len(values)}")
    expanded = _expand_runs(runs, count)
    return encrypted_reply(cloud, {"scaled": [(d * num + den // 2) // den for d, (num, den) in zip(values, expanded)]})


S2_HANDLERS = {STEP: s2_to_consortium, UNPACK_STEP: s2_unpack_scaled}
