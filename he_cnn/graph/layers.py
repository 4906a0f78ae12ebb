"""The layer catalogue: every kind of layer he-cnn knows, each defined once, as one class.

A layer kind is a frozen dataclass deriving from :class:`Layer`; defining the class registers it
under its ``kind``. The class carries everything about the kind, and every part of he-cnn looks the
kind up here instead of keeping a table of its own:

* **fields** (:func:`param`): each with its reader for files and specs; ``private`` fields (weights)
  exist only on the owner's side and never enter the public spec; ``derived`` fields (a convolution's
  kernel size, channels, weight bit length) follow from the private ones where those are present and
  are read from the spec where they are not (at S1, which holds only the architecture);
* :meth:`Layer.out_shape` - the output shape for the input shapes, and the check that they fit;
* :meth:`Layer.interval` - per-channel worst-case ``[lo, hi]`` of the output (the bound the secure
  comparisons rely on);
* :meth:`Layer.evaluate` - the exact plaintext integer evaluation (the reference);
* :meth:`Layer.to_spec` / :func:`layer_from_spec` - the public spec on the wire, checked on receipt;
* :meth:`Layer.secure` - the secure evaluation at S1 (which protocol it calls);
* :meth:`Layer.cost` - what that secure evaluation costs, for the lower bound and the cost model.

Layers (all integer, no rounding anywhere after quantisation):

- ``Conv``   out[c,i,j] = sum_{k,u,v} w[c,k,u,v] * in_padded[k, i*sh+u, j*sw+v] + b[c]   (zero padding; SCVL)
- ``Dense``  out[o] = sum_f w[o,f] * in[f] + b[o]   (SCT)
- ``ReLU``   out = max(in, 0) >> shift   (SACT)
- ``MaxPool`` window maxima of in >> shift; padded positions are left out (torch's -inf padding; SMAP)
- ``SumPool`` window sums with zero padding (an average pool with its 1/area in the scale; local)
- ``Add``    element-wise sum at one scale (residual joins; local)
- ``Scale``  x * factor, a public integer (aligns the scales an add or a concat joins; local)
- ``Pad``    zero padding (local)
- ``Concat`` channel-wise concatenation (branches already share one scale)
- ``Flatten`` (C,H,W) -> (C*H*W,) in C order

Kernels, strides and paddings are (h, w) pairs (one int in a spec means a square window).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Sequence

import numpy as np

from he_cnn.crypto.tensor import EncryptedTensor
from he_cnn.errors import BadRequest, ShapeError, UnsupportedLayer
from he_cnn.graph import parse
from he_cnn.geometry import (conv_output_hw, im2col_indices, maxpool_comparisons, pad_indices, pair, pool_windows,
                             window_indices)
from he_cnn.protocols.comparison import secure_maxpool, secure_relu
from he_cnn.protocols.linear import LinearGeometry, secure_linear

if TYPE_CHECKING:
    from he_cnn.parties.compute_cloud import SecureRun

#: per channel (per feature of a 1-D tensor): the lowest and the highest value
Interval = tuple[list[int], list[int]]

#: the widest zero padding a layer may add on one side
MAX_PAD = 1024

#: kind name -> layer class; filled by defining the classes
LAYER_KINDS: dict[str, type["Layer"]] = {}


def param(read: parse.Reader, *, default: Any = dataclasses.MISSING, private: bool = False,
          derived: bool = False) -> Any:
    """A layer field with its reader; see the module docstring for ``private`` and ``derived``."""
    return dataclasses.field(default=default, metadata={"read": read, "private": private, "derived": derived})


@dataclass(frozen=True)
class Cost:
    """The protocol work one secure evaluation of a layer needs, in the units the lower bound prices.

    ``linear``: (positions P, taps F, channels C, input elements, input bits) of a packed linear layer
    (SCVL/SCT); ``passes``: (elements, revealed bits, compared low bits) per batched comparison pass
    (a ReLU compares l + 1 bits; a max, the difference, one more; a truncation by k bits compares
    only the k low bits of each element).
    """

    linear: tuple[int, int, int, int, int] | None = None
    passes: tuple[tuple[int, int, int], ...] = ()


@dataclass(frozen=True, eq=False)
class Layer:
    """The base of every layer kind; a subclass with a ``kind`` is registered in :data:`LAYER_KINDS`."""

    kind: ClassVar[str] = ""
    #: whether the layer runs a protocol with S2 (local layers are not timed separately)
    interactive: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.kind:
            known = LAYER_KINDS.get(cls.kind)
            if known is not None and known.__qualname__ != cls.__qualname__:
                raise TypeError(f"layer kind {cls.kind!r} is defined twice: {known.__qualname__}, {cls.__qualname__}")
            LAYER_KINDS[cls.kind] = cls

    # -- wiring ------------------------------------------------------------------------------------
    def sources(self) -> tuple[str, ...]:
        """The tensors this layer reads."""
        return (self.input,)  # type: ignore[attr-defined]

    # -- what every kind provides --------------------------------------------------------------------
    def out_shape(self, in_shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
        """The output shape for these input shapes; :class:`ShapeError` where they do not fit."""
        raise NotImplementedError

    def interval(self, in_shapes: list[tuple[int, ...]], ins: list[Interval]) -> Interval:
        """Per-channel [lo, hi] of the output, given the inputs' (interval arithmetic)."""
        raise NotImplementedError

    def evaluate(self, xs: list[np.ndarray]) -> np.ndarray:
        """The exact integer output for plaintext inputs (object arrays of Python ints)."""
        raise NotImplementedError

    def secure(self, run: "SecureRun", xs: list[EncryptedTensor]) -> EncryptedTensor:
        """E(output) from E(inputs), at S1, with S2 through ``run.ctx``'s channel."""
        raise NotImplementedError

    def cost(self, in_shapes: list[tuple[int, ...]], in_bits: list[int]) -> Cost:
        """What :meth:`secure` costs for these input shapes and bit bounds."""
        return Cost()

    # -- fields, files and specs (generic) -----------------------------------------------------------
    @classmethod
    def _fields(cls) -> tuple[dataclasses.Field, ...]:
        return dataclasses.fields(cls)

    def public(self) -> "Layer":
        """The same layer without its private fields (weights): what S1 may hold."""
        return dataclasses.replace(self, **{f.name: None for f in self._fields() if f.metadata.get("private")})

    @property
    def has_private(self) -> bool:
        return all(getattr(self, f.name) is not None for f in self._fields() if f.metadata.get("private"))

    def to_spec(self) -> dict[str, Any]:
        """The public spec entry: kind and every non-private field."""
        entry: dict[str, Any] = {"kind": self.kind}
        for f in self._fields():
            if not f.metadata.get("private"):
                value = getattr(self, f.name)
                entry[f.name] = list(value) if isinstance(value, tuple) else value
        return entry

    def to_file(self) -> dict[str, Any]:
        """The owner's file entry: every field but the derived ones (loading re-derives them)."""
        entry: dict[str, Any] = {"type": type(self).__name__}
        for f in self._fields():
            if not f.metadata.get("derived"):
                value = getattr(self, f.name)
                if isinstance(value, np.ndarray):
                    value = parse.array_to_json(value)
                elif isinstance(value, tuple):
                    value = list(value)
                entry[f.name] = value
        return entry

    @classmethod
    def read(cls, fields: dict[str, Any], what: str, *, spec: bool) -> "Layer":
        """A layer of this kind from a spec entry (``spec``: public fields only, every one present:
        the sender writes them all) or a file entry (every field but the derived ones; absent ones
        take their defaults), each field checked by its reader."""
        allowed = {f.name: f for f in cls._fields()
                   if not f.metadata.get("private" if spec else "derived")}
        unknown = set(fields) - set(allowed) - {"type", "kind"}
        if unknown:
            raise BadRequest(f"{what}: unexpected fields {sorted(unknown)}")
        values = {}
        for name, f in allowed.items():
            if name not in fields:
                if spec or f.default is dataclasses.MISSING:
                    raise BadRequest(f"{what}: missing field {name!r}")
                continue
            values[name] = f.metadata["read"](fields[name], f"{what} field {name!r}")
        try:
            return cls(**values)
        except (TypeError, ValueError) as e:
            raise BadRequest(f"{what}: {e}") from e


