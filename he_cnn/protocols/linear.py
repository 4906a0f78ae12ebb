"""SCVL and SCT: convolution and dense layer of an encrypted input by encrypted weights.

Both are one bilinear map ``Y = X_cols @ K`` (X_cols the (P, F) im2col matrix of the input, K the
(F, C) weight matrix), computed with a batched SMP whose weight mask is fixed per model:

Set-up, once per model (step ``linear_setup``, one round for all layers):
  1. S1 draws a mask B (|K| < 2^lw, B = 2^lw + r as in :mod:`.common`) per layer, reveals K + B.
  2. S2 keeps Kt = K + B in the clear under a set-up id; S1 keeps B and E(Kt) = E(K) + B.
Online, per layer (two rounds):
  1. (step ``linear``) S1 draws a fresh mask A for the input X (|X| < 2^lx) and reveals X + A (the
     tensor, not im2col). Sibling layers (several layers on the same input, as in an Inception block)
     share one A: the first reveals X + A and asks S2 to keep it for the others (``x_keep``), which
     send only the ticket S2 returned (``x_ticket``) -- one reveal instead of one per sibling, and S2
     sees one masked copy of X instead of several. S2 builds Xt_cols from X + A (zero padding),
     computes Y = Xt_cols @ Kt in the clear and keeps it under a ticket. It returns fresh encryptions
     of Xt_cols *packed along the positions*: for each group of k positions and each tap f one ciphertext
     E(sum_j Xt_cols[p_j, f] 2^(s j)), slots of s = lc + kappa + 3 bits, lc the cross-term bound below.
  2. S1 turns each pack into E(sum_j (X_cols[p_j, f] + 2^lx) 2^(s j)) by subtracting the packed
     A_cols - 2^lx (one multiplication), and raises the packs to B: one exponentiation now serves k
     multiply-accumulates (SIMD), giving per position group and channel c the packed
     Z[p, c] = sum_f (X_cols[p, f] + 2^lx) B[f, c] = (X_cols B)[p, c] + 2^lx sum_f B[f, c],
     0 <= Z < 2^lc with lc = lx + 1 + bits(B) + ceil(log2 F).
  3. (step ``linear_cross``) S1 reveals the packs of Z masked slot by slot (M = 2^lc + r, fresh, as any
     reveal) with the ticket. S2 unpacks Z + M and returns fresh E(Y - Z - M) per output.
  4. S1: E(X_cols K) = E(Y - Z - M) - E(A_cols Kt) + M + 2^lx sum_f B[f, c], then adds E(b).
     (Xt_cols Kt = X K + X B + A Kt.) ``E(A_cols Kt)`` does not depend on the query and is computed
     before the query arrives (:func:`precompute_linear`).

Cost per multiply-accumulate: S1 one exponentiation by a (lw + kappa + 2)-bit exponent per k of them
online (Straus, shared squarings) and one by an (lx + kappa + 2)-bit exponent that is
query-independent. Per input element S1 ~lx + kappa squarings (packing), S2 one decryption per pack;
per (position group, tap) S2 one encryption; per (position group, channel) S1 one re-randomisation and
S2 one decryption; per output S2 one encryption and S1 three multiplications (the query-independent
term is negated offline).
S1 learns: nothing.  S2 learns: K + B once per model, X + A (once per input tensor) and Z + M per
query, each statistically independent of K, X and Z (distance 2^-kappa per element); the layer
geometry and the bit bounds.
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np

from he_cnn.errors import ProtocolError, ShapeError
from he_cnn.geometry import conv_output_hw, im2col_indices, pair
from he_cnn.crypto.paillier import KAPPA
from he_cnn.crypto.tensor import EncryptedTensor, as_int_array
from he_cnn.wire import Message
from he_cnn.protocols.common import (S1Context, encrypted_reply, pack_plain, read_ciphertexts, read_revealed, reveal_message,
                     reveal_packs, sample_masks, slot_bits, slots_per_pack)

if TYPE_CHECKING:
    from he_cnn.parties.key_cloud import KeyCloud

SETUP_STEP = "linear_setup"
STEP = "linear"
CROSS_STEP = "linear_cross"


@dataclass(frozen=True)
class LinearGeometry:
    """The protocol's view of a linear layer: which input elements each output position reads.

    A (C, H, W) input is read through a ``kernel`` window (kh, kw), with a stride and zero padding
    per axis: a convolution. A flat (F,) input is read whole by a single position: a dense layer.
    The layer catalogue (:mod:`he_cnn.graph.layers`) builds the geometry of each of its linear kinds.
    """

    in_shape: tuple[int, ...]
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)

    def __post_init__(self) -> None:
        for name in ("kernel", "stride", "padding"):
            object.__setattr__(self, name, pair(getattr(self, name)))

    def column_indices(self) -> np.ndarray:
        """(P, F) flat input indices per output position and weight row; -1 is zero padding."""
        if len(self.in_shape) == 1:
            return np.arange(self.in_shape[0], dtype=np.int64).reshape(1, -1)
        return im2col_indices(self.in_shape, self.kernel, self.stride, self.padding)

    def matrix_shape(self) -> tuple[int, int]:
        """(P, F) of :meth:`column_indices`, without building it."""
        if len(self.in_shape) == 1:
            return 1, self.in_shape[0]
        oh, ow = conv_output_hw(self.in_shape[1], self.in_shape[2], self.kernel, self.stride, self.padding)
        return oh * ow, self.in_shape[0] * self.kernel[0] * self.kernel[1]

    def out_shape(self, channels: int) -> tuple[int, ...]:
        if len(self.in_shape) == 1:
            return (channels,)
        return (channels, *conv_output_hw(self.in_shape[1], self.in_shape[2], self.kernel, self.stride, self.padding))

    def to_dict(self) -> dict:
        return {"in_shape": list(self.in_shape), "kernel": list(self.kernel), "stride": list(self.stride),
                "padding": list(self.padding)}

    @classmethod
    def from_dict(cls, d: dict) -> "LinearGeometry":
        try:
            if set(d) != {"in_shape", "kernel", "stride", "padding"}:
                raise KeyError(f"fields {sorted(map(str, d))[:6]}")
            values = [d["in_shape"], d["kernel"], d["stride"], d["padding"]]
            sizes = [v if isinstance(v, list) else [v, v] for v in values[1:]]  # one int (square) or a pair
            if not isinstance(values[0], list) or not all(type(v) is int for v in values[0] + sum(sizes, [])) \
                    or not all(len(v) == 2 for v in sizes):
                raise TypeError("not integers")
            g = cls(tuple(values[0]), *[tuple(v) for v in sizes])
        except (KeyError, TypeError) as e:
            raise ProtocolError(f"malformed layer geometry {str(d)[:200]}") from e
        flat = len(g.in_shape) == 1 and (g.kernel, g.stride, g.padding) == ((1, 1), (1, 1), (0, 0))
        window = len(g.in_shape) == 3 and all(
            k >= 1 and s >= 1 and 0 <= p < k and n + 2 * p >= k
            for k, s, p, n in zip(g.kernel, g.stride, g.padding, g.in_shape[1:]))
        if not (flat or window) or min(g.in_shape) < 1:
            raise ProtocolError(f"inconsistent layer geometry {str(d)[:200]}")
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
    """The query-independent part of one SCVL/SCT call: the input mask A and E(-A_cols @ Kt), (P, C)
    (negated offline, so the online step multiplies instead of inverting)."""

    masks: list[int]
    neg_a_term: EncryptedTensor


@dataclass
class SharedInput:
    """One input tensor's reveal X + A, shared by the sibling layers that read it (in order).

    ``uses`` is the number of siblings after the first; the first layer's call sets ``ticket`` (S2
    keeps X + A under it), the later ones send the ticket instead of revealing X again. All of them
    must be precomputed with the same masks A (``precompute_linear(..., masks=...)``).
    """

    uses: int
    ticket: str | None = None


#: the most siblings one reveal may serve (S2 refuses to keep an input for more)
MAX_SHARED_USES = 16


def precompute_linear(ctx: S1Context, layer: EncryptedLinear, setup: LinearSetup, x_bits: int,
                      masks: list[int] | None = None) -> LinearPrecomputation:
    """Offline: draw the input mask A for one future query (or take a sibling's) and compute
    E(A_cols @ (K + B))."""
    size = int(np.prod(layer.geometry.in_shape))
    masks = sample_masks(size, x_bits, ctx.kappa) if masks is None else masks
    if len(masks) != size:
        raise ShapeError(f"layer {layer.name}: {len(masks)} input masks for {size} inputs")
    idx = layer.geometry.column_indices()
    mask_padded = np.array(masks + [0], dtype=object)
    a_cols = mask_padded[np.where(idx < 0, len(masks), idx)]
    # A_cols @ E(Kt) computed as (E(Kt)^T @ A_cols^T)^T
    with ctx.tracer.op("s1_cross"):
        a_term = EncryptedTensor(ctx.public_key, setup.masked_weight.data.T.copy()).matmul_plain(a_cols.T, ctx.workers)
    ctx.count("exp_offline", idx.shape[0] * idx.shape[1] * layer.weight.shape[1])
    with ctx.tracer.op("s1_combine"):
        return LinearPrecomputation(masks, EncryptedTensor(ctx.public_key, a_term.data.T.copy()).neg())


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
        with ctx.tracer.op("s1_combine"):
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


def cross_bits(x_bits: int, masks: np.ndarray) -> int:
    """lc: a bound on the slot values sum_f (x + 2^lx) B[f, c] (0 <= Z < 2^lc), for |x| < 2^x_bits."""
    fan_in = masks.shape[0]
    b_bits = max(int(v).bit_length() for v in masks.reshape(-1))
    return x_bits + 1 + b_bits + max(0, fan_in - 1).bit_length()


def cross_slot_bits(x_bits: int, weight_bits: int, fan_in: int) -> int:
    """The packing slot of a layer's cross terms before its set-up is drawn: lc for the largest weight
    mask (|K| < 2^weight_bits, so B < 2^(weight_bits + kappa + 2)), plus the reveal's kappa + 3."""
    b_bits = weight_bits + KAPPA + 2
    return slot_bits(x_bits + 1 + b_bits + max(0, fan_in - 1).bit_length(), KAPPA)


def _pack_rows(values: np.ndarray, k: int, slot: int) -> np.ndarray:
    """(P, F) integers -> (ceil(P / k), F) plaintexts sum_j values[g k + j, f] 2^(slot j) (slots past
    P are zero)."""
    p_count, f_count = values.shape
    groups = -(-p_count // k)
    padded = np.zeros((groups * k, f_count), dtype=object)
    padded[:p_count] = values
    by_pack = padded.reshape(groups, k, f_count).transpose(0, 2, 1).reshape(groups * f_count, k)
    return pack_plain(by_pack, slot).reshape(groups, f_count)


def secure_linear(ctx: S1Context, setup_id: str, layer: EncryptedLinear, setup: LinearSetup,
                  x: EncryptedTensor, x_bits: int, pre: LinearPrecomputation | None = None,
                  shared: SharedInput | None = None) -> EncryptedTensor:
    """SCVL (kind "conv") or SCT (kind "dense"): E(conv(x, K) + b) or E(K^T x + b).

    ``pre`` is this call's offline part (:func:`precompute_linear`); computed on the spot if absent.
    ``shared`` makes the reveal of x serve sibling layers too (see :class:`SharedInput`); ``pre``
    must then carry the masks of the first sibling.
    """
    geometry = layer.geometry
    if x.shape != geometry.in_shape:
        raise ShapeError(f"layer {layer.name}: input shape {x.shape}, expected {geometry.in_shape}")
    pk = ctx.public_key
    pk.require_same(x.public_key, f"input of layer {layer.name}")
    if pre is None:
        if shared is not None and shared.ticket is not None:
            raise ProtocolError(f"layer {layer.name} reuses a sibling's input: it needs the sibling's masks (pre)")
        pre = precompute_linear(ctx, layer, setup, x_bits)
    idx = geometry.column_indices()
    (p_count, f_count), c_count = idx.shape, layer.weight.shape[1]
    lc = cross_bits(x_bits, setup.masks)
    slot = slot_bits(lc, ctx.kappa)
    k = slots_per_pack(pk.bits, slot)
    groups = -(-p_count // k)

    # round 1: X + A (or a sibling's ticket for it); S2 keeps Y = Xt_cols Kt and returns Xt_cols packed
    # along positions
    if shared is not None and shared.ticket is not None:
        msg = Message(meta={"x_ticket": shared.ticket, "kappa": ctx.kappa})
    else:
        msg = reveal_message(ctx, "x", x, x_bits, pre.masks)
        if shared is not None and shared.uses:
            msg.meta["x_keep"] = shared.uses
    msg.meta.update({"setup_id": setup_id, "layer": layer.name, "cross_bits": lc})
    reply = ctx.channel.request(STEP, msg)
    ticket = reply.get("ticket", str)
    if shared is not None and shared.ticket is None and shared.uses:
        shared.ticket = reply.get("x_ticket", str)
    with ctx.tracer.op("s1_validate"):
        cols = read_ciphertexts(pk, reply, "cols", (groups, f_count))

    # S1: packs of X_cols + 2^lx, raised to B -> packs of Z, masked
    offset = 1 << x_bits
    a_cols = np.array(pre.masks + [0], dtype=object)[np.where(idx < 0, len(pre.masks), idx)]
    with ctx.tracer.op("s1_combine"):
        cols = cols.sub(_pack_rows(a_cols - offset, k, slot))
    ctx.count("exp_online", groups * f_count * c_count)
    with ctx.tracer.op("s1_cross"):
        z = cols.matmul_plain(setup.masks, ctx.workers)  # (groups, C) packs
    z_masks = np.array(sample_masks(c_count * groups * k, lc, ctx.kappa), dtype=object).reshape(c_count, groups * k)
    # packs and masks in the order (c, group)
    msg2 = reveal_packs(ctx, "z", z.data.T.reshape(-1), z_masks.reshape(c_count * groups, k), lc)
    msg2.meta["ticket"] = ticket

    # round 2: S2 returns E(Y - Z - M) per output
    reply2 = ctx.channel.request(CROSS_STEP, msg2)
    with ctx.tracer.op("s1_validate"):
        out = read_ciphertexts(pk, reply2, "y", (p_count, c_count))
    m = z_masks[:, :p_count].T  # (P, C)
    with ctx.tracer.op("s1_combine"):
        out = out.add(pre.neg_a_term)
        out = out.add(m + offset * setup.masks.sum(axis=0))
        out = out.add(EncryptedTensor(pk, np.broadcast_to(layer.bias.data, out.shape).copy()))
    # (P, C) -> channel-first output
    return EncryptedTensor(pk, out.data.T.copy()).reshape(layer.out_shape)


def s2_linear(cloud: "KeyCloud", msg: Message) -> Message:
    weights, geometry = cloud.setup_layer(msg.get("setup_id", str), msg.get("layer", str))
    keep = msg.get("x_keep", int) if "x_keep" in msg.meta else 0
    if not 0 <= keep <= MAX_SHARED_USES:
        raise ProtocolError(f"an input can be kept for at most {MAX_SHARED_USES} sibling layers, not {keep}")
    if "x_ticket" in msg.meta:  # a sibling's input, revealed before
        values, x_bits = cloud.tickets.pop(msg.get("x_ticket", str), "linear_input")
    else:
        values, x_bits = read_revealed(cloud, msg, "x")
    expected = int(np.prod(geometry.in_shape))
    if len(values) != expected:
        raise ShapeError(f"layer input has {len(values)} elements, expected {expected} ({geometry.in_shape})")
    lc, kappa = msg.get("cross_bits", int), msg.get("kappa", int)
    if not x_bits < lc <= cloud.keys.public.bits or kappa < KAPPA:
        raise ProtocolError(f"cross-term bound of {lc} bits (kappa {kappa}) out of range for {x_bits}-bit inputs")
    meta: dict = {}
    if keep and "x_ticket" not in msg.meta:
        meta["x_ticket"] = cloud.tickets.put("linear_input", (values, x_bits), uses=keep)
    slot = slot_bits(lc, kappa)
    idx = geometry.column_indices()
    k = slots_per_pack(cloud.keys.public.bits, slot)
    with cloud.tracer.op("s2_plain"):
        padded = np.array(values + [0], dtype=object)
        x_cols = padded[np.where(idx < 0, len(values), idx)]
        y = np.dot(x_cols, weights)
        cols = _pack_rows(x_cols, k, slot)
    meta["ticket"] = cloud.tickets.put("linear", (y, slot))
    return encrypted_reply(cloud, {"cols": cols.reshape(-1)}, meta, shapes={"cols": cols.shape})


def s2_linear_cross(cloud: "KeyCloud", msg: Message) -> Message:
    y, slot = cloud.tickets.pop(msg.get("ticket", str), "linear")
    z, lc = read_revealed(cloud, msg, "z")
    p_count, c_count = y.shape
    if slot != slot_bits(lc, msg.get("kappa", int)):
        raise ProtocolError(f"cross terms of {lc} bits do not match the packs S2 sent")
    per = len(z) // c_count
    if len(z) != per * c_count or not p_count <= per < p_count + slots_per_pack(cloud.keys.public.bits, slot):
        raise ShapeError(f"{len(z)} cross terms do not fit {p_count} positions x {c_count} channels")
    zt = np.array(z, dtype=object).reshape(c_count, per)[:, :p_count].T
    return encrypted_reply(cloud, {"y": (y - zt).reshape(-1)})
