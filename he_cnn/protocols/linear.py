"""SCVL and SCT: convolution and dense layer of an encrypted input by encrypted weights.

Both are one bilinear map ``Y = X_cols @ K`` (X_cols the im2col matrix of the input, K the
(F, C) weight matrix), computed with a batched SMP whose weight mask is fixed per model:

Set-up, once per model (step ``linear_setup``, one round for all layers):
  1. S1 draws a mask B (|K| < 2^lw, B = 2^lw + r as in :mod:`.common`) per layer, reveals K + B.
  2. S2 keeps Kt = K + B in the clear under a set-up id; S1 keeps B and E(Kt) = E(K) + B.
Online, per layer (step ``linear``, one round):
  1. S1 draws a fresh mask A for the input X (|X| < 2^lx) and reveals X + A (the tensor, not im2col).
  2. S2 builds Xt_cols from X + A (zero padding), computes Y = Xt_cols @ Kt in the clear and returns
     fresh E(Y).
  3. S1 removes the cross terms: E(X_cols K) = E(Y) - E(X_cols) @ B - A_cols @ E(Kt), then adds E(b).
     (Xt_cols Kt = X K + X B + A Kt.) ``A_cols @ E(Kt)`` does not depend on the query and can be
     computed before the query arrives.

Cost per multiply-accumulate: S1 one exponentiation by a (lw + kappa + 2)-bit exponent online and one
by an (lx + kappa + 2)-bit exponent that is query-independent; S2 plaintext integer arithmetic only.
Per input element: S1 ~lx + kappa squarings (packing), S2 one decryption per pack; per output: S2 one
encryption, S1 one inversion.
S1 learns: nothing.  S2 learns: K + B once per model and X + A per query, each statistically
independent of K and X (distance 2^-kappa per element); the layer geometry and the bit bounds.
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np

from ..errors import ProtocolError, ShapeError
from ..graph import conv_output_hw, im2col_indices
from ..tensor import EncryptedTensor, as_int_array
from ..wire import Message
from .common import S1Context, encrypted_reply, read_ciphertexts, read_revealed, reveal_message, sample_masks

if TYPE_CHECKING:
    from ..s2 import KeyCloud

SETUP_STEP = "linear_setup"
STEP = "linear"


@dataclass(frozen=True)
class LinearGeometry:
    """Public shape of a linear layer: a convolution over (C, H, W) or a dense layer over (F,)."""

    kind: str  # "conv" or "dense"
    in_shape: tuple[int, ...]
    kernel: int = 1
    stride: int = 1
    padding: int = 0

    def column_indices(self) -> np.ndarray:
        """(P, F) flat input indices per output position and weight row; -1 is zero padding."""
        if self.kind == "dense":
            return np.arange(self.in_shape[0], dtype=np.int64).reshape(1, -1)
        return im2col_indices(self.in_shape, self.kernel, self.stride, self.padding)

    def out_shape(self, channels: int) -> tuple[int, ...]:
        if self.kind == "dense":
            return (channels,)
        return (channels, *conv_output_hw(self.in_shape[1], self.in_shape[2], self.kernel, self.stride, self.padding))

    def to_dict(self) -> dict:
        return {"kind": self.kind, "in_shape": list(self.in_shape), "kernel": self.kernel,
                "stride": self.stride, "padding": self.padding}

    @classmethod
    def from_dict(cls, d: dict) -> "LinearGeometry":
        try:
            g = cls(str(d["kind"]), tuple(int(v) for v in d["in_shape"]), int(d["kernel"]), int(d["stride"]),
                    int(d["padding"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ProtocolError(f"malformed layer geometry {d!r}") from e
        if g.kind not in ("conv", "dense") or len(g.in_shape) != (3 if g.kind == "conv" else 1):
            raise ProtocolError(f"unsupported layer geometry {d!r}")
        if g.kind == "conv" and not (g.kernel >= 1 and g.stride >= 1 and 0 <= g.padding < g.kernel
                                     and g.in_shape[1] + 2 * g.padding >= g.kernel):
            raise ProtocolError(f"inconsistent convolution geometry {d!r}")
        return g


@dataclass(frozen=True)
class EncryptedLinear:
    """A linear layer as the owner uploads it: E(K) as (F, C), E(b) as (C,), public geometry and bound."""

    name: str
    geometry: LinearGeometry
    weight: EncryptedTensor
    bias: EncryptedTensor
    weight_bits: int

    def __post_init__(self) -> None:
        f_expected = self.geometry.column_indices().shape[1]
        if self.weight.data.ndim != 2 or self.weight.shape[0] != f_expected:
            raise ShapeError(f"layer {self.name}: weight shape {self.weight.shape}, expected ({f_expected}, C)")
        if self.bias.shape != (self.weight.shape[1],):
            raise ShapeError(f"layer {self.name}: bias shape {self.bias.shape}, expected ({self.weight.shape[1]},)")

    @property
    def out_shape(self) -> tuple[int, ...]:
        return self.geometry.out_shape(self.weight.shape[1])


@dataclass(frozen=True)
class LinearSetup:
    """S1's half of a layer's set-up: the weight mask B and E(K + B)."""

    masks: np.ndarray  # (F, C) Python ints
    masked_weight: EncryptedTensor  # (F, C)


@dataclass(frozen=True)
class LinearPrecomputation:
    """The query-independent part of one SCVL/SCT call: the input mask A and E(A_cols @ Kt), (P, C)."""

    masks: list[int]
    a_term: EncryptedTensor


def precompute_linear(ctx: S1Context, layer: EncryptedLinear, setup: LinearSetup, x_bits: int) -> LinearPrecomputation:
    """Offline: draw the input mask A for one future query and compute E(A_cols @ (K + B))."""
    masks = sample_masks(int(np.prod(layer.geometry.in_shape)), x_bits, ctx.kappa)
    idx = layer.geometry.column_indices()
    mask_padded = np.array(masks + [0], dtype=object)
    a_cols = mask_padded[np.where(idx < 0, len(masks), idx)]
    # A_cols @ E(Kt) computed as (E(Kt)^T @ A_cols^T)^T
    a_term = EncryptedTensor(ctx.public_key, setup.masked_weight.data.T.copy()).matmul_plain(a_cols.T, ctx.workers)
    ctx.count("exp_offline", idx.shape[0] * idx.shape[1] * layer.weight.shape[1])
    return LinearPrecomputation(masks, EncryptedTensor(ctx.public_key, a_term.data.T.copy()))


def new_setup_id() -> str:
    return secrets.token_hex(16)


def setup_linear_layers(ctx: S1Context, setup_id: str, layers: Sequence[EncryptedLinear]) -> dict[str, LinearSetup]:
    """One round: reveal K + B for every layer to S2, which keeps it under ``setup_id``."""
    msg = Message(meta={"setup_id": setup_id, "layers": []})
    result: dict[str, LinearSetup] = {}
    for i, layer in enumerate(layers):
        masks = sample_masks(layer.weight.size, layer.weight_bits, ctx.kappa)
        part = reveal_message(ctx, f"w{i}", layer.weight, layer.weight_bits, masks)
        msg.meta.update(part.meta)
        msg.arrays.update(part.arrays)
        msg.widths.update(part.widths)
        msg.meta["layers"].append({"name": layer.name, "shape": list(layer.weight.shape),
                                   "geometry": layer.geometry.to_dict()})
        mask_arr = as_int_array(masks).reshape(layer.weight.shape)
        result[layer.name] = LinearSetup(mask_arr, layer.weight.add(mask_arr))
    ctx.channel.request(SETUP_STEP, msg)
    return result


def s2_setup(cloud: "KeyCloud", msg: Message) -> Message:
    setup_id = msg.get("setup_id", str)
    layers = msg.get("layers", list)
    stored = {}
    for i, spec in enumerate(layers):
        values, _ = read_revealed(cloud, msg, f"w{i}")
        try:
            shape = tuple(int(v) for v in spec["shape"])
            name = str(spec["name"])
        except (KeyError, TypeError, ValueError) as e:
            raise ProtocolError(f"malformed layer spec {spec!r}") from e
        geometry = LinearGeometry.from_dict(spec.get("geometry", {}))
        if len(shape) != 2 or shape[0] * shape[1] != len(values) or geometry.column_indices().shape[1] != shape[0]:
            raise ShapeError(f"layer {name}: {len(values)} weights do not fit shape {shape} and its geometry")
        stored[name] = (np.array(values, dtype=object).reshape(shape), geometry)
    cloud.store_setup(setup_id, stored)
    return Message(meta={"setup_id": setup_id, "layers": len(stored)})


def secure_linear(ctx: S1Context, setup_id: str, layer: EncryptedLinear, setup: LinearSetup,
                  x: EncryptedTensor, x_bits: int, pre: LinearPrecomputation | None = None) -> EncryptedTensor:
    """SCVL (kind "conv") or SCT (kind "dense"): E(conv(x, K) + b) or E(K^T x + b).

    ``pre`` is this call's offline part (:func:`precompute_linear`); computed on the spot if absent.
    """
    geometry = layer.geometry
    if x.shape != geometry.in_shape:
        raise ShapeError(f"layer {layer.name}: input shape {x.shape}, expected {geometry.in_shape}")
    ctx.public_key.require_same(x.public_key, f"input of layer {layer.name}")
    pre = pre or precompute_linear(ctx, layer, setup, x_bits)
    msg = reveal_message(ctx, "x", x, x_bits, pre.masks)
    msg.meta.update({"setup_id": setup_id, "layer": layer.name})
    reply = ctx.channel.request(STEP, msg)

    idx = geometry.column_indices()
    p_count, c_count = idx.shape[0], layer.weight.shape[1]
    y = read_ciphertexts(ctx.public_key, reply, "y", (p_count, c_count))
    ctx.count("exp_online", p_count * idx.shape[1] * c_count)
    out = y.sub(x.take(idx).matmul_plain(setup.masks, ctx.workers)).sub(pre.a_term)
    out = out.add(EncryptedTensor(ctx.public_key, np.broadcast_to(layer.bias.data, out.shape).copy()))
    # (P, C) -> channel-first output
    return EncryptedTensor(ctx.public_key, out.data.T.copy()).reshape(layer.out_shape)


def s2_linear(cloud: "KeyCloud", msg: Message) -> Message:
    weights, geometry = cloud.setup_layer(msg.get("setup_id", str), msg.get("layer", str))
    values, _ = read_revealed(cloud, msg, "x")
    expected = int(np.prod(geometry.in_shape))
    if len(values) != expected:
        raise ShapeError(f"layer input has {len(values)} elements, expected {expected} ({geometry.in_shape})")
    idx = geometry.column_indices()
    padded = np.array(values + [0], dtype=object)
    x_cols = padded[np.where(idx < 0, len(values), idx)]
    return encrypted_reply(cloud, {"y": np.dot(x_cols, weights).reshape(-1)})