def layer_from_spec(entry: Any, what: str = "layer") -> Layer:
    """A public layer from its spec entry (as S1 and S2 receive it), checked field by field."""
    fields = parse.expect_dict(entry, what)
    cls = LAYER_KINDS.get(fields.get("kind")) if isinstance(fields.get("kind"), str) else None
    if cls is None:
        raise UnsupportedLayer(f"{what}: kind {parse.shown(fields.get('kind'))} is not supported; "
                               f"expected one of {', '.join(LAYER_KINDS)}")
    return cls.read(fields, f"{what} ({cls.kind})", spec=True)


def layer_from_file(entry: Any, what: str = "layer") -> Layer:
    """A layer with its weights from the owner's integer-model file."""
    fields = parse.expect_dict(entry, what)
    by_type = {cls.__name__: cls for cls in LAYER_KINDS.values()}
    cls = by_type.get(fields.get("type")) if isinstance(fields.get("type"), str) else None
    if cls is None:
        raise BadRequest(f"{what}: type {parse.shown(fields.get('type'))} is not one of {', '.join(by_type)}")
    return cls.read(fields, f"{what} ({cls.__name__})", spec=False)


def check_kind(layer: Any) -> None:
    """:class:`UnsupportedLayer` unless ``layer`` is of a registered kind."""
    if not isinstance(layer, Layer) or LAYER_KINDS.get(layer.kind) is not type(layer):
        raise UnsupportedLayer(f"layer {getattr(layer, 'name', layer)!r} of type {type(layer).__name__} is not "
                               f"supported; expected one of {', '.join(LAYER_KINDS)}")


