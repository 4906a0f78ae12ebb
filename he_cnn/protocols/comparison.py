"""Secure comparison (DGK/Veugen), and on it SACT (ReLU) and SMAP (max-pooling).

``secure_sign`` turns E(x), |x| < 2^l, into E(t) with t = [x >= 0], and optionally E(x * t) (the
patent's SACT = SMP(E(x), E(t)), folded into the same two rounds).

Steps (z = x + 2^l in [0, 2^(l+1)), so t = floor(z / 2^l)):
  1. S1 reveals d = z + r (r uniform in [0, 2^(l+1+kappa)), packed)            -- step ``compare_bits``
  2. S2 decrypts d, keeps it under a ticket, and returns DGK encryptions of the l+1 bits of
     beta' = 2 (d mod 2^l) + 1, most significant first.
  3. S1, knowing rho' = 2 (r mod 2^l) (lowest bit 0, so beta' != rho' always), picks a secret sign
     s in {+1, -1} per element and forms for every bit position j
        c_j = s + beta'_j - rho'_j + 3 * sum_{k more significant than j} (beta'_k xor rho'_k),
     blinds each c_j by a random exponent in [1, u-1] and a fresh DGK randomizer, shuffles the
     positions of each element and sends them                                     -- step ``compare_zero``
  4. S2 tests every c_j for zero. delta = [some c_j = 0] equals [beta' < rho'] if s = +1 and
     [beta' > rho'] if s = -1. S2 returns fresh E(delta), E(alpha) with alpha = floor(d / 2^l) and,
     for the product, E(delta * d) and E(alpha * d).
  5. S1: [d mod 2^l < r mod 2^l] = delta if s = +1 else 1 - delta; then
        t = alpha - floor(r / 2^l) - [d mod 2^l < r mod 2^l],
        x t = t d - (2^l + r) t   with   t d = alpha d - floor(r / 2^l) d - [..] d.

Cost per element: S2 one decryption per pack, l+1 DGK encryptions, l+1 zero tests (an exponentiation
by the t-bit v_p mod p), 2 or 4 Paillier encryptions; S1 ~l+kappa squarings (packing), per bit one
inversion, a few multiplications, an exponentiation by a ~10-bit blinding exponent and a DGK
randomizer; then 2 to 3 short exponentiations. Two rounds for a whole tensor.
S1 learns: nothing (Paillier and DGK ciphertexts only).
S2 learns: d, statistically independent of x (distance 2^-kappa); whether one blinded c_j is zero,
which is the bit delta XORed with S1's secret uniform sign, i.e. a uniform bit; the nonzero c_j are
uniform in Z_u^* and the positions shuffled.
"""
from __future__ import annotations

import secrets
from typing import TYPE_CHECKING

import gmpy2
import numpy as np
from gmpy2 import mpz

from ..errors import BoundExceeded, ProtocolError, ShapeError
from ..graph import pool_windows
from ..tensor import EncryptedTensor
from ..wire import Message
from .common import S1Context, ciphertext_field, encrypted_reply, read_ciphertexts, read_revealed, reveal_message

if TYPE_CHECKING:
    from ..s2 import KeyCloud

BITS_STEP = "compare_bits"
ZERO_STEP = "compare_zero"
_shuffle = secrets.SystemRandom().shuffle


def secure_sign(ctx: S1Context, x: EncryptedTensor, bits: int, product: bool
                ) -> tuple[EncryptedTensor, EncryptedTensor | None]:
    """E([x >= 0]) and, if ``product``, E(x * [x >= 0]), element-wise, for |x| < 2^bits."""
    l = bits
    if l + 1 > ctx.dgk_key.max_bits:
        raise BoundExceeded(f"comparison of {l}-bit values exceeds the DGK key's limit of {ctx.dgk_key.max_bits} bits")
    shape = x.shape
    xf = x.flatten()
    n = xf.size
    msg, masks = reveal_message(ctx, "d", xf, l)
    reply = ctx.channel.request(BITS_STEP, msg)
    ticket = reply.get("ticket", str)
    enc_bits = reply.array("bits")
    if enc_bits.shape != (n, l + 1):
        raise ProtocolError(f"expected {n} x {l + 1} DGK bit ciphertexts, got shape {enc_bits.shape}")

    dgk = ctx.dgk_key
    nd, u = dgk.n, dgk.u
    blinded = np.empty((n, l + 1), dtype=object)
    signs = np.empty(n, dtype=object)
    for i in range(n):
        r_low2 = ((masks[i] - (1 << l)) & ((1 << l) - 1)) << 1
        s = 1 if secrets.randbits(1) else -1
        signs[i] = s
        xor_acc = mpz(1)
        row = []
        for j in range(l + 1):
            rb = (r_low2 >> (l - j)) & 1
            cb = dgk.validate(enc_bits[i, j])
            c = dgk.g_power(s - rb) * cb % nd
            if xor_acc != 1:
                c = c * gmpy2.powmod(xor_acc, 3, nd) % nd
            xor_acc = xor_acc * (cb if rb == 0 else dgk.g * gmpy2.invert(cb, nd) % nd) % nd
            row.append(gmpy2.powmod(c, 1 + secrets.randbelow(u - 1), nd) * dgk.randomizer() % nd)
        _shuffle(row)
        blinded[i] = row
    ctx.count("dgk_bit", n * (l + 1))
    msg2 = Message(meta={"ticket": ticket, "product": product})
    ciphertext_field(msg2, "blinded", list(blinded.reshape(-1)), dgk.ciphertext_bytes)
    msg2.arrays["blinded"] = msg2.arrays["blinded"].reshape(n, l + 1)
    reply2 = ctx.channel.request(ZERO_STEP, msg2)

    pk = ctx.public_key
    delta = read_ciphertexts(pk, reply2, "delta", (n,))
    alpha = read_ciphertexts(pk, reply2, "alpha", (n,))
    positive = signs == 1
    # [d mod 2^l < r mod 2^l] = delta (s = +1) or 1 - delta (s = -1)
    carry = EncryptedTensor(pk, np.where(positive, delta.data, delta.neg().add(1).data))
    r_high = [(m >> l) - 1 for m in masks]
    t = alpha.sub(r_high).sub(carry)
    if not product:
        return t.reshape(shape), None
    delta_d = read_ciphertexts(pk, reply2, "delta_d", (n,))
    alpha_d = read_ciphertexts(pk, reply2, "alpha_d", (n,))
    d = xf.add(masks)
    carry_d = EncryptedTensor(pk, np.where(positive, delta_d.data, d.sub(delta_d).data))
    t_d = alpha_d.sub(d.mul_plain(r_high)).sub(carry_d)
    ctx.count("exp_short", 2 * n)
    xt = t_d.sub(t.mul_plain(masks))
    return t.reshape(shape), xt.reshape(shape)


