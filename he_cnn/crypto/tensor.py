"""Encrypted tensors: an n-d numpy array of Paillier ciphertexts under one public key.

The array holds raw ``gmpy2.mpz`` ciphertexts (dtype=object), never per-element
``phe.EncryptedNumber`` objects. Operators delegate to named methods (``add``, ``mul_plain``,
``matmul_plain``); plaintext operands are integer arrays (signed). An encrypted tensor never prints
its contents and refuses ``bool()``. Serialisation is the binary wire format of :mod:`he_cnn.wire`.
"""
from __future__ import annotations

from typing import Iterable, Sequence, Union

import gmpy2
import numpy as np
from gmpy2 import mpz

from he_cnn.errors import HECNNError, ShapeError
from he_cnn.crypto.paillier import PublicKey, batch_invert
from he_cnn.parallel import INLINE, Workers

PlainLike = Union[int, Sequence[int], np.ndarray]


def object_array(items: Iterable, count: int | None = None) -> np.ndarray:
    """A 1-d object array of the given items. (``arr[:] = list_of_mpz`` makes numpy inspect every
    mpz as a possible sequence, ~7 us each; fromiter does not.)"""
    return np.fromiter(items, dtype=object, count=-1 if count is None else count)


def as_int_array(values: PlainLike) -> np.ndarray:
    """Normalise a plaintext operand to an object array of Python ints."""
    arr = np.asarray(values, dtype=object)
    flat = arr.reshape(-1)
    for i, v in enumerate(flat):
        if not isinstance(v, int):
            if isinstance(v, (np.integer, type(mpz(0)))):
                flat[i] = int(v)
            else:
                raise HECNNError(f"plaintext operands must be integers, got {type(v).__name__}")
    return flat.reshape(arr.shape)