def _max_bits(values: np.ndarray) -> int:
    return max((abs(int(v)) for v in values.reshape(-1)), default=0).bit_length()


def _linear_interval(weight: np.ndarray, bias: np.ndarray, lo: list[int], hi: list[int]) -> Interval:
    """Per-output [lo, hi] of ``weight @ x + bias`` for x[i] in [lo[i], hi[i]]; ``weight`` is
    (outputs, inputs, taps), each tap of input i ranging over [lo[i], hi[i]]."""
    out_lo, out_hi = [], []
    for o in range(weight.shape[0]):
        low = high = int(bias[o])
        for i in range(weight.shape[1]):
            pos = sum(int(v) for v in weight[o, i].ravel() if v > 0)
            neg = sum(int(v) for v in weight[o, i].ravel() if v < 0)
            low += pos * lo[i] + neg * hi[i]
            high += pos * hi[i] + neg * lo[i]
        out_lo.append(low)
        out_hi.append(high)
    return out_lo, out_hi


@dataclass(frozen=True, eq=False)
class LinearLayer(Layer):
    """A layer computed by the packed secure linear protocol (SCVL/SCT): its weights are encrypted
    by the owner, masked once per model at set-up, and its input is revealed masked per query."""

    def geometry(self, in_shape: tuple[int, ...]) -> LinearGeometry:
        """The protocol's view of the layer on this input: which inputs each output position reads."""
        raise NotImplementedError

    def weight_matrix(self) -> np.ndarray:
        """The weights as the (taps F, channels C) matrix the protocol multiplies by."""
        raise NotImplementedError

    def _check_weights(self, rank: int) -> None:
        weight, bias = self.weight, self.bias  # type: ignore[attr-defined]
        if weight is None or bias is None:
            if weight is not None or bias is not None:
                raise ShapeError(f"{self.name}: give both weight and bias, or neither")  # type: ignore[attr-defined]
            return
        if not isinstance(weight, np.ndarray) or weight.ndim != rank:
            raise ShapeError(f"layer {self.name!r}: weight of shape {np.shape(weight)} has the wrong rank")  # type: ignore[attr-defined]
        if not isinstance(bias, np.ndarray) or bias.shape != (weight.shape[0],):
            raise ShapeError(f"{self.name}: bias shape {np.shape(bias)}, expected ({weight.shape[0]},)")  # type: ignore[attr-defined]
        object.__setattr__(self, "channels", int(weight.shape[0]))
        object.__setattr__(self, "weight_bits", max(1, _max_bits(weight)))

    def _public_parameters_given(self) -> None:
        if self.weight is None and (self.channels < 1 or self.weight_bits < 1):  # type: ignore[attr-defined]
            raise ShapeError(f"{self.name}: a layer without weights needs channels and weight_bits")  # type: ignore[attr-defined]

    def secure(self, run: "SecureRun", xs: list[EncryptedTensor]) -> EncryptedTensor:
        """SCVL / SCT (:func:`~he_cnn.protocols.linear.secure_linear`)."""
        encrypted = run.model.linear[self.name]  # type: ignore[attr-defined]
        return secure_linear(run.ctx, run.setup.setup_id, encrypted, run.setup.layers[self.name],  # type: ignore[attr-defined]
                             xs[0], run.bits(self.input), run.precomputation(self),  # type: ignore[attr-defined]
                             run.shared_input(self.input))  # type: ignore[attr-defined]

    def cost(self, in_shapes: list[tuple[int, ...]], in_bits: list[int]) -> Cost:
        positions, taps = self.geometry(in_shapes[0]).matrix_shape()
        return Cost(linear=(positions, taps, self.channels, math.prod(in_shapes[0]), in_bits[0]))  # type: ignore[attr-defined]