def s2_compare_bits(cloud: "KeyCloud", msg: Message) -> Message:
    d, l = read_revealed(cloud, msg, "d")
    dgk = cloud.dgk_public
    if l + 1 > dgk.max_bits:
        raise BoundExceeded(f"comparison of {l}-bit values exceeds the DGK key's limit of {dgk.max_bits} bits")
    ticket = cloud.tickets.put((d, l))
    low = (1 << l) - 1
    cts = []
    for di in d:
        beta = ((di & low) << 1) | 1
        cts.extend(dgk.encrypt((beta >> (l - j)) & 1) for j in range(l + 1))
    reply = Message(meta={"ticket": ticket})
    ciphertext_field(reply, "bits", cts, dgk.ciphertext_bytes)
    reply.arrays["bits"] = reply.arrays["bits"].reshape(len(d), l + 1)
    return reply


def s2_compare_zero(cloud: "KeyCloud", msg: Message) -> Message:
    d, l = cloud.tickets.pop(msg.get("ticket", str))
    product = msg.get("product", bool)
    blinded = msg.array("blinded")
    if blinded.shape != (len(d), l + 1):
        raise ShapeError(f"expected {len(d)} x {l + 1} blinded ciphertexts, got {blinded.shape}")
    dgk, dgk_priv = cloud.dgk_public, cloud.dgk_private
    delta = [int(any(dgk_priv.is_zero(dgk.validate(c)) for c in row)) for row in blinded]
    cloud.observe("delta", delta, 1, 0)
    alpha = [di >> l for di in d]
    fields = {"delta": delta, "alpha": alpha}
    if product:
        fields["delta_d"] = [a * b for a, b in zip(delta, d)]
        fields["alpha_d"] = [a * b for a, b in zip(alpha, d)]
    return encrypted_reply(cloud, fields)


def secure_compare(ctx: S1Context, x: EncryptedTensor, bits: int) -> EncryptedTensor:
    """E([x >= 0]) element-wise for |x| < 2^bits (two rounds)."""
    return secure_sign(ctx, x, bits, product=False)[0]


def secure_relu(ctx: S1Context, x: EncryptedTensor, bits: int) -> EncryptedTensor:
    """SACT: E(max(x, 0)) = SMP(E(x), E([x >= 0])) element-wise for |x| < 2^bits (two rounds)."""
    return secure_sign(ctx, x, bits, product=True)[1]


def secure_maxpool(ctx: S1Context, x: EncryptedTensor, kernel: int, stride: int, padding: int,
                   bound: int) -> EncryptedTensor:
    """SMAP: max over every pooling window of a (C, H, W) tensor with |x| <= bound.

    A tournament: each level pairs the remaining candidates of every window and keeps
    max(a, b) = b + ReLU(a - b), all pairs of all windows in one secure_sign call (two rounds), so a
    3x3 window takes four levels. Padded positions are left out of their windows (torch's -inf
    padding). Ties are exact: a = b gives b. Equivalent to the patent's SMP(E(R), E(MR)) with a
    one-hot mask MR, at ceil(log2(k^2)) levels instead of a mask per element.
    """
    if x.data.ndim != 3:
        raise ShapeError(f"max-pooling expects a (C, H, W) tensor, got shape {x.shape}")
    from ..graph import conv_output_hw

    windows = pool_windows(x.shape, kernel, stride, padding)
    flat = x.data.reshape(-1)
    candidates = [[flat[i] for i in w] for w in windows]
    diff_bits = (2 * bound).bit_length()
    pk = ctx.public_key
    while any(len(c) > 1 for c in candidates):
        a_list, b_list = [], []
        for c in candidates:
            for k in range(0, len(c) - 1, 2):
                a_list.append(c[k])
                b_list.append(c[k + 1])
        a = EncryptedTensor(pk, _obj(a_list))
        b = EncryptedTensor(pk, _obj(b_list))
        maxima = b.add(secure_relu(ctx, a.sub(b), diff_bits)).data
        pos = 0
        nxt = []
        for c in candidates:
            pairs = len(c) // 2
            nxt.append(list(maxima[pos:pos + pairs]) + (c[-1:] if len(c) % 2 else []))
            pos += pairs
        candidates = nxt
    oh, ow = conv_output_hw(x.shape[1], x.shape[2], kernel, stride, padding)
    return EncryptedTensor(pk, _obj([c[0] for c in candidates])).reshape(x.shape[0], oh, ow)


def _obj(items: list) -> np.ndarray:
    arr = np.empty(len(items), dtype=object)
    arr[:] = items
    return arr
