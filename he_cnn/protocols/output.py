"""The user's answer: turn E(y) under the cloud key into E_u(y) under the user's own key.

Steps (|y| < 2^l):
  1. S1 reveals y + M to S2 (M = 2^l + r, packed), together with the user's public key pk_u.
  2. S2 decrypts y + M and returns a fresh encryption E_u(y + M) under pk_u.
  3. S1 subtracts M under pk_u and re-randomises: E_u(y). Only the user can decrypt it.

Cost per element: S1 ~l+kappa squarings (packing), one plaintext addition and one randomizer under
pk_u; S2 one decryption per pack and one encryption under pk_u. One round.
S1 learns: nothing.  S2 learns: y + M, statistically independent of y, and pk_u.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from gmpy2 import mpz

from he_cnn.errors import ProtocolError
from he_cnn.crypto.paillier import MAX_USER_KEY_BITS, MIN_KEY_BITS, PublicKey
from he_cnn.crypto.tensor import EncryptedTensor
from he_cnn.wire import Message
from he_cnn.protocols.common import S1Context, ciphertext_field, read_ciphertexts, masked_reveal, read_revealed

if TYPE_CHECKING:
    from he_cnn.parties.key_cloud import KeyCloud

STEP = "to_user"


def reencrypt_for_user(ctx: S1Context, y: EncryptedTensor, bits: int, user_key: PublicKey,
                       min_user_bits: int = MIN_KEY_BITS) -> EncryptedTensor:
    msg, masks = masked_reveal(ctx, "y", y.flatten(), bits)
    attach_receiver_key(msg, user_key, min_user_bits)
    reply = ctx.channel.request(STEP, msg)
    with ctx.tracer.op("s1_validate"):
        out = read_ciphertexts(user_key, reply, "y_user", (y.size,))
    with ctx.tracer.op("s1_combine"):
        return out.sub(masks).rerandomize().reshape(y.shape)


def s2_to_user(cloud: "KeyCloud", msg: Message) -> Message:
    values, _ = read_revealed(cloud, msg, "y")
    reply = Message()
    with cloud.tracer.op("s2_encrypt"):  # a new user key builds its randomizer table here
        user_key = receiver_key(cloud, msg)
        ciphertext_field(reply, "y_user", [user_key.encrypt(v) for v in values], user_key.ciphertext_bytes)
    return reply


def attach_receiver_key(msg: Message, key: PublicKey, min_bits: int = MIN_KEY_BITS) -> None:
    """S1: name the key S2 is to encrypt to (the user's, or an owners' consortium's) in ``msg``."""
    if key.bits < min_bits:
        raise ProtocolError(f"receiver key of {key.bits} bits is too small: expected at least {min_bits}")
    msg.arrays["user_n"] = np.array([key.n], dtype=object)


def receiver_key(cloud: "KeyCloud", msg: Message) -> PublicKey:
    """S2: the receiver's key named in ``msg``, checked (size, not the cloud's own key) before S2 keeps
    it with its randomizer table."""
    user_n = msg.array("user_n").reshape(-1)
    if user_n.size != 1:
        raise ProtocolError("expected exactly one user modulus")
    key = PublicKey(mpz(user_n[0]))
    if not cloud.min_user_key_bits <= key.bits <= MAX_USER_KEY_BITS or key == cloud.keys.public:
        raise ProtocolError(f"unacceptable user key ({key.bits} bits)")
    return cloud.user_key(key.n)