@dataclass(frozen=True, eq=False)
class Conv(LinearLayer):
    """Convolution (SCVL): any kernel (kh, kw), a stride and symmetric zero padding per axis.
    (A grouped or depthwise convolution is compiled into this one with a block-diagonal kernel.)"""

    kind: ClassVar[str] = "conv"
    name: str = param(parse.text)
    input: str = param(parse.text)
    output: str = param(parse.text)
    weight: np.ndarray | None = param(parse.int_array(4), default=None, private=True)  # (C_out, C_in, kh, kw) ints
    bias: np.ndarray | None = param(parse.int_array(1), default=None, private=True)  # (C_out,)
    stride: tuple[int, int] = param(parse.pair_of(parse.positive_int), default=(1, 1))
    padding: tuple[int, int] = param(parse.pair_of(parse.non_negative_int), default=(0, 0))
    kernel: tuple[int, int] = param(parse.pair_of(parse.positive_int), default=(0, 0), derived=True)
    channels: int = param(parse.positive_int, default=0, derived=True)
    weight_bits: int = param(parse.int_in(1, 64), default=0, derived=True)

    def __post_init__(self) -> None:
        self._check_weights(4)
        if self.weight is not None:
            object.__setattr__(self, "kernel", tuple(int(v) for v in self.weight.shape[2:]))
        _set_pairs(self, "kernel", "stride", "padding")
        self._public_parameters_given()
        if min(self.kernel) < 1:
            raise ShapeError(f"{self.name}: a convolution needs a kernel size")

    def out_shape(self, in_shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
        shape = in_shapes[0]
        fits_channels = self.weight is None or (len(shape) == 3 and shape[0] == self.weight.shape[1])
        if len(shape) != 3 or not fits_channels or not all(
                s >= 1 and 0 <= p < k and n + 2 * p >= k
                for k, s, p, n in zip(self.kernel, self.stride, self.padding, shape[1:])):
            what = f"kernel {self.weight.shape}" if self.weight is not None else f"kernel {self.kernel}"
            raise ShapeError(f"{self.name}: {what} stride {self.stride} pad {self.padding} does not fit input {shape}")
        return (self.channels, *conv_output_hw(shape[1], shape[2], self.kernel, self.stride, self.padding))

    def interval(self, in_shapes: list[tuple[int, ...]], ins: list[Interval]) -> Interval:
        lo, hi = _with_zero(ins[0]) if any(self.padding) else ins[0]  # zero padding reads 0 too
        c_out, c_in = self.weight.shape[:2]
        return _linear_interval(self.weight.reshape(c_out, c_in, -1), self.bias, lo, hi)

    def evaluate(self, xs: list[np.ndarray]) -> np.ndarray:
        x = xs[0]
        index = _frozen_index(im2col_indices, x.shape, self.kernel, self.stride, self.padding)
        padded = np.append(x.ravel(), 0)  # index -1 (zero padding) reads this trailing 0
        out = padded[index].dot(self.weight.reshape(self.channels, -1).T)  # (positions, c_out)
        oh, ow = conv_output_hw(x.shape[1], x.shape[2], self.kernel, self.stride, self.padding)
        return out.T.reshape(self.channels, oh, ow) + self.bias[:, None, None]

    def geometry(self, in_shape: tuple[int, ...]) -> LinearGeometry:
        return LinearGeometry(tuple(in_shape), self.kernel, self.stride, self.padding)

    def weight_matrix(self) -> np.ndarray:
        return np.ascontiguousarray(self.weight.reshape(self.channels, -1).T)


@dataclass(frozen=True, eq=False)
class Dense(LinearLayer):
    """Dense layer (SCT) over a flat input."""

    kind: ClassVar[str] = "dense"
    name: str = param(parse.text)
    input: str = param(parse.text)
    output: str = param(parse.text)
    weight: np.ndarray | None = param(parse.int_array(2), default=None, private=True)  # (out, in) ints
    bias: np.ndarray | None = param(parse.int_array(1), default=None, private=True)  # (out,)
    channels: int = param(parse.positive_int, default=0, derived=True)
    weight_bits: int = param(parse.int_in(1, 64), default=0, derived=True)

    def __post_init__(self) -> None:
        self._check_weights(2)
        self._public_parameters_given()

    def out_shape(self, in_shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
        shape = in_shapes[0]
        if len(shape) != 1 or (self.weight is not None and shape != (self.weight.shape[1],)):
            what = f"weight {self.weight.shape}" if self.weight is not None else "a dense layer"
            raise ShapeError(f"{self.name}: {what} does not fit input {shape}")
        return (self.channels,)

    def interval(self, in_shapes: list[tuple[int, ...]], ins: list[Interval]) -> Interval:
        out_f, in_f = self.weight.shape
        return _linear_interval(self.weight.reshape(out_f, in_f, 1), self.bias, *ins[0])

    def evaluate(self, xs: list[np.ndarray]) -> np.ndarray:
        return self.weight.dot(xs[0]) + self.bias

    def geometry(self, in_shape: tuple[int, ...]) -> LinearGeometry:
        return LinearGeometry(tuple(in_shape))

    def weight_matrix(self) -> np.ndarray:
        return np.ascontiguousarray(self.weight.T)


@dataclass(frozen=True, eq=False)
class ReLU(Layer):
    """``max(x, 0) >> shift`` (SACT): with a shift the ReLU also requantises (an exact floor division
    by 2^shift), which keeps the activations, and so every later comparison, short."""

    kind: ClassVar[str] = "relu"
    name: str = param(parse.text)
    input: str = param(parse.text)
    output: str = param(parse.text)
    shift: int = param(parse.int_in(0, 4096), default=0)

    def out_shape(self, in_shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
        if self.shift < 0:
            raise ShapeError(f"{self.name}: negative shift {self.shift}")
        return in_shapes[0]

    def interval(self, in_shapes: list[tuple[int, ...]], ins: list[Interval]) -> Interval:
        lo, hi = ins[0]
        return [max(v, 0) >> self.shift for v in lo], [max(v, 0) >> self.shift for v in hi]

    def evaluate(self, xs: list[np.ndarray]) -> np.ndarray:
        return np.maximum(xs[0], 0) // (1 << self.shift)

    def secure(self, run: "SecureRun", xs: list[EncryptedTensor]) -> EncryptedTensor:
        """SACT (:func:`~he_cnn.protocols.comparison.secure_relu`)."""
        return secure_relu(run.ctx, xs[0], run.bits(self.input), self.shift)

    def cost(self, in_shapes: list[tuple[int, ...]], in_bits: list[int]) -> Cost:
        n, l = math.prod(in_shapes[0]), in_bits[0]
        shift = min(self.shift, l)
        passes = [(n, l, shift)] if shift else []
        passes += [(n, l - shift, l - shift)] if shift < l else []
        return Cost(passes=tuple(passes))


@dataclass(frozen=True, eq=False)
class Pool(Layer):
    """A pooling window over a (C, H, W) tensor, (h, w) kernel, stride and padding: the base of MaxPool
    and SumPool."""

    name: str = param(parse.text)
    input: str = param(parse.text)
    output: str = param(parse.text)
    kernel: tuple[int, int] = param(parse.pair_of(parse.positive_int))
    stride: tuple[int, int] = param(parse.pair_of(parse.positive_int))
    padding: tuple[int, int] = param(parse.pair_of(parse.non_negative_int), default=(0, 0))

    def __post_init__(self) -> None:
        _set_pairs(self, "kernel", "stride", "padding")

    def out_shape(self, in_shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
        shape = in_shapes[0]
        if len(shape) != 3 or not _window_fits(self.kernel, self.stride, self.padding, shape):
            raise ShapeError(f"{self.name}: pooling {self.kernel} stride {self.stride} pad {self.padding} "
                             f"does not fit input {shape}")
        return (shape[0], *conv_output_hw(shape[1], shape[2], self.kernel, self.stride, self.padding))


@dataclass(frozen=True, eq=False)
class MaxPool(Pool):
    """Window maxima of ``x >> shift`` (SMAP); the shift requantises first, exactly: a ReLU's shift
    moves here when truncating before the pool is cheaper, since relu(max(x)) >> k = relu(max(x >> k))."""

    kind: ClassVar[str] = "maxpool"
    shift: int = param(parse.int_in(0, 4096), default=0)

    def out_shape(self, in_shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
        if self.shift < 0:
            raise ShapeError(f"{self.name}: negative shift {self.shift}")
        return super().out_shape(in_shapes)

    def interval(self, in_shapes: list[tuple[int, ...]], ins: list[Interval]) -> Interval:
        lo, hi = ins[0]  # padded positions are left out of every window
        return [v >> self.shift for v in lo], [v >> self.shift for v in hi]

    def evaluate(self, xs: list[np.ndarray]) -> np.ndarray:
        x = xs[0] // (1 << self.shift)  # floor, also for negative values
        index = _frozen_index(_max_windows, x.shape, self.kernel, self.stride, self.padding)
        oh, ow = conv_output_hw(x.shape[1], x.shape[2], self.kernel, self.stride, self.padding)
        return x.ravel()[index].max(axis=1).reshape(x.shape[0], oh, ow)

    def secure(self, run: "SecureRun", xs: list[EncryptedTensor]) -> EncryptedTensor:
        """SMAP (:func:`~he_cnn.protocols.comparison.secure_maxpool`)."""
        return secure_maxpool(run.ctx, xs[0], self.kernel, self.stride, self.padding, run.bits(self.input),
                              self.shift)

    def cost(self, in_shapes: list[tuple[int, ...]], in_bits: list[int]) -> Cost:
        n, l = math.prod(in_shapes[0]), in_bits[0]
        shift = min(self.shift, l)
        comparisons = maxpool_comparisons(tuple(in_shapes[0]), self.kernel, self.stride, self.padding)
        passes = [(n, l, shift)] if shift else []
        return Cost(passes=tuple(passes + [(comparisons, l - shift + 1, l - shift + 1)]))


@dataclass(frozen=True, eq=False)
class SumPool(Pool):
    """Window sums with zero padding (local: ciphertext products, no protocol). An average pool is
    this sum with the 1 / (kh kw) folded into the tensor's scale; a global average pool is a sum
    over the whole (H, W) window."""

    kind: ClassVar[str] = "sumpool"
    interactive: ClassVar[bool] = False

    def interval(self, in_shapes: list[tuple[int, ...]], ins: list[Interval]) -> Interval:
        lo, hi = _with_zero(ins[0]) if any(self.padding) else ins[0]
        area = self.kernel[0] * self.kernel[1]
        return [v * area for v in lo], [v * area for v in hi]

    def _windows(self, shape: tuple[int, ...]) -> np.ndarray:
        return _frozen_index(window_indices, tuple(shape), self.kernel, self.stride, self.padding)

    def evaluate(self, xs: list[np.ndarray]) -> np.ndarray:
        x = xs[0]
        padded = np.append(x.ravel(), 0)
        return padded[self._windows(x.shape)].sum(axis=1).reshape(self.out_shape([x.shape]))

    def secure(self, run: "SecureRun", xs: list[EncryptedTensor]) -> EncryptedTensor:
        x = xs[0]
        return x.take(self._windows(x.shape)).sum(axis=1).reshape(*self.out_shape([x.shape]))


@dataclass(frozen=True, eq=False)
class Join(Layer):
    """A local layer that reads several tensors (already at one scale): the base of Add and Concat."""

    interactive: ClassVar[bool] = False
    name: str = param(parse.text)
    inputs: tuple[str, ...] = param(parse.text_tuple)
    output: str = param(parse.text)

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs", tuple(self.inputs))

    def sources(self) -> tuple[str, ...]:
        return self.inputs


@dataclass(frozen=True, eq=False)
class Add(Join):
    """Element-wise sum of equal-shaped tensors at one scale: a residual join (local: no protocol)."""

    kind: ClassVar[str] = "add"

    def out_shape(self, in_shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
        if len(in_shapes) < 2 or len(set(in_shapes)) != 1:
            raise ShapeError(f"{self.name}: added tensors must have one shape; got {in_shapes}")
        return in_shapes[0]

    def interval(self, in_shapes: list[tuple[int, ...]], ins: list[Interval]) -> Interval:
        return [sum(v) for v in zip(*(lo for lo, _ in ins))], [sum(v) for v in zip(*(hi for _, hi in ins))]

    def evaluate(self, xs: list[np.ndarray]) -> np.ndarray:
        return sum(xs[1:], xs[0])

    def secure(self, run: "SecureRun", xs: list[EncryptedTensor]) -> EncryptedTensor:
        total = xs[0]
        for x in xs[1:]:
            total = total.add(x)
        return total


@dataclass(frozen=True, eq=False)
class Scale(Layer):
    """``x * factor`` for a public integer factor: what aligns the scales of tensors that an add or a
    concatenation joins (local: one small exponentiation per element)."""

    kind: ClassVar[str] = "scale"
    interactive: ClassVar[bool] = False
    name: str = param(parse.text)
    input: str = param(parse.text)
    output: str = param(parse.text)
    factor: int = param(parse.int_in(1, 1 << 64))

    def out_shape(self, in_shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
        if self.factor < 1:
            raise ShapeError(f"{self.name}: scale factor {self.factor} is not positive")
        return in_shapes[0]

    def interval(self, in_shapes: list[tuple[int, ...]], ins: list[Interval]) -> Interval:
        lo, hi = ins[0]
        return [v * self.factor for v in lo], [v * self.factor for v in hi]

    def evaluate(self, xs: list[np.ndarray]) -> np.ndarray:
        return xs[0] * self.factor

    def secure(self, run: "SecureRun", xs: list[EncryptedTensor]) -> EncryptedTensor:
        return xs[0].mul_plain(self.factor)


@dataclass(frozen=True, eq=False)
class Pad(Layer):
    """Zero padding of a (C, H, W) tensor by (top, left, bottom, right) (local: no protocol)."""

    kind: ClassVar[str] = "pad"
    interactive: ClassVar[bool] = False
    name: str = param(parse.text)
    input: str = param(parse.text)
    output: str = param(parse.text)
    pads: tuple[int, ...] = param(parse.int_list)

    def __post_init__(self) -> None:
        object.__setattr__(self, "pads", tuple(self.pads))
        if len(self.pads) != 4 or min(self.pads) < 0 or max(self.pads) > MAX_PAD:
            raise ShapeError(f"{self.name}: pads must be 4 integers in [0, {MAX_PAD}] (top, left, bottom, right); "
                             f"got {list(self.pads)}")

    def out_shape(self, in_shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
        shape = in_shapes[0]
        if len(shape) != 3:
            raise ShapeError(f"{self.name}: zero padding expects a (C, H, W) input, got {shape}")
        top, left, bottom, right = self.pads
        return (shape[0], shape[1] + top + bottom, shape[2] + left + right)

    def interval(self, in_shapes: list[tuple[int, ...]], ins: list[Interval]) -> Interval:
        return _with_zero(ins[0]) if any(self.pads) else ins[0]

    def evaluate(self, xs: list[np.ndarray]) -> np.ndarray:
        padded = np.append(xs[0].ravel(), 0)
        return padded[pad_indices(xs[0].shape, self.pads)]

    def secure(self, run: "SecureRun", xs: list[EncryptedTensor]) -> EncryptedTensor:
        return xs[0].take(pad_indices(xs[0].shape, self.pads))


@dataclass(frozen=True, eq=False)
class Concat(Join):
    """Channel-wise concatenation (local: no protocol)."""

    kind: ClassVar[str] = "concat"

    def out_shape(self, in_shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
        if any(len(s) != 3 for s in in_shapes) or len({s[1:] for s in in_shapes}) != 1:
            raise ShapeError(f"{self.name}: concatenated inputs must share H, W; got {in_shapes}")
        return (sum(s[0] for s in in_shapes), *in_shapes[0][1:])

    def interval(self, in_shapes: list[tuple[int, ...]], ins: list[Interval]) -> Interval:
        return [v for lo, _ in ins for v in lo], [v for _, hi in ins for v in hi]

    def evaluate(self, xs: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(xs, axis=0)

    def secure(self, run: "SecureRun", xs: list[EncryptedTensor]) -> EncryptedTensor:
        return EncryptedTensor.concatenate(xs, axis=0)


@dataclass(frozen=True, eq=False)
class Flatten(Layer):
    """(C, H, W) -> (C*H*W,) in C order (local: no protocol)."""

    kind: ClassVar[str] = "flatten"
    interactive: ClassVar[bool] = False
    name: str = param(parse.text)
    input: str = param(parse.text)
    output: str = param(parse.text)

    def out_shape(self, in_shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
        return (math.prod(in_shapes[0]),)

    def interval(self, in_shapes: list[tuple[int, ...]], ins: list[Interval]) -> Interval:
        lo, hi = ins[0]
        shape = in_shapes[0]
        per = math.prod(shape[1:]) if len(shape) > 1 else 1
        return [v for v in lo for _ in range(per)], [v for v in hi for _ in range(per)]

    def evaluate(self, xs: list[np.ndarray]) -> np.ndarray:
        return xs[0].reshape(-1)

    def secure(self, run: "SecureRun", xs: list[EncryptedTensor]) -> EncryptedTensor:
        return xs[0].flatten()


def _set_pairs(layer: Layer, *names: str) -> None:
    """Store each window dimension as an (h, w) pair (given as one int or a pair)."""
    for name in names:
        object.__setattr__(layer, name, pair(getattr(layer, name)))


def _window_fits(kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int],
                 shape: tuple[int, ...]) -> bool:
    """A pooling window: at least one cell, padding at most half the window, no wider than the input."""
    return all(k >= 1 and s >= 1 and 0 <= 2 * p <= k and n + 2 * p >= k
               for k, s, p, n in zip(kernel, stride, padding, shape[1:]))


def _with_zero(interval: Interval) -> Interval:
    """The interval widened to include 0 (what zero padding adds to every channel)."""
    lo, hi = interval
    return [min(v, 0) for v in lo], [max(v, 0) for v in hi]


@lru_cache(maxsize=192)
def _frozen_index(build: Callable[..., np.ndarray], shape: tuple[int, int, int], kernel: tuple[int, int],
                  stride: tuple[int, int], padding: tuple[int, int]) -> np.ndarray:
    """``build``'s index table for this geometry, computed once and read-only (the reference reuses it
    for every image)."""
    index = build(shape, kernel, stride, padding)
    index.setflags(write=False)
    return index


def _max_windows(shape: tuple[int, int, int], kernel: tuple[int, int], stride: tuple[int, int],
                 padding: tuple[int, int]) -> np.ndarray:
    """Pooling windows as a rectangular index matrix: short (padded) windows repeat their first
    element, which leaves their maximum unchanged."""
    windows = pool_windows(shape, kernel, stride, padding)
    width = kernel[0] * kernel[1]
    return np.array([w + [w[0]] * (width - len(w)) for w in windows], dtype=np.int64)


def linear_siblings(layers: Sequence[Layer]) -> dict[str, list[str]]:
    """Input tensor -> the linear layers that read it, in graph order, for every tensor two or more
    linear layers read (an Inception block's 1x1 reductions): they share one reveal of the input."""
    readers: dict[str, list[str]] = {}
    for layer in layers:
        if isinstance(layer, LinearLayer):
            readers.setdefault(layer.input, []).append(layer.name)  # type: ignore[attr-defined]
    return {tensor: names for tensor, names in readers.items() if len(names) > 1}
