"""Secure comparison, and on it SACT (ReLU) and SMAP (max-pooling).

``secure_sign`` turns E(x), |x| < 2^l, into E(t) with t = [x >= 0], or into E(x * t) (the patent's
SACT = SMP(E(x), E(t)), folded into the comparison's last reply). How the two clouds get the carry of
step 4 below is ``S1Context.comparison``: "ot" (the default; :mod:`he_cnn.protocols.millionaire`,
a circuit on oblivious transfer: 1 + ceil(ceil(log2 k) / 2) requests for k compared bits, no
public-key work per bit) or "dgk" (DGK/Veugen, steps 2-4 as below: two requests). "Rounds" below are
the DGK ones; with OT each call takes ``millionaire.requests_needed(k)``.

With DGK:
Steps (z = x + 2^l in [0, 2^(l+1)), so t = floor(z / 2^l)):
  1. S1 reveals d = z + r (r uniform in [0, 2^(l+1+kappa)), packed)            -- step ``compare_bits``
  2. S2 decrypts d, keeps it under a ticket, and returns DGK encryptions of the l+1 bits of
     beta' = 2 (d mod 2^l) + 1, most significant first.
  3. S1, knowing rho' = 2 (r mod 2^l) (lowest bit 0, so beta' != rho' always), picks a secret sign
     s in {+1, -1} per element. A zero can only come from the first bit where beta' and rho' differ,
     and only at a *candidate* position j: rho'_j = 1 for s = +1, rho'_j = 0 for s = -1. There S1 forms
        c_j = s + beta'_j - rho'_j + 2 * sum_{k more significant than j} (beta'_k xor rho'_k)
     (s + beta'_j - rho'_j is beta'_j or beta'_j - 1 there, so c_j = 0 iff that is 0 and the sum is 0),
     blinds it by a random exponent in [1, u-1] and a fresh DGK randomizer; every other position is
     sent as a fresh encryption of a uniform non-zero value (the distribution a blinded non-zero c_j
     has), without the computation -- padded so that S1's work does not depend on s: ~40 % fewer
     exponentiations. S1 shuffles the positions of each element and sends them   -- step ``compare_zero``
  4. S2 tests every c_j for zero. delta = [some c_j = 0] equals [beta' < rho'] if s = +1 and
     [beta' > rho'] if s = -1. With alpha = floor(d / 2^l), S2 knows e = (alpha mod 2) xor delta and
     returns fresh E(-e) and, for the product, E(e d).
  5. S1: the carry [d mod 2^l < r mod 2^l] is delta (s = +1) or 1 - delta (s = -1), and
        t = alpha - floor(r / 2^l) - carry,  a bit, so  t = e xor f  with  f = (floor(r / 2^l) mod 2) xor [s = -1],
     which S1 knows and S2 does not (s is uniform). Then t = e or 1 - e, and with M = 2^l + r (d = x + M)
        x t = e d - e M  (f = 0)   or   x - e d + e M  (f = 1):
     one exponentiation E(-e)^M, and for f = 1 one inversion (batched over the chunk).
  Truncation (compare only the low k < l bits): steps 2-4 run on d mod 2^k, S2 returns E(alpha - delta)
  and E(delta) with alpha = floor(d / 2^k), and S1 forms t = floor(z / 2^k) = alpha - floor(r / 2^k) - carry
  without an exponentiation.

Cost per element: S2 one decryption per pack, l+1 DGK encryptions, l+1 zero tests (an exponentiation
by the t-bit v_p mod p, every position tested so timing does not depend on the outcome), 1 or 2
Paillier encryptions; S1 ~l+kappa squarings (packing), per bit a few multiplications and a DGK
randomizer, for max(p, l + 1 - p) of the l + 1 bits (p = popcount(rho'), ~60 %) an exponentiation by
a blinding exponent below u, and for about half the bits a share of one batched inversion; then, for
the product, one exponentiation by the (l+kappa+2)-bit M.
Two rounds for a whole tensor (DGK).
S1 learns: nothing (Paillier and DGK ciphertexts only).
S2 learns: d, statistically independent of x (distance 2^-kappa); whether one blinded c_j is zero,
which is the bit delta XORed with S1's secret uniform sign, i.e. a uniform bit (and so is e); the
nonzero c_j are uniform in Z_u^* and the positions shuffled.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import gmpy2
import numpy as np
from gmpy2 import mpz

from he_cnn.crypto.dgk import DGKPublicKey
from he_cnn.errors import BoundExceeded, ProtocolError, ShapeError
from he_cnn.geometry import Size, conv_output_hw, max_runs, pair, window_ranges
from he_cnn.crypto.paillier import batch_invert, random_ints
from he_cnn.parallel import from_blob, powmod_seconds, to_blob
from he_cnn.crypto.tensor import EncryptedTensor, object_array
from he_cnn.wire import Message
from he_cnn.protocols import millionaire
from he_cnn.protocols.common import (COMPARISONS, S1Context, S2WorkerKey, encrypted_reply, masked_reveal,
                                     read_ciphertexts, read_revealed)

if TYPE_CHECKING:
    from he_cnn.parties.key_cloud import KeyCloud

BITS_STEP = "compare_bits"
ZERO_STEP = "compare_zero"


def secure_sign(ctx: S1Context, x: EncryptedTensor, bits: int, product: bool, low: int | None = None
                ) -> EncryptedTensor:
    """E([x >= 0]), or with ``product`` E(x * [x >= 0]), element-wise, for -2^bits <= x < 2^bits.

    With ``low`` = k < bits the same two rounds compare only the low k bits and give
    E(floor((x + 2^bits) / 2^k)) instead of E([x >= 0]) (:func:`secure_truncate`; no product).
    """
    l = bits
    k = l if low is None else low
    if not 0 <= k <= l or (product and k != l):
        raise ProtocolError(f"cannot split {l}-bit values at bit {k}{' with the product' if product else ''}")
    if ctx.comparison not in COMPARISONS:
        raise ProtocolError(f"unknown comparison protocol {ctx.comparison!r}; expected one of {COMPARISONS}")
    if ctx.comparison == "ot" and k > millionaire.MAX_BITS:
        raise BoundExceeded(f"comparison of {k}-bit values exceeds the OT comparison's limit of {millionaire.MAX_BITS} bits")
    if ctx.comparison == "dgk" and k + 1 > ctx.dgk_key.max_bits:
        raise BoundExceeded(f"comparison of {k}-bit values exceeds the DGK key's limit of {ctx.dgk_key.max_bits} bits")
    shape = x.shape
    xf = x.flatten()
    n = xf.size
    msg, masks = masked_reveal(ctx, "d", xf, l)
    msg.meta["low"] = k
    sums = None
    if ctx.comparison == "ot":
        reply2, signs, sums = _ot_carry(ctx, msg, masks, l, k, product)
    else:
        reply2, signs = _dgk_carry(ctx, msg, masks, n, l, k, product)

    pk = ctx.public_key
    with ctx.tracer.op("s1_validate"):
        fields = ["e_x"] if sums is not None else reply_fields(l, k, product)
        columns = [read_ciphertexts(pk, reply2, f, (n,)).data for f in fields]
    if product:
        columns.append(xf.data)
    per_element = len(columns) * powmod_seconds(2 * pk.bits, l + ctx.kappa)  # an exponentiation per column
    if sums is not None:  # the product's e M came by OT: no exponentiation (millionaire.product_answer)
        calls = [(pk.n, pk.nsq, l, [list(c[r.start:r.stop]) for c in columns], masks[r.start:r.stop],
                  signs[r.start:r.stop], sums[r.start:r.stop]) for r in ctx.workers.chunks(n, 8, per_element)]
        results = [c for part in ctx.workers.map(_finish_product_chunk, calls) for c in part]
    else:
        calls = [(pk.n, pk.nsq, l, k, [list(c[r.start:r.stop]) for c in columns], masks[r.start:r.stop],
                  signs[r.start:r.stop]) for r in ctx.workers.chunks(n, 8, per_element)]
        results = [c for part in ctx.workers.map(_finish_chunk, calls) for c in part]
        if product:
            ctx.count("exp_short", n)
    return EncryptedTensor(pk, object_array(results, n)).reshape(shape)


def _dgk_carry(ctx: S1Context, msg: Message, masks: list[int], n: int, l: int, k: int, product: bool
               ) -> tuple[Message, list[int]]:
    """Steps 2-4 with DGK: S2's final reply, and S1's secret signs (s = -1 where S2's delta is 1 - carry)."""
    reply = ctx.channel.request(BITS_STEP, msg)
    ticket = reply.get("ticket", str)
    if reply.shape("bits") != (n, k + 1):
        raise ProtocolError(f"expected {n} x {k + 1} DGK bit ciphertexts, got shape {reply.shape('bits')}")

    dgk = ctx.dgk_key
    if reply.widths.get("bits") != dgk.ciphertext_bytes:
        raise ProtocolError(f"S2 sent DGK ciphertexts of {reply.widths.get('bits')} bytes, "
                            f"expected {dgk.ciphertext_bytes}")
    signs = [1 if b else -1 for b in random_ints(n, 1)]
    r_low = [(m - (1 << l)) & ((1 << k) - 1) for m in masks]
    randomizers = dgk.randomizer_blob(n * (k + 1))
    width, bits_blob, row = dgk.ciphertext_bytes, reply.payload("bits"), (k + 1) * dgk.ciphertext_bytes
    calls = [(dgk.to_dict(), bits_blob[r.start * row:r.stop * row], r_low[r.start:r.stop],
              signs[r.start:r.stop], randomizers[r.start * row:r.stop * row])
             for r in ctx.workers.chunks(n, 8, (k + 1) * powmod_seconds(int(dgk.n).bit_length(), 16))]
    with ctx.tracer.op("s1_blind"):
        blinded = b"".join(ctx.workers.map(_blind_chunk, calls))  # rows in order; the workers range-check the bits
    ctx.count("dgk_bit", n * (k + 1))
    msg2 = Message(meta={"ticket": ticket, "product": product})
    msg2.set_blob("blinded", blinded, width, (n, k + 1))
    return ctx.channel.request(ZERO_STEP, msg2), signs


def _ot_carry(ctx: S1Context, msg: Message, masks: list[int], l: int, k: int, product: bool
              ) -> tuple[Message, list[int], list[int] | None]:
    """Steps 2-4 on oblivious transfer (:mod:`~he_cnn.protocols.millionaire`): S2's final reply, S1's
    XOR share of the carry as the signs of :func:`_finish_chunk` (s = -1 where the share is 1: S2's
    delta is then 1 - carry, as with DGK), and for a product (masks up to 79 bits) the sums
    Q = R + e M of the product OTs (then S2's reply is E(e d + R): :func:`_finish_product_chunk`)."""
    msg.meta["product"] = product
    low = (1 << k) - 1
    width = millionaire.product_width(l, ctx.kappa) if product else None
    m_bits = millionaire.lsb_bits(masks, width) if width else None
    reply, state, own = millionaire.s1_start(ctx, msg, [m & low for m in masks], k, m_bits)  # M mod 2^k = r mod 2^k
    final, share = millionaire.s1_finish(ctx, reply, state)
    ctx.count("ot_bit", len(masks) * k)
    sums = None
    if own is not None:
        with ctx.tracer.op("s1_ot"):
            n = len(masks)
            data = final.payload("ot_p")
            if len(data) != 2 * n * width * 16:
                raise ProtocolError(f"product answers of {len(data)} bytes: expected {2 * n * width * 16}")
            answers = np.frombuffer(data, dtype=np.uint8).reshape(2, n, width, 16)
            sums = millionaire.product_sums(answers, own.m_bits, own.pads)
    return final, [-1 if v else 1 for v in share.tolist()], sums


def _finish_product_chunk(n: mpz, nsq: mpz, l: int, columns: list[list[mpz]], masks: list[int], signs: list[int],
                          sums: list[int]) -> list[mpz]:
    """S1's step 5 for a product whose e M came by OT: E(e x) = E(e d + R) E(-Q) with Q = R + e M
    (one plaintext multiplication), then x t = e x (f = 0) or x - e x (f = 1, one batched inversion)."""
    e_x, x = columns
    w = [c * ((1 + (-q) % n * n) % nsq) % nsq for c, q in zip(e_x, sums)]
    return _select_product(nsq, w, x, _flips(l, masks, signs))


def _flips(l: int, masks: list[int], signs: list[int]) -> list[int]:
    """S1's bit f per element, t = e xor f: (floor(r / 2^l) mod 2) xor [s = -1], with M = 2^l + r."""
    return [((m >> l) - 1) & 1 ^ (s == -1) for m, s in zip(masks, signs)]


def _select_product(nsq: mpz, ex: list[mpz], x: list[mpz], flips: list[int]) -> list[mpz]:
    """E(x t) from E(e x): itself where f = 0 (t = e), E(x) E(e x)^-1 where f = 1 (one batched inversion)."""
    inverted = iter(batch_invert([c for c, f in zip(ex, flips) if f], nsq))
    return [xi * next(inverted) % nsq if f else c for c, xi, f in zip(ex, x, flips)]


def reply_fields(l: int, k: int, product: bool) -> list[str]:
    """The Paillier fields S2's ``compare_zero`` reply carries (see the module docstring, step 4)."""
    if k < l:
        return ["alpha_minus_delta", "delta"]
    return ["neg_e", "e_d"] if product else ["neg_e"]


def _finish_chunk(n: mpz, nsq: mpz, l: int, k: int, columns: list[list[mpz]], masks: list[int],
                  signs: list[int]) -> list[mpz]:
    """S1's step 5 for a chunk of elements (columns as :func:`reply_fields`, then E(x) for the product).

    k < l:  t = alpha - R - carry with R = floor(r / 2^k), carry = delta (s = +1) or 1 - delta (s = -1):
            E(alpha - delta) E(-R), or E(alpha - delta) E(delta)^2 E(-R - 1); no inversion.
    k = l:  t = e xor f with f = (R mod 2) xor [s = -1] (S1's, uniform); so t = e (f = 0) or 1 - e, and
            x t = e d - e M  (f = 0)  or  x - e d + e M  (f = 1)
            from E(-e), E(e d): one exponentiation by M and, for f = 1, one inversion (batched).
    """
    plain = lambda v: (1 + v % n * n) % nsq  # E(v) with no randomness, as a factor
    if k < l:
        out = []
        for a_d, delta, m, s in zip(columns[0], columns[1], masks, signs):
            r_high = (m >> k) - (1 << (l - k))
            if s == 1:
                out.append(a_d * plain(-r_high) % nsq)
            else:
                out.append(a_d * delta % nsq * delta % nsq * plain(-r_high - 1) % nsq)
        return out
    flips = _flips(l, masks, signs)
    if len(columns) == 1:  # t alone: E(e) = E(-e)^-1 or E(1 - e) = E(1) E(-e)
        neg_e = columns[0]
        inverted = iter(batch_invert([c for c, f in zip(neg_e, flips) if not f], nsq))
        return [c * (1 + n) % nsq if f else next(inverted) for c, f in zip(neg_e, flips)]
    neg_e, e_d, x = columns
    w = [ed * gmpy2.powmod(ne, m, nsq) % nsq for ne, ed, m in zip(neg_e, e_d, masks)]  # E(e d - e M)
    return _select_product(nsq, w, x, flips)


def blind_bit_comparisons(dgk: DGKPublicKey, enc_bits: np.ndarray, r_low: list[int], signs: list[int],
                          randomizers: list[mpz]) -> list[mpz]:
    """S1's step 3 for n elements: the blinded, shuffled c_j of every element, row after row.

    ``enc_bits`` (n, l+1) are S2's DGK bits of beta' (most significant first); ``r_low`` S1's
    r mod 2^l; ``randomizers`` n (l+1) fresh DGK randomizers. The bits where rho' is 1 enter as
    [1 - beta'_j] = [1] [beta'_j]^-1, inverted all at once (:func:`~he_cnn.crypto.paillier.batch_invert`).

    Only the candidate positions, where the first difference makes the comparison's zero, need
    computing and blinding: rho'_j = 1 for s = +1 (there c_j = 0 needs beta'_j = 0), rho'_j = 0 for
    s = -1 (beta'_j = 1). There s + beta'_j - rho'_j is in {-1, 0, 1}, so a weight of 2 on the prefix
    sum keeps every c_j with a differing bit above it non-zero (the square of the running product, one
    multiplication less than the textbook weight 3, which the other positions would need). Elsewhere S1
    sends what a blinded non-zero value looks like: g^m h^r with m uniform in [1, u-1], one
    multiplication instead of an exponentiation. S2's view is the same distribution either way
    (uniform non-zero values, fresh randomness, positions shuffled), and S2 cannot tell which positions
    were computed.

    S1's running time must not tell S2 the secret sign s, though: with p = popcount(rho'), s = +1 needs
    p exponentiations and s = -1 needs l + 1 - p. So every element does max(p, l + 1 - p) of them,
    the missing ones at positions that cannot be zero (the same work, on g^m, same result as the
    table). The work then depends on p alone, as the batched inversions already do; the threat model
    (section 10) names that dependence.
    """
    n, width = enc_bits.shape
    l = width - 1
    nd, u, g = dgk.n, dgk.u, dgk.g
    rho = [[((r << 1) >> (l - j)) & 1 for j in range(width)] for r in r_low]  # rho' = 2 (r mod 2^l)
    try:
        inverted = iter(batch_invert([enc_bits[i, j] for i in range(n) for j in range(width - 1) if rho[i][j]], nd))
    except ZeroDivisionError:
        raise ProtocolError("S2 sent a DGK ciphertext that is not a unit") from None
    # g^(m + u) for m < u: constants, and the plaintexts of the positions that cannot be zero. The extra g^u
    # lies in h's subgroup (g has order u v_p v_q): it leaves the zero test and, under the fresh randomizer,
    # S2's view as they are, and keeps every table entry a full-size number: a factor of 1 would make a
    # multiplication 10x cheaper, and how often S1 met one would depend on its secret signs
    g_table = [gmpy2.powmod(g, u, nd)]
    for _ in range(1, u):
        g_table.append(g_table[-1] * g % nd)
    exponents = random_ints(n * width, 64)  # blinding exponents (or non-zero plaintexts) in [1, u-1]; bias <= u / 2^64
    keys = random_ints(n * width, 64)  # shuffle keys
    out: list[mpz] = []
    pos = 0
    for i in range(n):
        s, rho_i, bits_i = signs[i], rho[i], enc_bits[i]
        can_be_zero = 1 if s == 1 else 0  # the value of rho'_j where c_j can be 0
        ones = sum(rho_i)
        # exponentiations to pad with, so that their count is max(ones, width - ones) whatever s is
        pad = abs(width - 2 * ones)
        pad = pad if (ones < width - ones) == (s == 1) else 0
        # [sum of beta'_k xor rho'_k over the more significant k] = g^flips * prefix: a bit with rho'_k = 1
        # enters as [1 - beta'_k] = g [beta'_k]^-1, its g counted in flips and applied with c_j's constant
        prefix, flips = dgk.h, 0  # h, not 1, for the same reason as g^u in the table
        row = []
        for j in range(width):
            rb, cb = rho_i[j], bits_i[j]
            blind = 1 + exponents[pos + j] % (u - 1)
            if rb == can_be_zero or pad:
                c = g_table[(s - rb + 2 * flips) % u] * cb % nd * (prefix * prefix % nd) % nd  # [c_j]
                if rb != can_be_zero:  # padding: the same work, on g instead of c (a non-candidate's c is unused)
                    c, pad = g, pad - 1
                row.append(gmpy2.powmod(c, blind, nd) * randomizers[pos + j] % nd)
            else:
                row.append(g_table[blind] * randomizers[pos + j] % nd)
            if j < l:  # the last position's [beta'_j xor rho'_j] is never used (its rho'_j is 0)
                if rb:
                    prefix, flips = prefix * next(inverted) % nd, flips + 1
                else:
                    prefix = prefix * cb % nd
        order = sorted(range(width), key=keys[pos:pos + width].__getitem__)
        out.extend(row[k] for k in order)
        pos += width
    return out


def _in_range(values: list[mpz], n: mpz, what: str) -> list[mpz]:
    """``values`` if each is a DGK ciphertext in (0, n), else ProtocolError. The comparison's DGK arrays
    reach the workers as the bytes that arrived (wire.Message.payload): checked here, where they are
    decoded anyway, not decoded twice."""
    if not all(0 < c < n for c in values):
        raise ProtocolError(f"{what} DGK ciphertext out of range: expected 0 < c < n")
    return values


def _blind_chunk(dgk: dict, enc_bits: bytes, r_low: list[int], signs: list[int], randomizers: bytes) -> bytes:
    key = DGKPublicKey.from_dict(dgk)
    width = key.ciphertext_bytes
    bits = object_array(_in_range(from_blob(enc_bits, width), key.n, "S2's bit")).reshape(len(r_low), -1)
    return to_blob(blind_bit_comparisons(key, bits, r_low, signs, from_blob(randomizers, width)), width)


def _zero_chunk(key: S2WorkerKey, width: int, row_length: int, blob: bytes) -> list[int]:
    """delta for each row: 1 if one of its DGK ciphertexts encrypts 0 (c^v_p = 1 mod p); each checked
    first to be in (0, n).

    Every position is tested, also after a zero is found: stopping early would make the round's
    duration depend on the outcomes, which S1 could correlate with its secret signs.
    """
    p, v_p = mpz(key.dgk_p), mpz(key.dgk_v_p)
    cts = _in_range(from_blob(blob, width), mpz(key.dgk_n), "blinded")
    return [int(sum(gmpy2.powmod(c, v_p, p) == 1 for c in cts[i:i + row_length]) > 0)
            for i in range(0, len(cts), row_length)]


def s2_compare_bits(cloud: "KeyCloud", msg: Message) -> Message:
    d, l = read_revealed(cloud, msg, "d")
    k = msg.get("low", int)
    dgk = cloud.dgk_public
    if not 0 <= k <= l:
        raise ProtocolError(f"cannot compare the low {k} bits of {l}-bit values")
    if k + 1 > dgk.max_bits:
        raise BoundExceeded(f"comparison of {k}-bit values exceeds the DGK key's limit of {dgk.max_bits} bits")
    ticket = cloud.tickets.put("comparison", (d, l, k))
    low = (1 << k) - 1
    with cloud.tracer.op("s2_dgk_encrypt"):
        betas = [((di & low) << 1) | 1 for di in d]
        cts = dgk.encrypt_bits_blob((beta >> (k - j)) & 1 for beta in betas for j in range(k + 1))
    reply = Message(meta={"ticket": ticket})
    reply.set_blob("bits", cts, dgk.ciphertext_bytes, (len(d), k + 1))
    return reply


def s2_compare_zero(cloud: "KeyCloud", msg: Message) -> Message:
    d, l, k = cloud.tickets.pop(msg.get("ticket", str), "comparison")
    product = msg.get("product", bool)
    if product and k != l:
        raise ProtocolError("the product needs the comparison of all bits")
    if msg.shape("blinded") != (len(d), k + 1):
        raise ShapeError(f"expected {len(d)} x {k + 1} blinded ciphertexts, got {msg.shape('blinded')}")
    dgk = cloud.dgk_public
    if msg.widths.get("blinded") != dgk.ciphertext_bytes:
        raise ProtocolError(f"blinded DGK ciphertexts of {msg.widths.get('blinded')} bytes: "
                            f"expected {dgk.ciphertext_bytes}")
    width, blob, row = dgk.ciphertext_bytes, msg.payload("blinded"), (k + 1) * dgk.ciphertext_bytes
    zero_test = powmod_seconds(int(cloud.dgk_private.p).bit_length(), int(cloud.dgk_private.v_p).bit_length())
    calls = [(width, k + 1, blob[r.start * row:r.stop * row])
             for r in cloud.workers.chunks(len(d), minimum=8, item_seconds=(k + 1) * zero_test)]
    with cloud.tracer.op("s2_zero"):
        delta = [v for part in cloud.workers.map_keyed(_zero_chunk, calls, cloud.worker_key) for v in part]
    cloud.observe("delta", delta, 1, 0)
    return _result_reply(cloud, d, l, k, product, delta)


def _result_reply(cloud: "KeyCloud", d: list[int], l: int, k: int, product: bool, delta: list[int]) -> Message:
    """S2's step 4 after it has delta (DGK: its zero tests; OT: its share of the carry)."""
    alpha = [di >> k for di in d]
    if k < l:
        fields = {"alpha_minus_delta": [a - dl for a, dl in zip(alpha, delta)], "delta": delta}
    else:
        e = [(a & 1) ^ dl for a, dl in zip(alpha, delta)]  # t xor S1's secret bit f
        fields = {"neg_e": [-v for v in e]}
        if product:
            fields["e_d"] = [v * di for v, di in zip(e, d)]
    return encrypted_reply(cloud, fields)


def s2_compare_ot(cloud: "KeyCloud", msg: Message) -> Message:
    # the link first: a request on a link S2 no longer knows is refused before anything is decrypted
    link = millionaire.s2_link(cloud, msg.get("ot_session", str)) if msg.get("ot_count", int) else None
    d, l = read_revealed(cloud, msg, "d")
    k, product = msg.get("low", int), msg.get("product", bool)
    width = millionaire.product_width(l, msg.get("kappa", int)) if product else None
    if not 0 <= k <= l or (product and k != l):
        raise ProtocolError(f"cannot compare the low {k} bits of {l}-bit values{' with the product' if product else ''}")
    if k > millionaire.MAX_BITS:
        raise BoundExceeded(f"comparison of {k}-bit values exceeds the OT comparison's limit of {millionaire.MAX_BITS} bits")
    reply, cmp = millionaire.s2_start(cloud, msg, link, d, l, k, product, width)
    return _ot_reply(cloud, reply, cmp)


def s2_compare_ot_level(cloud: "KeyCloud", msg: Message) -> Message:
    cmp = cloud.tickets.pop(msg.get("ticket", str), "comparison_ot")
    return _ot_reply(cloud, millionaire.s2_level(cloud, msg, cmp), cmp)


def _ot_reply(cloud: "KeyCloud", reply: Message, cmp: "millionaire.S2Comparison") -> Message:
    """A ticket for the next level, or, once the circuit is done, the result fields beside the openings."""
    if not cmp.state.done:
        reply.meta["ticket"] = cloud.tickets.put("comparison_ot", cmp)
        return reply
    delta = cmp.state.result().tolist()
    cloud.observe("ot_delta", delta, 1, 0)
    if cmp.pads is not None:  # the product by OT: E(e d + R) and the answers that give S1 Q = R + e M
        with cloud.tracer.op("s2_ot"):
            e = np.array([(di >> cmp.l) & 1 ^ dl for di, dl in zip(cmp.d, delta)], dtype=np.uint8)
            answers, r_sums = millionaire.product_answer(*cmp.pads, cmp.corrections, e)
        final = encrypted_reply(cloud, {"e_x": [int(ei) * di + r for ei, di, r in zip(e.tolist(), cmp.d, r_sums)]})
        final.set_blob("ot_p", answers.tobytes(), 16, (answers.size // 16,))
    else:
        final = _result_reply(cloud, cmp.d, cmp.l, cmp.k, cmp.product, delta)
    final.meta.update(reply.meta, final=True)
    final.blobs.update(reply.blobs)
    final.widths.update(reply.widths)
    return final


def secure_compare(ctx: S1Context, x: EncryptedTensor, bits: int) -> EncryptedTensor:
    """E([x >= 0]) element-wise for |x| < 2^bits (two rounds)."""
    return secure_sign(ctx, x, bits, product=False)


def secure_truncate(ctx: S1Context, x: EncryptedTensor, bits: int, shift: int) -> EncryptedTensor:
    """E(floor(x / 2^shift)) element-wise, exactly, for -2^bits <= x < 2^bits and 1 <= shift <= bits
    (two rounds; the comparison runs on the low ``shift`` bits only)."""
    floor_z = secure_sign(ctx, x, bits, product=False, low=shift)  # floor((x + 2^bits) / 2^shift)
    with ctx.tracer.op("s1_combine"):
        return floor_z.add(np.full(x.shape, -(1 << (bits - shift)), dtype=object))


def secure_relu(ctx: S1Context, x: EncryptedTensor, bits: int, shift: int = 0) -> EncryptedTensor:
    """SACT: E(max(x, 0)) = SMP(E(x), E([x >= 0])) element-wise for |x| < 2^bits (two rounds).

    With ``shift`` the ReLU requantises: E(max(x, 0) >> shift) = E(max(floor(x / 2^shift), 0)), a
    truncation on the low ``shift`` bits and then a ReLU on the remaining ``bits - shift`` bits (four
    rounds, shift + 1 + bits - shift + 1 DGK bits per element: one more than without the shift).
    """
    if shift >= bits:  # every output is 0: nothing to compute
        return EncryptedTensor(ctx.public_key, np.full(x.shape, mpz(1), dtype=object))
    if shift:
        x, bits = secure_truncate(ctx, x, bits, shift), bits - shift
    return secure_sign(ctx, x, bits, product=True)


def secure_max(ctx: S1Context, a: EncryptedTensor, b: EncryptedTensor, bits: int) -> EncryptedTensor:
    """E(max(a, b)) = E(b + ReLU(a - b)) element-wise for |a|, |b| < 2^bits; ties give b (= a)."""
    with ctx.tracer.op("s1_combine"):
        difference = a.sub(b)
    relu = secure_relu(ctx, difference, bits + 1)
    with ctx.tracer.op("s1_combine"):
        return b.add(relu)


def secure_maxpool(ctx: S1Context, x: EncryptedTensor, kernel: Size, stride: Size, padding: Size,
                   bits: int, shift: int = 0) -> EncryptedTensor:
    """SMAP: the maximum of every pooling window of a (C, H, W) tensor with |x| < 2^bits.

    A kh x kw window maximum is separable: first the maximum over each row segment, then over each
    column segment of those (:func:`_line_max`; maxima of runs of neighbours are computed once and
    shared by overlapping windows). Every level is one batched secure_max over all channels and
    lines (two rounds). A 3x3 stride-1 window costs about 4 comparisons instead of 8, a 2x2 window
    3; padded positions are left out (torch's -inf padding). Ties are exact. Equivalent to the
    patent's SMP(E(R), E(MR)) with a one-hot MR. With ``shift`` the input is first truncated
    (:func:`secure_truncate`), so every comparison runs on ``bits - shift`` bits.
    """
    if x.data.ndim != 3:
        raise ShapeError(f"max-pooling expects a (C, H, W) tensor, got shape {x.shape}")
    c, h, w = x.shape
    oh, ow = conv_output_hw(h, w, kernel, stride, padding)
    (kh, kw), (sh, sw), (ph, pw) = pair(kernel), pair(stride), pair(padding)
    if oh < 1 or ow < 1:
        raise ShapeError(f"a {kh}x{kw} window does not fit a {h}x{w} input with padding {(ph, pw)}")
    if shift:
        shift = min(shift, bits)  # beyond that, floor(x / 2^shift) is -1 or 0 either way
        x, bits = secure_truncate(ctx, x, bits, shift), bits - shift
    cols = window_ranges(w, ow, kw, sw, pw)
    rows = window_ranges(h, oh, kh, sh, ph)
    # pass 1 along W: lines are (channel, row); pass 2 along H: lines are (channel, output column)
    row_max = _line_max(ctx, x.data.reshape(c * h, w), cols, bits).reshape(c, h, ow)
    by_column = row_max.transpose(0, 2, 1).reshape(c * ow, h)
    out = _line_max(ctx, by_column, rows, bits).reshape(c, ow, oh).transpose(0, 2, 1)
    return EncryptedTensor(ctx.public_key, np.ascontiguousarray(out))


def _line_max(ctx: S1Context, lines: np.ndarray, ranges: list[tuple[int, int]], bits: int) -> np.ndarray:
    """Maxima of ``ranges`` of every line of a (lines, length) ciphertext array -> (lines, len(ranges)).

    Each range is split into aligned-left runs of 2^t neighbours (largest first); a run's maximum is
    computed once and shared by every window that uses it (level by level, one batched secure_max
    per level, :func:`~he_cnn.graph.max_runs`), then each window's runs are reduced pairwise (for
    k <= 3 at most one more level).
    """
    window_runs, levels = max_runs(ranges)
    table: dict[tuple[int, int], np.ndarray] = {(0, i): lines[:, i] for i in range(lines.shape[1])}
    for level in sorted(levels):
        items = levels[level]
        half = 1 << (level - 1)
        maxima = _batched_max(ctx, [table[(level - 1, i)] for i in items],
                              [table[(level - 1, i + half)] for i in items], bits)
        for i, m in zip(items, maxima):
            table[(level, i)] = m
    candidates = [[table[r] for r in rs] for rs in window_runs]
    while any(len(c) > 1 for c in candidates):
        firsts = [c[k] for c in candidates for k in range(0, len(c) - 1, 2)]
        seconds = [c[k + 1] for c in candidates for k in range(0, len(c) - 1, 2)]
        maxima = iter(_batched_max(ctx, firsts, seconds, bits))
        candidates = [[next(maxima) for _ in range(len(c) // 2)] + c[len(c) - len(c) % 2:] for c in candidates]
    return np.stack([c[0] for c in candidates], axis=1)


def _batched_max(ctx: S1Context, firsts: list[np.ndarray], seconds: list[np.ndarray], bits: int) -> list[np.ndarray]:
    """secure_max of many equal-length ciphertext columns at once (one two-round call)."""
    if not firsts:
        return []
    pk = ctx.public_key
    a = EncryptedTensor(pk, np.stack(firsts))
    b = EncryptedTensor(pk, np.stack(seconds))
    return list(secure_max(ctx, a, b, bits).data)
