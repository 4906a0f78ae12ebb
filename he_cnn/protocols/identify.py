"""Encrypted 1:N identification: the best of N enrolled templates for an encrypted embedding.

A gallery is N templates T_i (F integers each, |T| < 2^lt) that the owner enrols in chunks. The
query is the secure CNN's embedding E(x) (|x| < 2^lx) at S1. The similarity is the exact inner
product y_i = x . T_i (|y| < 2^ly, ly = lx + lt + ceil(log2 F)); the answer is the index of the
largest y_i if it reaches the owner's threshold theta, else "no match".

Where the templates are (per enrolment chunk, made by the owner, :func:`enrol_chunk`):
  - S1: E(P), the templates *packed along the templates*: P[f, g] = sum_j T[g k + j, f] 2^(s j), k
    templates per ciphertext (slots of s = ly + kappa + 3 bits, the reveal's layout); and the masks
    B = T~ - T in the clear (B > 0), with T~ = PRG(sigma) uniform in [2^lt, 2^lt + 2^(lt+1+kappa)).
  - S2: sigma, the 128-bit seed of T~ (the owner sends E(sigma) under the cloud key; S1 relays it,
    step ``gallery_setup``). T~ = T + B is S2's masked copy of the templates, as K + B is a model's.
  - E(theta), the threshold, at S1. Labels stay with the owner: the clouds hold indices.

Offline, k_q future queries at a time (:func:`prepare_identify`, two rounds; k_q = 13 at 2048 bits for
the seed's gallery):
  1. (step ``identify_prepare``) S2 draws the query masks A_q (A_(q,f) = 2^lx + r, r uniform in
     [0, 2^(lx+1+kappa))) and sends, per feature, E(sum_q A_(q,f) 2^(su q)), slots of su bits
     (:func:`cross_bits`: A . B < 2^lu).
  2. S1: E(U_i) = prod_f E(packed A_f)^B[i, f], slot q = A_q . B_i: the F x N multiply-accumulates by
     (lt+2+kappa)-bit exponents, once for the k_q queries. It reveals every U_i masked slot by slot.
  3. (step ``identify_masks``) S2: z = A_q . T~_i - (A_q . B_i + M) = A_q . T_i - M; it keeps each A_q
     under its own ticket (for PREPARED_SECONDS) and replies E(-z) packed per group and query; S1 adds
     its -M there: E(C_(q,g)) = E(sum_j -(A_q . T_(g k + j)) 2^(s j)) (A . T = A . T~ - A . B).
Online, per query:
  1. (step ``identify``) S1 reveals x + R (packed, as any reveal) with the ticket. S2 pops A and
     replies x + R + A in the clear; S1 subtracts R: it holds x' = x + A (uniform to it, 2^-kappa).
  2. S1, per group g: E(Y_g) = prod_f E(P[f, g])^(x'_f) * E(C_g), whose slot j is
     x' . T_i - A . T_i = x . T_i = y_i, exactly (all mod N; only the revealed slots below must fit).
     The F bases of a group share the exponents x': a bucket multi-exponentiation, about
     (la / c)(F + 2^(c+1)) multiplications per group for la = lx + 2 + kappa exponent bits and a
     c-bit window, i.e. ~0.35 multiplications per multiply-accumulate at F = 1024, k = 29.
  3. (step ``identify_unpack``) S1 reveals every slot masked, y_i + M_i (M = 2^ly + r); S2 replies
     fresh E((y_i + M_i) 2^m) one per template, m = bit length of N. S1 forms the leaves
     E(c_i) = E(y_i 2^m + code_i), code_i = 2^m - 2 - i, and one more leaf for "no match",
     E(theta 2^m - 1) = E((theta - 1) 2^m + 2^m - 1).
  4. Secure argmax: a tournament of :func:`~he_cnn.protocols.comparison.secure_max` on the leaves,
     one batched call per level (ceil(log2(N + 1)) levels, N comparisons of ly + m + 1 bits; an odd
     leaf passes through). The value carries the index in its low m bits, so comparing and selecting
     with the same bit t moves similarity and index together, and ties break by the code: equal
     similarities go to the smaller index, and a best similarity of theta - 1 loses to "no match",
     so a template matches exactly when y_i >= theta.
  5. S1 adds R' 2^m to the winner (R' = 2^ly + r, r uniform in [0, 2^(ly+1+kappa))) and re-encrypts
     it to the user (:func:`~he_cnn.protocols.output.reencrypt_for_user`). The user decrypts
     w = (y* + R') 2^m + code* and reads only code* = w mod 2^m (:func:`read_answer`): an index or
     "no match"; y* + R' is statistically independent of y*.
Verify (a claimed index j): steps 1-3 for j's group only, then one comparison between j's leaf and
the "no match" leaf: the user reads code_j (match) or the no-match code.

Cost online, N templates, G = ceil(N / k) groups: S1 the G multi-exponentiations of step 2 (about
F G (la / c) multiplications mod N^2, no per-template exponentiation), the packing of F values and
G re-randomisations; S2 decrypts ceil(F / k_x) + G packs and encrypts N values; then N secure
comparisons (the tournament) and one re-encryption. Rounds: 2 + levels x (rounds of one
comparison) + 1. Offline, per batch of k_q queries: S1 F N multiply-accumulates (Straus) and N
re-randomisations, S2 F + k_q G encryptions and N decryptions.
S1 learns: x + A (statistically independent of x), ciphertexts.  S2 learns: x + R, y_i + M_i
(statistically independent of x and y), the comparisons' masked values and uniform bits, N, F and
the bit lengths; and the seeds sigma, independent of the templates. Which template won is never
revealed to either cloud: the tournament's selections happen on ciphertexts (verify: S1 knows the
claimed index, not the result).
"""
from __future__ import annotations