class EncryptedTensor:
    """An n-d array of ciphertexts under ``public_key``."""

    __slots__ = ("public_key", "data")

    def __init__(self, public_key: PublicKey, data: np.ndarray):
        if not isinstance(data, np.ndarray) or data.dtype != object:
            raise HECNNError("EncryptedTensor data must be a numpy object array of ciphertexts")
        self.public_key = public_key
        self.data = data

    # -- construction -----------------------------------------------------------------------------
    @classmethod
    def encrypt(cls, public_key: PublicKey, values: PlainLike) -> "EncryptedTensor":
        arr = as_int_array(values)
        out = np.empty(arr.shape, dtype=object)
        flat_in, flat_out = arr.reshape(-1), out.reshape(-1)
        for i, v in enumerate(flat_in):
            flat_out[i] = public_key.encrypt(v)
        return cls(public_key, out)

    @classmethod
    def from_ciphertexts(cls, public_key: PublicKey, ciphertexts: Iterable[int], shape: Sequence[int],
                         validate: bool = True) -> "EncryptedTensor":
        arr = object_array(public_key.validate_many(ciphertexts) if validate else (mpz(c) for c in ciphertexts))
        if int(np.prod(shape)) != arr.size:
            raise ShapeError(f"{arr.size} ciphertexts cannot take shape {tuple(shape)}")
        return cls(public_key, arr.reshape(tuple(shape)))

    def decrypt(self, private_key) -> np.ndarray:
        """Signed plaintexts (object array); needs the matching PrivateKey."""
        self.public_key.require_same(private_key.public, "private key")
        return object_array((private_key.decrypt(c) for c in self.data.reshape(-1)), self.size).reshape(self.shape)

    # -- numpy-like shape handling ----------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        return self.data.shape

    @property
    def size(self) -> int:
        return int(self.data.size)

    def __len__(self) -> int:
        return len(self.data)

    def reshape(self, *shape) -> "EncryptedTensor":
        try:
            return EncryptedTensor(self.public_key, self.data.reshape(*shape))
        except ValueError as e:
            raise ShapeError(f"cannot reshape encrypted tensor of shape {self.shape} to {shape}") from e

    def flatten(self) -> "EncryptedTensor":
        return self.reshape(-1)

    def __getitem__(self, item) -> "EncryptedTensor":
        sub = self.data[item]
        if not isinstance(sub, np.ndarray):
            sub = np.array([sub], dtype=object).reshape(())
        return EncryptedTensor(self.public_key, sub)

    def take(self, indices: np.ndarray) -> "EncryptedTensor":
        """Gather flat elements by an index array; index -1 gives an encryption of zero (padding).

        The zero is the trivial ciphertext 1: it only ever enters sums S1 computes and is never sent
        as it is (every outgoing ciphertext is re-randomised).
        """
        flat = self.data.reshape(-1)
        idx = np.asarray(indices)
        padded = np.empty(flat.size + 1, dtype=object)
        padded[:-1] = flat
        padded[-1] = mpz(1)
        return EncryptedTensor(self.public_key, padded[np.where(idx < 0, flat.size, idx)])

    @staticmethod
    def concatenate(tensors: Sequence["EncryptedTensor"], axis: int = 0) -> "EncryptedTensor":
        pk = tensors[0].public_key
        for t in tensors[1:]:
            pk.require_same(t.public_key, "concatenated tensor")
        return EncryptedTensor(pk, np.concatenate([t.data for t in tensors], axis=axis))

    # -- homomorphic arithmetic -------------------------------------------------------------------
    def _check(self, other: "EncryptedTensor") -> None:
        self.public_key.require_same(other.public_key)
        if other.shape != self.shape:
            raise ShapeError(f"shape mismatch: {self.shape} and {other.shape}")

    def _plain(self, values: PlainLike) -> np.ndarray:
        arr = as_int_array(values)
        try:
            return np.broadcast_to(arr, self.shape)
        except ValueError as e:
            raise ShapeError(f"plaintext of shape {arr.shape} does not broadcast to {self.shape}") from e

    def add(self, other: Union["EncryptedTensor", PlainLike]) -> "EncryptedTensor":
        nsq = self.public_key.nsq
        if isinstance(other, EncryptedTensor):
            self._check(other)
            return EncryptedTensor(self.public_key, self.data * other.data % nsq)
        terms = np.frompyfunc(self.public_key.plain_term, 1, 1)(self._plain(other))
        return EncryptedTensor(self.public_key, self.data * terms % nsq)

    def neg(self) -> "EncryptedTensor":
        """E(-x): the inverses mod N^2, all at once (one inversion, 3 multiplications per element)."""
        inverses = batch_invert(list(self.data.reshape(-1)), self.public_key.nsq)
        return EncryptedTensor(self.public_key, object_array(inverses, self.size).reshape(self.shape))

    def sub(self, other: Union["EncryptedTensor", PlainLike]) -> "EncryptedTensor":
        if isinstance(other, EncryptedTensor):
            return self.add(other.neg())
        return self.add(-self._plain(other))

    def mul_plain(self, factors: PlainLike) -> "EncryptedTensor":
        """Element-wise product with signed plaintext integers (one exponentiation each)."""
        nsq = self.public_key.nsq
        f = self._plain(factors)
        return EncryptedTensor(self.public_key, np.frompyfunc(lambda c, k: gmpy2.powmod(c, k, nsq), 2, 1)(self.data, f))

    def sum(self, axis: int | None = None) -> "EncryptedTensor":
        nsq = self.public_key.nsq
        mulmod = np.frompyfunc(lambda a, b: a * b % nsq, 2, 1)
        if axis is None:
            out = mpz(1)
            for c in self.data.reshape(-1):
                out = out * c % nsq
            return EncryptedTensor(self.public_key, np.array(out, dtype=object).reshape(()))
        return EncryptedTensor(self.public_key, mulmod.reduce(self.data, axis=axis, initial=mpz(1)).astype(object))

    def matmul_plain(self, weights: PlainLike, workers: Workers = INLINE) -> "EncryptedTensor":
        """(P, F) encrypted @ (F, C) signed plaintext -> (P, C) encrypted, spread over ``workers``.

        The work is split along the rows when there are enough of them (nothing is done twice), else
        along the output columns when there are enough of those (every worker builds every base's
        window table, 14 multiplications per base, against about bits/4 per multiply-accumulate), else
        along the shared dimension F: each worker multiplies its part of the bases and the parts'
        products are multiplied together (the squaring chains, P x C x bits, are repeated per part).
        """
        w = as_int_array(weights)
        if self.data.ndim != 2 or w.ndim != 2 or w.shape[0] != self.shape[1]:
            raise ShapeError(f"matmul of encrypted {self.shape} by plaintext {w.shape}")
        nsq = self.public_key.nsq
        (p_count, f_count), count = self.shape, workers.count
        if p_count >= count and (p_count % count == 0 or p_count >= 4 * count):
            parts = workers.map(matmul_cipher_plain, [(self.data[r.start:r.stop], w, nsq)
                                                      for r in workers.chunks(p_count)])
            return EncryptedTensor(self.public_key, np.concatenate(parts, axis=0))
        c_count = w.shape[1]
        if count > 1 and c_count >= 2 * count:
            parts = workers.map(matmul_cipher_plain, [(self.data, w[:, r.start:r.stop], nsq)
                                                      for r in workers.chunks(c_count)])
            return EncryptedTensor(self.public_key, np.concatenate(parts, axis=1))
        parts = workers.map(matmul_cipher_plain, [(self.data[:, r.start:r.stop], w[r.start:r.stop], nsq)
                                                  for r in workers.chunks(f_count, minimum=8)])
        out = parts[0]
        for part in parts[1:]:
            out = out * part % nsq
        return EncryptedTensor(self.public_key, out)

    def rerandomize(self) -> "EncryptedTensor":
        pk = self.public_key
        return EncryptedTensor(pk, np.frompyfunc(pk.rerandomize, 1, 1)(self.data))

    __add__ = add
    __sub__ = sub
    __neg__ = neg

    def __mul__(self, other: PlainLike) -> "EncryptedTensor":
        if isinstance(other, EncryptedTensor):
            raise HECNNError("the product of two encrypted tensors needs the SMP protocol (he_cnn.protocols.smp)")
        return self.mul_plain(other)

    # -- safety -----------------------------------------------------------------------------------
    def __bool__(self) -> bool:
        raise HECNNError("the truth value of an encrypted tensor is unknown by design")

    def __repr__(self) -> str:
        return f"EncryptedTensor(shape={self.shape}, key={self.public_key.key_id})"

    __str__ = __repr__

    # -- serialisation ----------------------------------------------------------------------------
    def serialize(self) -> bytes:
        from he_cnn.wire import Message, encode

        return encode(Message(meta={"key_id": self.public_key.key_id}, arrays={"t": self.data},
                              widths={"t": self.public_key.ciphertext_bytes}))

    @classmethod
    def deserialize(cls, public_key: PublicKey, data: bytes) -> "EncryptedTensor":
        from he_cnn.errors import KeyMismatch
        from he_cnn.wire import decode

        msg = decode(data)
        if msg.meta.get("key_id") != public_key.key_id:
            raise KeyMismatch(f"tensor is under key {msg.meta.get('key_id')}, expected {public_key.key_id}")
        arr = msg.array("t")
        return cls.from_ciphertexts(public_key, arr.reshape(-1), arr.shape)


