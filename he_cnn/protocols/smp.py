"""SMP, the patent's secure multiplication protocol: E(a), E(b) -> E(a * b), a whole tensor per round.

Steps (|a| < 2^la, |b| < 2^lb):
  1. S1 draws masks Ma, Mb (see :mod:`.common`) and reveals a + Ma and b + Mb to S2, packed.
  2. S2 decrypts, multiplies in the clear and returns fresh E((a + Ma)(b + Mb)).
  3. S1 removes the cross terms: E(ab) = E((a+Ma)(b+Mb)) - Mb E(a) - Ma E(b) - Ma Mb.

Cost per element: S1 2 exponentiations by (l + kappa + 2)-bit exponents, ~l + kappa modular
squarings for packing; S2 one decryption per pack and one encryption. One round.
S1 learns: nothing (it only sees ciphertexts).  S2 learns: a + Ma and b + Mb, each within
statistical distance 2^-kappa of its mask distribution, i.e. nothing about a or b.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from he_cnn.errors import ShapeError
from he_cnn.crypto.tensor import EncryptedTensor
from he_cnn.wire import Message
from he_cnn.protocols.common import S1Context, encrypted_reply, read_ciphertexts, masked_reveal, read_revealed

if TYPE_CHECKING:
    from he_cnn.parties.key_cloud import KeyCloud

STEP = "smp"


def secure_multiply(ctx: S1Context, a: EncryptedTensor, b: EncryptedTensor, a_bits: int, b_bits: int) -> EncryptedTensor:
    """SMP: element-wise E(a * b) for tensors of one shape with |a| < 2^a_bits, |b| < 2^b_bits."""
    if a.shape != b.shape:
        raise ShapeError(f"SMP operands must share a shape: got {a.shape} and {b.shape}")
    ctx.public_key.require_same(a.public_key)
    ctx.public_key.require_same(b.public_key)
    msg, mask_a = masked_reveal(ctx, "a", a, a_bits)
    msg_b, mask_b = masked_reveal(ctx, "b", b, b_bits)
    msg.meta.update(msg_b.meta)
    msg.arrays.update(msg_b.arrays)
    msg.widths.update(msg_b.widths)
    reply = ctx.channel.request(STEP, msg)
    with ctx.tracer.op("s1_validate"):
        product = read_ciphertexts(ctx.public_key, reply, "ab", (a.size,))
    af, bf = a.flatten(), b.flatten()
    ctx.count("exp_short", 2 * a.size)
    with ctx.tracer.op("s1_combine"):
        out = product.sub(af.mul_plain(mask_b)).sub(bf.mul_plain(mask_a)).sub([x * y for x, y in zip(mask_a, mask_b)])
    return out.reshape(a.shape)


def s2_multiply(cloud: "KeyCloud", msg: Message) -> Message:
    a, _ = read_revealed(cloud, msg, "a")
    b, _ = read_revealed(cloud, msg, "b")
    if len(a) != len(b):
        raise ShapeError(f"SMP operands of {len(a)} and {len(b)} elements")
    return encrypted_reply(cloud, {"ab": [x * y for x, y in zip(a, b)]})