import bisect
import hashlib
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from gmpy2 import mpz

from he_cnn.crypto.paillier import KAPPA, PublicKey
from he_cnn.crypto.tensor import EncryptedTensor, multi_exponentiate, object_array
from he_cnn.bounded_json import JSONLimits, read_json_file
from he_cnn.errors import BadRequest, BoundExceeded, ProtocolError, ShapeError, UnknownGallery, UnknownPrepared
from he_cnn.protocols.common import (S1Context, encrypted_reply, read_ciphertexts, read_revealed,
                                     reveal_message, reveal_packs, sample_masks, slot_bits, slots_per_pack)
from he_cnn.protocols.comparison import secure_max
from he_cnn.protocols.output import reencrypt_for_user
from he_cnn.wire import Message

if TYPE_CHECKING:
    from he_cnn.parties.key_cloud import KeyCloud

SETUP_STEP = "gallery_setup"
DROP_STEP = "gallery_drop"
PREPARE_STEP = "identify_prepare"
MASKS_STEP = "identify_masks"
STEP = "identify"
UNPACK_STEP = "identify_unpack"

#: the widest template the 64-bit mask generator serves: T~ < 2^(lt + 2 + kappa) <= 2^63
MAX_TEMPLATE_BITS = 63 - 2 - KAPPA
#: seeds are 128-bit AES keys
SEED_BYTES = 16


def similarity_bits(embedding_bits: int, template_bits: int, features: int) -> int:
    """ly with |x . T| < 2^ly for |x| < 2^lx and |T| < 2^lt over F features."""
    return embedding_bits + template_bits + max(0, features - 1).bit_length()


def cross_bits(embedding_bits: int, template_bits: int, features: int, kappa: int = KAPPA) -> int:
    """lu with A . B < 2^lu for query masks A < 2^(lx+2+kappa) and template masks B < 2^(lt+2+kappa)."""
    return embedding_bits + template_bits + 2 * (2 + kappa) + max(0, features - 1).bit_length()


def batch_size(key_bits: int, embedding_bits: int, template_bits: int, features: int, kappa: int = KAPPA) -> int:
    """k_q: future queries prepared together, their masks A packed in one plaintext per feature (slots
    of ``cross_bits``, the reveal's layout)."""
    return slots_per_pack(key_bits, slot_bits(cross_bits(embedding_bits, template_bits, features, kappa), kappa))


