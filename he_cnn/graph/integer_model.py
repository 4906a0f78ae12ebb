"""The integer model: a small, explicit graph of layers over named tensors.

Quantisation turns the trained torch ICNN into an :class:`IntegerModel`; the plaintext integer
reference (:mod:`he_cnn.reference`) and the secure engine (:mod:`he_cnn.secure_model`) both walk the
same graph, so they compute the same function by construction. Every tensor is channel-first
``(C, H, W)`` (or ``(F,)`` after a flatten) and holds exact Python integers; ``bounds`` gives, for each
tensor, a worst-case bound ``|v| <= bound`` proven by interval arithmetic from the input range and the
weights, which fixes the bit length the secure comparison works on.

Layers (all integer, no rounding anywhere after quantisation):

- ``Conv``   out[c,i,j] = sum_{k,u,v} w[c,k,u,v] * in_padded[k, i*s+u, j*s+v] + b[c]   (zero padding)
- ``Dense``  out[o] = sum_f w[o,f] * in[f] + b[o]
- ``ReLU``   out = max(in, 0)
- ``MaxPool`` max over each window; padded positions are ignored (as torch's -inf padding)
- ``Concat`` channel-wise concatenation (branches already share one scale)
- ``Flatten`` (C,H,W) -> (C*H*W,) in C order
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

import numpy as np

from he_cnn.errors import ShapeError, UnsupportedLayer


@dataclass(frozen=True)
class Conv:
    name: str
    input: str
    output: str
    weight: np.ndarray  # (C_out, C_in, kh, kw), dtype=object (Python ints)
    bias: np.ndarray  # (C_out,), dtype=object
    stride: int = 1
    padding: int = 0


@dataclass(frozen=True)
class Dense:
    name: str
    input: str
    output: str
    weight: np.ndarray  # (out, in), dtype=object
    bias: np.ndarray  # (out,), dtype=object


@dataclass(frozen=True)
class ReLU:
    """``max(x, 0) >> shift``: with a shift the ReLU also requantises (an exact floor division by
    2^shift), which keeps the activations, and so every later comparison, short."""

    name: str
    input: str
    output: str
    shift: int = 0


@dataclass(frozen=True)
class MaxPool:
    """Window maxima of ``x >> shift`` (the shift requantises first, exactly: a ReLU's shift moves
    here when truncating before the pool is cheaper, since relu(max(x)) >> k = relu(max(x >> k)))."""

    name: str
    input: str
    output: str
    kernel: int
    stride: int
    padding: int = 0
    shift: int = 0


@dataclass(frozen=True)
class Concat:
    name: str
    inputs: tuple[str, ...]
    output: str


@dataclass(frozen=True)
class Flatten:
    name: str
    input: str
    output: str


Layer = Union[Conv, Dense, ReLU, MaxPool, Concat, Flatten]
LINEAR_LAYERS = (Conv, Dense)
SUPPORTED_LAYERS = (Conv, Dense, ReLU, MaxPool, Concat, Flatten)


@dataclass(frozen=True)
class IntegerModel:
    """A quantised model: integer layers in execution order plus what is needed to use it.

    ``input_shape`` is (C, H, W); the user encodes pixels as integers in ``[0, input_max]``.
    ``shapes`` and ``bounds`` map every tensor name (including ``input`` and ``output``) to its shape
    and worst-case absolute bound. ``output`` is the name of the class-vector tensor.
    """

    layers: tuple[Layer, ...]
    input_shape: tuple[int, int, int]
    input_max: int
    input_name: str
    output: str
    num_classes: int
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    bounds: dict[str, int] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def layer(self, name: str) -> Layer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    def linear_layers(self) -> list[Union[Conv, Dense]]:
        return [layer for layer in self.layers if isinstance(layer, LINEAR_LAYERS)]


def conv_output_hw(h: int, w: int, kernel: int, stride: int, padding: int) -> tuple[int, int]:
    return (h + 2 * padding - kernel) // stride + 1, (w + 2 * padding - kernel) // stride + 1


def _linear_interval(weight: np.ndarray, bias: np.ndarray, lo: list[int], hi: list[int]) -> tuple[list[int], list[int]]:
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


def infer_shapes_and_bounds(
    layers: tuple[Layer, ...], input_name: str, input_shape: tuple[int, int, int], input_max: int
) -> tuple[dict[str, tuple[int, ...]], dict[str, int]]:
    """Shapes of every tensor, and worst-case bounds ``|v| <= bound`` by interval arithmetic.

    The intervals are kept per channel and two-sided ([lo, hi]: after a ReLU lo = 0, so only the
    positive weights raise the next layer's hi and only the negative ones lower its lo); a tensor's
    bound is the largest |lo| or |hi| over its channels. Zero padding widens a channel's interval to
    include 0. The bound holds for every image with pixels in [0, input_max].

    Raises :class:`UnsupportedLayer` for a layer type the engine does not know and
    :class:`ShapeError` where a layer's parameters do not fit its input.
    """
    shapes: dict[str, tuple[int, ...]] = {input_name: tuple(input_shape)}
    #: per channel (per feature for 1-D tensors) [lo, hi]
    intervals: dict[str, tuple[list[int], list[int]]] = {
        input_name: ([0] * input_shape[0], [int(input_max)] * input_shape[0])}
    for layer in layers:
        if not isinstance(layer, SUPPORTED_LAYERS):
            raise UnsupportedLayer(
                f"layer {getattr(layer, 'name', layer)!r} of type {type(layer).__name__} is not supported; "
                f"expected one of {', '.join(t.__name__ for t in SUPPORTED_LAYERS)}"
            )
        sources = layer.inputs if isinstance(layer, Concat) else (layer.input,)
        missing = [s for s in sources if s not in shapes]
        if missing:
            raise ShapeError(f"layer {layer.name!r} reads tensor(s) {missing} that no earlier layer produces")
        if isinstance(layer, (Conv, Dense)) and (layer.weight.ndim != (4 if isinstance(layer, Conv) else 2)):
            raise ShapeError(f"layer {layer.name!r}: weight of shape {layer.weight.shape} has the wrong rank")
        if isinstance(layer, Concat):
            ins = [shapes[i] for i in layer.inputs]
            hw = {s[1:] for s in ins}
            if len(hw) != 1:
                raise ShapeError(f"{layer.name}: concatenated inputs must share H, W; got {ins}")
            shapes[layer.output] = (sum(s[0] for s in ins), *ins[0][1:])
            intervals[layer.output] = ([v for i in layer.inputs for v in intervals[i][0]],
                                       [v for i in layer.inputs for v in intervals[i][1]])
            continue
        shape, (lo, hi) = shapes[layer.input], intervals[layer.input]
        if isinstance(layer, Conv):
            c_out, c_in, kh, kw = layer.weight.shape
            if len(shape) != 3 or shape[0] != c_in or kh != kw:
                raise ShapeError(f"{layer.name}: kernel {layer.weight.shape} does not fit input {shape}")
            if layer.bias.shape != (c_out,):
                raise ShapeError(f"{layer.name}: bias shape {layer.bias.shape}, expected ({c_out},)")
            shapes[layer.output] = (c_out, *conv_output_hw(shape[1], shape[2], kh, layer.stride, layer.padding))
            if layer.padding:
                lo, hi = [min(v, 0) for v in lo], [max(v, 0) for v in hi]
            intervals[layer.output] = _linear_interval(layer.weight.reshape(c_out, c_in, -1), layer.bias, lo, hi)
        elif isinstance(layer, Dense):
            out_f, in_f = layer.weight.shape
            if shape != (in_f,):
                raise ShapeError(f"{layer.name}: weight {layer.weight.shape} does not fit input {shape}")
            if layer.bias.shape != (out_f,):
                raise ShapeError(f"{layer.name}: bias shape {layer.bias.shape}, expected ({out_f},)")
            shapes[layer.output] = (out_f,)
            intervals[layer.output] = _linear_interval(layer.weight.reshape(out_f, in_f, 1), layer.bias, lo, hi)
        elif isinstance(layer, ReLU):
            if layer.shift < 0:
                raise ShapeError(f"{layer.name}: negative shift {layer.shift}")
            shapes[layer.output] = shape
            intervals[layer.output] = ([max(v, 0) >> layer.shift for v in lo], [max(v, 0) >> layer.shift for v in hi])
        elif isinstance(layer, MaxPool):
            if len(shape) != 3 or layer.padding * 2 > layer.kernel:
                raise ShapeError(f"{layer.name}: pooling {layer.kernel}x{layer.kernel} pad {layer.padding} on {shape}")
            if layer.shift < 0:
                raise ShapeError(f"{layer.name}: negative shift {layer.shift}")
            shapes[layer.output] = (shape[0], *conv_output_hw(shape[1], shape[2], layer.kernel, layer.stride, layer.padding))
            # padded positions are left out of every window
            intervals[layer.output] = ([v >> layer.shift for v in lo], [v >> layer.shift for v in hi])
        elif isinstance(layer, Flatten):
            shapes[layer.output] = (int(np.prod(shape)),)
            per = int(np.prod(shape[1:])) if len(shape) > 1 else 1
            intervals[layer.output] = ([v for v in lo for _ in range(per)], [v for v in hi for _ in range(per)])
    bounds = {name: max([abs(v) for v in lo] + [abs(v) for v in hi] + [0]) for name, (lo, hi) in intervals.items()}
    return shapes, bounds


def window_ranges(length: int, count: int, kernel: int, stride: int, padding: int) -> list[tuple[int, int]]:
    """Inclusive [start, end] of each pooling window along one axis, padding clipped away."""
    return [(max(0, j * stride - padding), min(length - 1, j * stride - padding + kernel - 1)) for j in range(count)]


def max_runs(ranges: list[tuple[int, int]]) -> tuple[list[list[tuple[int, int]]], dict[int, list[int]]]:
    """How a line's window maxima are built from shared runs (the separable max-pool's plan).

    Each range is split into aligned-left runs (t, start) of 2^t neighbours, largest first. Returns the
    runs of every window and, per level t >= 1, the sorted starts of the runs whose maxima must be
    built (from two runs of level t - 1), shared by all windows that use them.
    """
    def runs(a: int, b: int) -> list[tuple[int, int]]:
        out = []
        while a <= b:
            t = (b - a + 1).bit_length() - 1
            out.append((t, a))
            a += 1 << t
        return out

    window_runs = [runs(a, b) for a, b in ranges]
    needed: set[tuple[int, int]] = set()
    stack = [r for rs in window_runs for r in rs]
    while stack:
        t, i = stack.pop()
        if t and (t, i) not in needed:
            needed.add((t, i))
            stack += [(t - 1, i), (t - 1, i + (1 << (t - 1)))]
    levels = {level: sorted(i for t, i in needed if t == level) for level in {t for t, _ in needed}}
    return window_runs, levels


def maxpool_comparisons(shape: tuple[int, ...], kernel: int, stride: int, padding: int) -> int:
    """Pairwise maxima the separable secure max-pool computes for a (C, H, W) tensor."""
    c, h, w = shape
    oh, ow = conv_output_hw(h, w, kernel, stride, padding)

    def per_line(length: int, count: int) -> int:
        window_runs, levels = max_runs(window_ranges(length, count, kernel, stride, padding))
        return sum(len(v) for v in levels.values()) + sum(len(rs) - 1 for rs in window_runs)

    return c * h * per_line(w, ow) + c * ow * per_line(h, oh)


def pool_windows(shape: tuple[int, int, int], kernel: int, stride: int, padding: int) -> list[list[int]]:
    """Flat indices (into a C-order (C,H,W) tensor) of every pooling window, padding left out.

    Windows are listed in output order (c, i, j). Built from :func:`window_ranges`, the ranges the
    secure SMAP uses, so the reference and SMAP agree on which elements each window holds.
    """
    c, h, w = shape
    oh, ow = conv_output_hw(h, w, kernel, stride, padding)
    rows, cols = window_ranges(h, oh, kernel, stride, padding), window_ranges(w, ow, kernel, stride, padding)
    return [[(ch * h + y) * w + x for y in range(r0, r1 + 1) for x in range(c0, c1 + 1)]
            for ch in range(c) for r0, r1 in rows for c0, c1 in cols]


def im2col_indices(shape: tuple[int, int, int], kernel: int, stride: int, padding: int) -> np.ndarray:
    """Index matrix (P, F) into a flat (C,H,W) tensor for a convolution, -1 where zero padding is.

    Row p is output position (i, j); column f runs over (channel, u, v) in the order of a torch
    kernel ``weight[c_out].ravel()``, so ``cols @ weight.reshape(C_out, -1).T`` is the convolution.
    """
    c, h, w = shape
    oh, ow = conv_output_hw(h, w, kernel, stride, padding)
    idx = np.full((oh * ow, c * kernel * kernel), -1, dtype=np.int64)
    for i in range(oh):
        for j in range(ow):
            p = i * ow + j
            f = 0
            for ch in range(c):
                for u in range(kernel):
                    for v in range(kernel):
                        y, x = i * stride - padding + u, j * stride - padding + v
                        if 0 <= y < h and 0 <= x < w:
                            idx[p, f] = (ch * h + y) * w + x
                        f += 1
    return idx