def matmul_cipher_plain(x: np.ndarray, w: np.ndarray, nsq: mpz) -> np.ndarray:
    """prod_f x[p, f]^w[f, c] mod nsq for every (p, c), for signed plaintext w.

    Positive and negative parts are two multi-exponentiations; each output then costs one inversion
    instead of one per negative weight.
    """
    w_pos = np.where(w > 0, w, 0)
    out = multi_exponentiate(x, w_pos, nsq)
    if (w < 0).any():
        neg = multi_exponentiate(x, np.where(w < 0, -w, 0), nsq)
        out = np.frompyfunc(lambda a, b: a * gmpy2.invert(b, nsq) % nsq, 2, 1)(out, neg)
    return out


def multi_exponentiate(x: np.ndarray, e: np.ndarray, nsq: mpz, window: int = 4) -> np.ndarray:
    """prod_f x[p, f]^e[f, c] for non-negative exponents, by Straus' interleaving.

    Every base x[p, f] gets a table of its first 2^window powers, shared by the C outputs of its row,
    and each output one chain of squarings over the longest exponent. A multiply-accumulate thus costs
    about bits/window modular multiplications instead of a full exponentiation. The loops are plain
    Python over mpz: the matrices here have few rows (P is a number of packs), where numpy object
    arithmetic on short columns costs more in dispatch than it saves (about 2x on a 1-row matrix).
    """
    p_count, f_count = x.shape
    c_count = e.shape[1]
    out = np.empty((p_count, c_count), dtype=object)
    bits = max((int(v).bit_length() for v in e.reshape(-1)), default=0)
    if bits == 0:
        out[...] = mpz(1)
        return out
    n_windows = -(-bits // window)
    mask = (1 << window) - 1
    # digits[k][c]: the window-k digit of every exponent of column c, as a list over f
    e_obj = np.asarray(e, dtype=object)
    digits = [((e_obj >> (k * window)) & mask).T.tolist() for k in range(n_windows)]
    for p in range(p_count):
        tables = []
        for base in x[p]:
            powers = [mpz(1), base]
            for _ in range(2, 1 << window):
                powers.append(powers[-1] * base % nsq)
            tables.append(powers)
        for c in range(c_count):
            acc = mpz(1)
            for k in range(n_windows - 1, -1, -1):
                if k != n_windows - 1:
                    for _ in range(window):
                        acc = acc * acc % nsq
                for table, d in zip(tables, digits[k][c]):
                    if d:
                        acc = acc * table[d] % nsq
            out[p, c] = acc
    return out