def group_templates(counts: Sequence[int], k: int, groups: Sequence[int]) -> list[list[int]]:
    """The template indices of each of ``groups`` (numbered across the chunks of ``counts`` templates,
    k templates per group, a chunk's last group possibly short)."""
    spans, first_group, first_template = [], 0, 0
    for count in counts:
        spans.append((first_group, first_template, count))
        first_group, first_template = first_group + -(-count // k), first_template + count
    out = []
    for g in groups:
        if type(g) is not int or not 0 <= g < first_group:
            raise ProtocolError(f"group {g!r} is not one of the gallery's {first_group}")
        start, offset, count = spans[bisect.bisect_right([s[0] for s in spans], g) - 1]
        local = (g - start) * k
        out.append(list(range(offset + local, offset + min(local + k, count))))
    return out


def code_bits(count: int) -> int:
    """m: the low bits of a leaf that carry the template's code (N codes and "no match" fit 2^m)."""
    return max(1, int(count).bit_length())


def group_size(key_bits: int, embedding_bits: int, template_bits: int, features: int, kappa: int = KAPPA) -> int:
    """k: templates per packed ciphertext (the slots of a reveal of ly-bit similarities)."""
    return slots_per_pack(key_bits, slot_bits(similarity_bits(embedding_bits, template_bits, features), kappa))


def template_masks(seed: bytes, count: int, features: int, template_bits: int, kappa: int = KAPPA) -> np.ndarray:
    """T~ = PRG(seed): (count, features) int64 uniform in [2^lt, 2^lt + 2^(lt+1+kappa)) (AES-128-CTR)."""
    if not 0 <= template_bits <= MAX_TEMPLATE_BITS or len(seed) != SEED_BYTES:
        raise BoundExceeded(f"templates of {template_bits} bits exceed the mask generator's {MAX_TEMPLATE_BITS}")
    enc = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
    raw = np.frombuffer(enc.update(bytes(8 * count * features)), dtype=np.uint64)
    values = raw & np.uint64((1 << (template_bits + 1 + kappa)) - 1)
    return (values.astype(np.int64) + (1 << template_bits)).reshape(count, features)


# -- the gallery at S1 --------------------------------------------------------------------------------
@dataclass(frozen=True)
class GalleryChunk:
    """One enrolment: ``count`` templates as S1 holds them (never in the clear)."""

    count: int
    #: E(P): (F, groups) templates packed k per ciphertext
    packs: EncryptedTensor
    #: B = T~ - T, (count, F) positive int64 (S1's masks)
    masks: np.ndarray
    #: E(sigma), the seed of T~, relayed to S2 at set-up
    seed: EncryptedTensor

    @property
    def groups(self) -> int:
        return int(self.packs.shape[1])


@dataclass
class EncryptedGallery:
    """What S1 holds of a gallery: its public shape, E(theta) and the enrolled chunks."""

    gallery_id: str
    features: int
    template_bits: int
    embedding_bits: int
    threshold: EncryptedTensor
    chunks: list[GalleryChunk] = field(default_factory=list)

    @property
    def public_key(self) -> PublicKey:
        return self.threshold.public_key

    @property
    def count(self) -> int:
        return sum(c.count for c in self.chunks)

    @property
    def counts(self) -> list[int]:
        return [c.count for c in self.chunks]

    @property
    def groups(self) -> int:
        return sum(c.groups for c in self.chunks)

    @property
    def group_size(self) -> int:
        return group_size(self.public_key.bits, self.embedding_bits, self.template_bits, self.features)

    def group_of(self, index: int) -> int:
        """The group that holds template ``index`` (:class:`ShapeError` if there is none)."""
        if type(index) is not int or not 0 <= index < self.count:
            raise ShapeError(f"index {index} is not in a gallery of {self.count} templates")
        group, seen = 0, 0
        for chunk in self.chunks:
            if index < seen + chunk.count:
                return group + (index - seen) // self.group_size
            seen, group = seen + chunk.count, group + chunk.groups
        raise AssertionError("unreachable: the index is below the count")

    @property
    def similarity_bits(self) -> int:
        return similarity_bits(self.embedding_bits, self.template_bits, self.features)

    def check_chunk(self, chunk: GalleryChunk) -> None:
        """Refuse a chunk whose arrays do not fit this gallery (:class:`ShapeError`)."""
        k = self.group_size
        if chunk.count < 1 or chunk.packs.shape != (self.features, -(-chunk.count // k)) \
                or chunk.masks.shape != (chunk.count, self.features) or chunk.seed.shape != (1,):
            raise ShapeError(f"an enrolment of {chunk.count} templates must have ({self.features}, "
                             f"{-(-chunk.count // k)}) packs, ({chunk.count}, {self.features}) masks and one seed")
        self.public_key.require_same(chunk.packs.public_key, "gallery packs")
        self.public_key.require_same(chunk.seed.public_key, "gallery seed")


def check_gallery_shape(features: int, template_bits: int, embedding_bits: int, key_bits: int) -> None:
    """The bounds a gallery must keep: masks in 64 bits, a group of at least one template per pack."""
    if features < 1 or not 1 <= template_bits <= MAX_TEMPLATE_BITS or embedding_bits < 1:
        raise BoundExceeded(f"gallery of {features} features, {template_bits}-bit templates, "
                            f"{embedding_bits}-bit embeddings is out of range "
                            f"(templates up to {MAX_TEMPLATE_BITS} bits)")
    group_size(key_bits, embedding_bits, template_bits, features)
    batch_size(key_bits, embedding_bits, template_bits, features)


# -- the owner's side ---------------------------------------------------------------------------------
def encrypt_threshold(public_key: PublicKey, threshold: int, embedding_bits: int, template_bits: int,
                      features: int) -> EncryptedTensor:
    """E(theta) for a threshold within the similarities' range."""
    ly = similarity_bits(embedding_bits, template_bits, features)
    if not -(1 << ly) < threshold <= (1 << ly):
        raise BoundExceeded(f"threshold {threshold} is outside the {ly}-bit range of the similarities")
    return EncryptedTensor.encrypt(public_key, [threshold])


def enrol_chunk(public_key: PublicKey, templates: np.ndarray, template_bits: int, embedding_bits: int,
                seed: bytes | None = None) -> GalleryChunk:
    """The owner: one chunk of (count, F) integer templates as S1 will hold it (the owner keeps T)."""
    templates = np.asarray(templates, dtype=object)
    if templates.ndim != 2 or templates.shape[0] < 1:
        raise ShapeError(f"templates must be a non-empty (count, features) matrix, got shape {templates.shape}")
    count, features = templates.shape
    check_gallery_shape(features, template_bits, embedding_bits, public_key.bits)
    if any(abs(int(v)) >= 1 << template_bits for v in templates.reshape(-1)):
        raise BoundExceeded(f"a template value does not fit its declared {template_bits} bits")
    seed = secrets.token_bytes(SEED_BYTES) if seed is None else seed
    tilde = template_masks(seed, count, features, template_bits)
    masks = (tilde.astype(object) - templates).astype(np.int64)  # in (0, 2^(lt+2+kappa)): 64 bits
    slot = slot_bits(similarity_bits(embedding_bits, template_bits, features), KAPPA)
    k = slots_per_pack(public_key.bits, slot)
    groups = -(-count // k)
    padded = np.zeros((groups * k, features), dtype=object)
    padded[:count] = templates
    shifts = np.array([1 << (slot * j) for j in range(k)], dtype=object)
    plain = (padded.reshape(groups, k, features) * shifts[None, :, None]).sum(axis=1).T  # (F, groups)
    packs = EncryptedTensor.encrypt(public_key, plain)
    return GalleryChunk(count, packs, masks, EncryptedTensor.encrypt(public_key, [int.from_bytes(seed, "big")]))


CHUNK_FORMAT = "he-cnn-gallery-chunk"


def encode_chunk(chunk: GalleryChunk) -> Message:
    """A chunk as the owner uploads it and S1 stores it (wire format)."""
    width = chunk.packs.public_key.ciphertext_bytes
    msg = Message(meta={"format": CHUNK_FORMAT, "key_id": chunk.packs.public_key.key_id, "count": chunk.count})
    msg.arrays.update({"packs": chunk.packs.data, "masks": np.asarray(chunk.masks, dtype=object),
                       "seed": chunk.seed.data})
    msg.widths.update({"packs": width, "seed": width})
    return msg


def decode_chunk(gallery: EncryptedGallery, msg: Message) -> GalleryChunk:
    """A chunk for ``gallery`` from outside, checked: format, key, count, every shape before the
    ciphertexts are validated, and every mask in its range (:class:`BadRequest` family)."""
    pk = gallery.public_key
    if msg.meta.get("format") != CHUNK_FORMAT or msg.meta.get("key_id") != pk.key_id:
        raise ProtocolError(f"not a gallery chunk under key {pk.key_id}")
    count, k = msg.get("count", int), gallery.group_size
    if not 1 <= count <= MAX_TEMPLATES - gallery.count:
        raise BoundExceeded(f"a chunk of {count} templates does not fit a gallery of at most {MAX_TEMPLATES}")
    shapes = {"packs": (gallery.features, -(-count // k)), "masks": (count, gallery.features), "seed": (1,)}
    for name, shape in shapes.items():
        if msg.shape(name) != shape or (name != "masks") != (name in msg.widths):
            raise ShapeError(f"chunk field {name!r} must be {'ciphertexts' if name != 'masks' else 'integers'} "
                             f"of shape {shape}, got {msg.shape(name)}")
    masks = msg.array("masks")
    limit = 1 << (gallery.template_bits + 2 + KAPPA)
    if not all(0 < int(v) < limit for v in masks.reshape(-1)):
        raise BoundExceeded(f"a template mask is outside (0, 2^{gallery.template_bits + 2 + KAPPA})")
    chunk = GalleryChunk(count, EncryptedTensor.from_ciphertexts(pk, msg.array("packs").reshape(-1), shapes["packs"]),
                         masks.astype(np.int64),
                         EncryptedTensor.from_ciphertexts(pk, msg.array("seed").reshape(-1), (1,)))
    gallery.check_chunk(chunk)
    return chunk


# -- set-up: the seeds to S2 --------------------------------------------------------------------------
def setup_gallery(ctx: S1Context, gallery: EncryptedGallery, first_chunk: int = 0) -> None:
    """One round: relay E(sigma) of chunks ``first_chunk``.. to S2, which keeps the seeds; and, for the OT
    comparison, the OT link's base OTs if the context's link has none yet (no query pays for them)."""
    chunks = gallery.chunks[first_chunk:]
    msg = Message(meta={"gallery_id": gallery.gallery_id, "first": first_chunk, "features": gallery.features,
                        "template_bits": gallery.template_bits, "counts": [c.count for c in chunks]})
    msg.arrays["seeds"] = object_array([c.seed.data[0] for c in chunks], len(chunks))
    msg.widths["seeds"] = ctx.public_key.ciphertext_bytes
    ctx.channel.request(SETUP_STEP, msg)
    if ctx.comparison == "ot":
        ctx.ot_link.receiver(ctx)


@dataclass(frozen=True)
class S2Gallery:
    """S2's part of a gallery: the shape, one (count, seed) per chunk and each chunk's :func:`chunk_tag`."""

    features: int
    template_bits: int
    chunks: tuple[tuple[int, bytes], ...]
    #: empty for a gallery stored before tags existed: it then matches no search until S1 relays it again
    tags: tuple[str, ...] = ()

    def holds(self, counts: list[int], tags: list[str]) -> bool:
        """Whether these are S2's first chunks, template counts and seeds alike."""
        return len(self.tags) == len(self.chunks) and counts == [c for c, _ in self.chunks[:len(counts)]] \
            and tags == list(self.tags[:len(tags)]) and len(counts) == len(tags)

    def masked_templates(self) -> list[np.ndarray]:
        """T~ of every chunk, regenerated from the seeds."""
        return [template_masks(seed, count, self.features, self.template_bits) for count, seed in self.chunks]


#: the most templates one gallery may hold (bounds S2's state and every message)
MAX_TEMPLATES = 1 << 20
MAX_FEATURES = 1 << 16


def chunk_tag(seed_ciphertext: int) -> str:
    """A chunk's name at both clouds: a hash of its E(sigma) (random, so an enrolment that replaced a chunk
    has another tag even with as many templates)."""
    return hashlib.sha256(str(int(seed_ciphertext)).encode()).hexdigest()[:16]


def s2_setup_gallery(cloud: "KeyCloud", msg: Message) -> Message:
    gallery_id, first = msg.get("gallery_id", str), msg.get("first", int)
    features, template_bits, counts = msg.get("features", int), msg.get("template_bits", int), msg.get("counts", list)
    if not (0 < len(gallery_id) <= 64 and 1 <= features <= MAX_FEATURES and 1 <= template_bits <= MAX_TEMPLATE_BITS
            and counts and all(type(c) is int and c >= 1 for c in counts) and sum(counts) <= MAX_TEMPLATES):
        raise ProtocolError("gallery set-up out of range")
    pk = cloud.keys.public
    encrypted = read_ciphertexts(pk, msg, "seeds", (len(counts),))
    seeds = encrypted.decrypt(cloud.keys.private)
    chunks = []
    for count, seed in zip(counts, seeds):
        if not 0 <= int(seed) < 1 << (8 * SEED_BYTES):
            raise ProtocolError("a gallery seed is not 128 bits")
        chunks.append((count, int(seed).to_bytes(SEED_BYTES, "big")))
    old = cloud.galleries.get(gallery_id)
    kept = old.chunks[:first] if old else ()  # a set-up S1 repeats (it crashed before publishing) replaces its tail
    if first != len(kept) or (old and (old.features, old.template_bits) != (features, template_bits)):
        raise ProtocolError(f"gallery {gallery_id!r}: chunks from {first} do not continue what S2 holds")
    if sum(c for c, _ in kept) + sum(counts) > MAX_TEMPLATES:
        raise ProtocolError(f"a gallery holds at most {MAX_TEMPLATES} templates")
    tags = (old.tags[:first] if old else ()) + tuple(chunk_tag(c) for c in encrypted.data)
    gallery = S2Gallery(features, template_bits, kept + tuple(chunks), tags)
    cloud.galleries[gallery_id] = gallery
    if cloud.on_gallery is not None:
        cloud.on_gallery(gallery_id, gallery)
    return Message(meta={"gallery_id": gallery_id, "chunks": first + len(chunks)})


def drop_gallery(ctx: S1Context, gallery_id: str) -> bool:
    """One round: S2 forgets the gallery's seeds (and the file it keeps them in); whether it held them."""
    return ctx.channel.request(DROP_STEP, Message(meta={"gallery_id": gallery_id})).get("dropped", bool)


def s2_drop_gallery(cloud: "KeyCloud", msg: Message) -> Message:
    gallery_id = msg.get("gallery_id", str)
    dropped = cloud.galleries.pop(gallery_id, None) is not None
    if dropped and cloud.on_gallery is not None:
        cloud.on_gallery(gallery_id, None)
    return Message(meta={"gallery_id": gallery_id[:64], "dropped": dropped})


def s2_gallery(cloud: "KeyCloud", gallery_id: str) -> S2Gallery:
    try:
        return cloud.galleries[gallery_id]
    except KeyError:
        raise UnknownGallery(f"unknown gallery {gallery_id[:64]!r}: run its set-up first") from None


#: widest Straus window of the offline product: its tables (2^w per feature, 64 MiB at w = 7, F = 1,024
#: and 2048-bit keys) are shared by the templates of a chunk
MAX_OFFLINE_WINDOW = 7


# -- offline: the query masks, k_q future queries at a time -------------------------------------------
#: how long S2 keeps a prepared query's mask A: S1 keeps a batch ready in the background, for as long
#: as no query comes (S2's other tickets live 600 s)
PREPARED_SECONDS = 7 * 24 * 3600.0
#: the masks S2 keeps at most for prepared queries, in features (F integers per query: 1,024 queries of
#: 1,024 features, ~60 MB); beyond, the oldest go, and a query that meets a dropped one prepares again
MAX_PREPARED_FEATURES = 1 << 20
#: the same for batches between their two rounds (S1's products take minutes at the seed's scale)
PREPARING_SECONDS = 3600.0
MAX_PREPARING_FEATURES = 1 << 20


@dataclass
class PreparedIdentify:
    """One future query's offline part: S2's ticket for its mask A and, per group of ``groups``,
    E(-A . T) packed as the similarities are."""

    ticket: str
    correction: EncryptedTensor
    groups: tuple[int, ...]
    used: bool = False


def prepare_identify(ctx: S1Context, gallery: EncryptedGallery) -> list[PreparedIdentify]:
    """Offline, two rounds: k_q future queries (:func:`batch_size`), each ready for every group of the
    gallery as it is now (for an identify or a verify: a preparation for one group would tell S2 which
    identity a verify claims).

    1. (step ``identify_prepare``) S2 draws the masks A_q of k_q queries and sends, per feature,
       E(sum_q A_(q,f) 2^(su q)), slots of su = slot_bits(lu) bits (:func:`cross_bits`).
    2. S1: E(U_i) = prod_f E(packed A_f)^B[i, f], slot q holding A_q . B_i (F multiply-accumulates per
       template by (lt + 2 + kappa)-bit exponents, *once for all k_q queries*).
    3. (step ``identify_masks``) S1 reveals every U_i masked, slot by slot (A_q . B_i + M_(q,i)); S2 forms
       z = A_q . T~_i - (A_q . B_i + M_(q,i)) = A_q . T_i - M_(q,i), keeps each A_q under its own ticket
       and replies, per query and group, E(-z) packed as the similarities; S1 subtracts its M there:
       E(C_(q,g)), slot j = -A_q . T_(g k + j)."""
    pk, kappa = ctx.public_key, ctx.kappa
    lx, lt, features = gallery.embedding_bits, gallery.template_bits, gallery.features
    groups = list(range(gallery.groups))
    members = group_templates(gallery.counts, gallery.group_size, groups)
    queries, lu = batch_size(pk.bits, lx, lt, features, kappa), cross_bits(lx, lt, features, kappa)
    msg = Message(meta={"gallery_id": gallery.gallery_id, "x_bits": lx, "kappa": kappa, "counts": gallery.counts,
                        "tags": [chunk_tag(c.seed.data[0]) for c in gallery.chunks]})
    reply = ctx.channel.request(PREPARE_STEP, msg)
    with ctx.tracer.op("s1_validate"):
        row = read_ciphertexts(pk, reply, "a", (features,)).data.reshape(1, -1)
    # E(U_i), chunk by chunk: one row of bases shared by every template, B > 0
    cross = []
    for chunk in gallery.chunks:
        window = min(range(1, MAX_OFFLINE_WINDOW + 1),  # a table of 2^w per feature against bits/w per template
                     key=lambda w: (1 << w) + chunk.count * -(-(lt + 2 + kappa) // w))
        with ctx.tracer.op("s1_cross"):
            parts = ctx.workers.map(multi_exponentiate, [(row, chunk.masks[r.start:r.stop].T, pk.nsq, window)
                                                         for r in ctx.workers.chunks(chunk.count)])
        cross += [c for part in parts for c in part.reshape(-1)]
    ctx.count("exp_offline", gallery.count * features)
    hidden = np.array(sample_masks(gallery.count * queries, lu, kappa), dtype=object).reshape(gallery.count, queries)
    msg2 = reveal_packs(ctx, "u", cross, hidden, lu)
    msg2.meta["ticket"] = reply.get("ticket", str)
    reply2 = ctx.channel.request(MASKS_STEP, msg2)
    tickets = reply2.get("tickets", list)
    if len(tickets) != queries or not all(type(t) is str for t in tickets):
        raise ProtocolError(f"S2 sent {len(tickets)} tickets for a batch of {queries} queries")
    with ctx.tracer.op("s1_validate"):
        neg_z = read_ciphertexts(pk, reply2, "neg_z", (queries, len(groups)))
    slot = slot_bits(gallery.similarity_bits, kappa)
    prepared = []
    with ctx.tracer.op("s1_combine"):
        for q in range(queries):
            minus_m = [_residue(-sum(int(hidden[t, q]) << (slot * j) for j, t in enumerate(m)), int(pk.n))
                       for m in members]  # the masks overflow these slots too: only the sum mod N matters
            prepared.append(PreparedIdentify(tickets[q], EncryptedTensor(pk, neg_z.data[q]).add(minus_m),
                                             tuple(groups)))
    return prepared


def _residue(v: int, n: int) -> int:
    """v mod N in the signed range: the packs of A . T~ overflow their slots, which only the final
    similarities must fit (every identity holds mod N)."""
    v %= n
    return v - n if v > n // 2 else v


def _bounds(cloud: "KeyCloud", msg: Message) -> tuple[int, int]:
    lx, kappa = msg.get("x_bits", int), msg.get("kappa", int)
    if not 1 <= lx <= 64 or kappa < KAPPA:
        raise ProtocolError(f"embedding bound of {lx} bits (kappa {kappa}) out of range")
    return lx, kappa


def s2_prepare(cloud: "KeyCloud", msg: Message) -> Message:
    gallery = s2_gallery(cloud, msg.get("gallery_id", str))
    lx, kappa = _bounds(cloud, msg)
    counts, tags = msg.get("counts", list), msg.get("tags", list)
    if not counts or len(counts) > MAX_TEMPLATES or not all(type(c) is int for c in counts):
        raise ProtocolError("counts must list the template count of every chunk searched")
    if not gallery.holds(counts, tags):  # S2 lost an append, or holds chunks S1 replaced (a restored backup)
        raise UnknownGallery(f"S2 holds other chunks of this gallery than the {len(counts)} S1 searches")
    queries = batch_size(cloud.keys.public.bits, lx, gallery.template_bits, gallery.features, kappa)
    su = slot_bits(cross_bits(lx, gallery.template_bits, gallery.features, kappa), kappa)
    masks = [sample_masks(gallery.features, lx, kappa) for _ in range(queries)]
    packed = [sum(masks[q][f] << (su * q) for q in range(queries)) for f in range(gallery.features)]
    ticket = cloud.preparing.put("identify_batch", (masks, lx, kappa, msg.get("gallery_id", str), counts, tags),
                                 weight=queries * gallery.features)
    return encrypted_reply(cloud, {"a": packed}, {"ticket": ticket})


def s2_masks(cloud: "KeyCloud", msg: Message) -> Message:
    masks, lx, kappa, gallery_id, counts, tags = _pop_prepared(cloud, msg, "identify_batch")
    gallery = s2_gallery(cloud, gallery_id)
    chunks = len(counts)
    if not gallery.holds(counts, tags):  # replaced meanwhile
        raise UnknownGallery("the gallery's chunks changed at S2 since this preparation began")
    ly = similarity_bits(lx, gallery.template_bits, gallery.features)
    k = slots_per_pack(cloud.keys.public.bits, slot_bits(ly, kappa))
    members = group_templates(counts, k, range(sum(-(-c // k) for c in counts)))
    values, l = read_revealed(cloud, msg, "u")
    if l != cross_bits(lx, gallery.template_bits, gallery.features, kappa) or len(values) != sum(counts) * len(masks):
        raise ProtocolError(f"{len(values)} masked products of {l} bits for {sum(counts)} templates")
    n, slot = int(cloud.keys.public.n), slot_bits(ly, kappa)
    neg_z: list[int] = []
    with cloud.tracer.op("s2_plain"):
        at = np.concatenate(cloud.workers.map(_masked_products, [(seed, count, gallery.features, gallery.template_bits,
                                                                   masks) for count, seed in gallery.chunks[:chunks]]))
        z = at - np.array(values, dtype=object).reshape(sum(counts), len(masks))  # A . T - M
        for q in range(len(masks)):
            neg_z += [_residue(-sum(int(z[t, q]) << (slot * j) for j, t in enumerate(m)), n) for m in members]
    tickets = [cloud.prepared.put("identify", (mask, lx, kappa, gallery_id), weight=len(mask)) for mask in masks]
    return encrypted_reply(cloud, {"neg_z": neg_z}, {"tickets": tickets}, shapes={"neg_z": (len(masks), len(members))})


def _masked_products(seed: bytes, count: int, features: int, template_bits: int, masks: list[list[int]]) -> np.ndarray:
    """S2, one chunk (on its workers, off the request thread): A_q . T~_i for its templates, (count, queries)."""
    tilde = template_masks(seed, count, features, template_bits).astype(object)
    return tilde.dot(np.array(masks, dtype=object).T)


def _pop_prepared(cloud: "KeyCloud", msg: Message, kind: str) -> Any:
    """What S2 keeps for a query being prepared or prepared; :class:`UnknownPrepared` if it lost it (a
    restart, or the oldest were dropped): S1 prepares again."""
    store = cloud.preparing if kind == "identify_batch" else cloud.prepared
    try:
        return store.pop(msg.get("ticket", str), kind)
    except ProtocolError as e:
        raise UnknownPrepared(f"{e}: S2 restarted or dropped it since") from e


# -- online -------------------------------------------------------------------------------------------
def best_window(exponent_bits: int, bases: int) -> int:
    """The bucket width c with the fewest multiplications (exponent_bits / c) (bases + 2^(c+1))."""
    return min(range(1, 13), key=lambda c: -(-exponent_bits // c) * (bases + (2 << c)))


def shared_exponent_products(bases: np.ndarray, exponents: Sequence[int], nsq: mpz, window: int) -> list[mpz]:
    """prod_f bases[f, g]^exponents[f] mod nsq for every column g (non-negative exponents).

    Every column uses the same exponents, so the buckets (which bases carry which digit in which
    window) are sorted once; per column and window each base costs one multiplication into its
    bucket, and the buckets are combined by running products (2^(window+1) multiplications)."""
    bits = max((int(e).bit_length() for e in exponents), default=0)
    windows = -(-bits // window) if bits else 0
    mask = (1 << window) - 1
    digits = [[(int(e) >> (w * window)) & mask for e in exponents] for w in range(windows)]
    buckets_of = [[[f for f, d in enumerate(ds) if d == digit] for digit in range(1 << window)] for ds in digits]
    out = []
    for g in range(bases.shape[1]):
        column = bases[:, g]
        acc = mpz(1)
        for w in range(windows - 1, -1, -1):
            for _ in range(window if w != windows - 1 else 0):
                acc = acc * acc % nsq
            running, total = mpz(1), mpz(1)
            for digit in range(mask, 0, -1):
                for f in buckets_of[w][digit]:
                    running = running * column[f] % nsq
                if running != 1:
                    total = total * running % nsq
            acc = acc * total % nsq
        out.append(acc)
    return out


def similarity_leaves(ctx: S1Context, gallery: EncryptedGallery, x: EncryptedTensor, prepared: PreparedIdentify,
                  groups: list[int]) -> tuple[EncryptedTensor, list[int]]:
    """Steps 1-3: E(c_i) = E(y_i 2^m + code_i) for the templates of ``groups``, and their indices."""
    pk, lx, k = ctx.public_key, gallery.embedding_bits, gallery.group_size
    if x.shape != (gallery.features,):
        raise ShapeError(f"an embedding of shape {x.shape} for a gallery of {gallery.features} features")
    pk.require_same(x.public_key, "embedding")
    if prepared.used:
        raise ProtocolError("a prepared identification was offered twice: its mask would be reused")
    position = {g: r for r, g in enumerate(prepared.groups)}
    if not all(g in position for g in groups):
        raise ProtocolError("the prepared query does not cover these templates (it was prepared before an append)")
    prepared.used = True
    # round 1: x + R to S2, x + R + A back
    masks = sample_masks(x.size, lx, ctx.kappa)
    msg = reveal_message(ctx, "x", x, lx, masks)
    msg.meta.update({"ticket": prepared.ticket, "gallery_id": gallery.gallery_id})
    reply = ctx.channel.request(STEP, msg)
    shifted = reply.array("x_mask").reshape(-1)
    if shifted.size != x.size:
        raise ProtocolError(f"{shifted.size} masked features for {x.size}")
    exponents = [int(v) - m for v, m in zip(shifted, masks)]
    if not all(0 < e < 1 << (lx + 2 + ctx.kappa) for e in exponents):
        raise ProtocolError("S2's masked embedding is out of range")
    # S1: E(Y_g) per group, one bucket multi-exponentiation each
    packs = np.concatenate([c.packs.data for c in gallery.chunks], axis=1)[:, groups]
    window = best_window(lx + 2 + ctx.kappa, gallery.features)
    with ctx.tracer.op("s1_cross"):
        parts = ctx.workers.map(shared_exponent_products, [(packs[:, r.start:r.stop], exponents, pk.nsq, window)
                                                           for r in ctx.workers.chunks(len(groups))])
    ctx.count("exp_online", gallery.features * len(groups))
    with ctx.tracer.op("s1_combine"):
        y = EncryptedTensor(pk, object_array([c for part in parts for c in part], len(groups)))
        y = y.add(EncryptedTensor(pk, prepared.correction.data[[position[g] for g in groups]]))
    # round 2: y + M to S2, E((y + M) 2^m) back
    ly, m = gallery.similarity_bits, code_bits(gallery.count)
    y_masks = np.array(sample_masks(len(groups) * k, ly, ctx.kappa), dtype=object).reshape(len(groups), k)
    msg2 = reveal_packs(ctx, "y", list(y.data), y_masks, ly)
    msg2.meta["shift"] = m
    reply2 = ctx.channel.request(UNPACK_STEP, msg2)
    with ctx.tracer.op("s1_validate"):
        shifted_y = read_ciphertexts(pk, reply2, "c", (len(groups) * k,))
    # template index of every slot (-1: an empty slot of a chunk's last group)
    index = [m[j] if j < len(m) else -1 for m in group_templates(gallery.counts, k, groups) for j in range(k)]
    keep = [i for i, t in enumerate(index) if t >= 0]
    codes = np.array([(1 << m) - 2 - index[i] - (int(y_masks.reshape(-1)[i]) << m) for i in keep], dtype=object)
    with ctx.tracer.op("s1_combine"):
        leaves = EncryptedTensor(pk, shifted_y.data[keep]).add(codes)
    return leaves, [index[i] for i in keep]


def s2_identify(cloud: "KeyCloud", msg: Message) -> Message:
    masks, lx, kappa, gallery_id = _pop_prepared(cloud, msg, "identify")
    if gallery_id != msg.get("gallery_id", str):
        raise ProtocolError("this prepared query belongs to another gallery")
    values, l = read_revealed(cloud, msg, "x")
    if l != lx or len(values) != len(masks):
        raise ProtocolError(f"an embedding of {len(values)} values of {l} bits for a mask of {len(masks)} of {lx}")
    reply = Message()
    reply.arrays["x_mask"] = np.array([v + a for v, a in zip(values, masks)], dtype=object)
    return reply


def s2_unpack(cloud: "KeyCloud", msg: Message) -> Message:
    values, _ = read_revealed(cloud, msg, "y")
    m = msg.get("shift", int)
    if not 1 <= m <= 32:
        raise ProtocolError(f"an index shift of {m} bits is out of range")
    return encrypted_reply(cloud, {"c": [v << m for v in values]})


def _tournament(ctx: S1Context, leaves: list[EncryptedTensor], bits: int) -> EncryptedTensor:
    """The maximum of the leaves: one batched secure_max per level, an odd leaf passing through."""
    pk = ctx.public_key
    while len(leaves) > 1:
        half = len(leaves) // 2
        firsts = EncryptedTensor(pk, object_array([t.data[0] for t in leaves[0:2 * half:2]], half))
        seconds = EncryptedTensor(pk, object_array([t.data[0] for t in leaves[1:2 * half:2]], half))
        best = secure_max(ctx, firsts, seconds, bits)
        leaves = [best[i:i + 1] for i in range(half)] + leaves[2 * half:]
    return leaves[0]


def argmax_for_user(ctx: S1Context, gallery: EncryptedGallery, leaves: EncryptedTensor, user_key: PublicKey
                    ) -> EncryptedTensor:
    """Steps 4-5: the tournament over the leaves and "no match", the winner masked to the user."""
    ly, m = gallery.similarity_bits, code_bits(gallery.count)
    with ctx.tracer.op("s1_combine"):
        no_match = gallery.threshold.mul_plain([1 << m]).add([-1])
    items = [leaves[i:i + 1] for i in range(leaves.size)] + [no_match]
    winner = _tournament(ctx, items, ly + m)
    hidden = sample_masks(1, ly, ctx.kappa)[0] << m
    with ctx.tracer.op("s1_combine"):
        winner = winner.add([hidden])
    return reencrypt_for_user(ctx, winner, ly + m + 2 + ctx.kappa, user_key)


def secure_identify(ctx: S1Context, gallery: EncryptedGallery, embedding: EncryptedTensor,
                    prepared: PreparedIdentify, user_key: PublicKey) -> EncryptedTensor:
    """E_u(w): the user reads the best template's index, or "no match", with :func:`read_answer`."""
    if gallery.count < 1:
        raise ShapeError("the gallery holds no template")
    leaves, _ = similarity_leaves(ctx, gallery, embedding, prepared, list(range(gallery.groups)))
    return argmax_for_user(ctx, gallery, leaves, user_key)


def secure_verify(ctx: S1Context, gallery: EncryptedGallery, embedding: EncryptedTensor, claimed: int,
                  prepared: PreparedIdentify, user_key: PublicKey) -> EncryptedTensor:
    """E_u(w) for a claimed index: :func:`read_answer` gives the index (match) or None."""
    leaves, index = similarity_leaves(ctx, gallery, embedding, prepared, [gallery.group_of(claimed)])
    return argmax_for_user(ctx, gallery, leaves[index.index(claimed):index.index(claimed) + 1], user_key)


def read_answer(value: int, count: int) -> int | None:
    """The user: the template index in a decrypted answer, or None for "no match"."""
    m = code_bits(count)
    code = int(value) % (1 << m)
    if code == (1 << m) - 1:
        return None
    index = (1 << m) - 2 - code
    if not 0 <= index < count:
        raise ProtocolError(f"the answer's code {code} names no template of {count}")
    return index


# -- the owner's labels file ----------------------------------------------------------------------------
#: the owner's local labels file: {"gallery_id", "template_bits", "template_shift", "labels": {index: label}}
LABELS_LIMITS = JSONLimits(max_bytes=64 << 20, max_items=MAX_TEMPLATES + 16, max_depth=3)


def read_labels_file(path: str | Path) -> dict[str, Any]:
    """The owner's labels file, bounded before it is parsed and checked (:class:`BadRequest`)."""
    book = read_json_file(Path(path), LABELS_LIMITS, f"labels file {path}")
    if not isinstance(book, dict) or not isinstance(book.get("labels"), dict) \
            or type(book.get("template_shift")) is not int or not 0 <= book["template_shift"] <= 64 \
            or type(book.get("template_bits")) is not int or not 1 <= book["template_bits"] <= 64:
        raise BadRequest(f"{path} is not a gallery labels file (he-cnn owner enrol writes one)")
    return book


# -- the plaintext reference ----------------------------------------------------------------------------
def identify_reference(templates: np.ndarray, embedding: Sequence[int], threshold: int) -> int | None:
    """The index of the largest x . T_i (the smallest index among equals) if it reaches the threshold."""
    sims = [int(v) for v in np.asarray(templates, dtype=object).dot(np.asarray(embedding, dtype=object))]
    best = max(range(len(sims)), key=lambda i: (sims[i], -i))
    return best if sims[best] >= threshold else None


def verify_reference(templates: np.ndarray, embedding: Sequence[int], threshold: int, claimed: int) -> bool:
    return int(np.asarray(templates[claimed], dtype=object).dot(np.asarray(embedding, dtype=object))) >= threshold


S2_HANDLERS = {SETUP_STEP: s2_setup_gallery, DROP_STEP: s2_drop_gallery, PREPARE_STEP: s2_prepare,
               MASKS_STEP: s2_masks, STEP: s2_identify, UNPACK_STEP: s2_unpack}
