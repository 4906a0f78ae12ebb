"""Lowering: the float graph, calibrated on sample images, becomes exact integer catalogue layers.

Every tensor ``t`` gets a rational scale ``S_t`` (a :class:`~fractions.Fraction`) with
``int ~= float * S_t``; the input's is ``input_max`` (pixels are sent as ``round(p * input_max)``).
Per operation (one rule each, :data:`RULES`):

* Conv / Dense: weights ``round(w * 2**k)`` with the largest ``k`` that keeps ``|w_int| <=
  2**(weight_bits-1) - 1`` (:func:`weight_shift`), biases ``round(b * S_out)``, ``S_out = S_in * 2**k``;
* ReLU: requantises, ``floor(max(x, 0) / 2**shift)``, with the smallest shift that brings the
  *calibrated* peak of its input, ``peak * S_in``, within ``activation_bits`` bits; ``S_out = S_in / 2**shift``.
  Calibration only chooses the shift: the protocols' bit lengths come from the worst-case bounds
  that :func:`~he_cnn.graph.integer_model.build_model` proves by interval arithmetic;
* MaxPool, Pad, Flatten: the scale is unchanged; an average pool is a SumPool, ``S_out = S_in * kh * kw``;
* Add / Concat: inputs at different scales ``S_i = n_i / d_i`` (lowest terms) are first multiplied by
  the integers ``T / S_i`` (:class:`~he_cnn.graph.layers.Scale` layers) to the common scale
  ``T = lcm(n_i) / gcd(d_i)``: ``T / S_i = (lcm(n) / n_i) * (d_i / gcd(d))``, a product of integers.

Integer layers and tensors keep the float graph's names; a Scale layer is named ``<tensor>_x<factor>``
and is shared by every join that needs that tensor at that factor.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Callable

import numpy as np

from he_cnn.compiler.float_graph import (AddOp, AvgPoolOp, ConcatOp, ConvOp, DenseOp, FlattenOp, FloatGraph,
                                         FloatOp, MaxPoolOp, PadOp, ReluOp)
from he_cnn.errors import UnsupportedLayer
from he_cnn.graph.integer_model import to_ints, weight_shift
from he_cnn.graph.layers import Add, Concat, Conv, Dense, Flatten, Layer, MaxPool, Pad, ReLU, Scale, SumPool


@dataclass
class Lowering:
    """The state of one lowering: the layers so far and every tensor's scale."""

    graph: FloatGraph
    peaks: dict[str, float]
    weight_bits: int
    activation_bits: int
    scales: dict[str, Fraction]
    layers: list[Layer] = field(default_factory=list)

    def scale_of(self, tensor: str) -> Fraction:
        return self.scales[tensor]

    def add(self, layer: Layer, scale: Fraction) -> None:
        self.layers.append(layer)
        self.scales[layer.output] = scale  # type: ignore[attr-defined]

    def aligned(self, op: FloatOp) -> tuple[tuple[str, ...], Fraction]:
        """The inputs of a join brought to one scale (through Scale layers), and that scale."""
        numerators = [self.scales[t].numerator for t in op.inputs]
        denominators = [self.scales[t].denominator for t in op.inputs]
        top, bottom = math.lcm(*numerators), math.gcd(*denominators)
        inputs = []
        for tensor, n, d in zip(op.inputs, numerators, denominators):
            factor = (top // n) * (d // bottom)
            if factor > MAX_SCALE_FACTOR:
                raise UnsupportedLayer(f"{op.name}: the joined tensors' scales are {factor:.3g} apart, more than a "
                                       f"scale layer's 2^64; compile with fewer --bits")
            name = f"{tensor}_x{factor}"
            if factor > 1 and name not in self.scales:
                if name in self.graph.shapes:
                    raise UnsupportedLayer(f"{op.name}: the scaled copy {name!r} of {tensor!r} clashes with a "
                                           "tensor of the model; rename that tensor")
                self.add(Scale(name, tensor, name, factor), Fraction(top, bottom))
            inputs.append(name if factor > 1 else tensor)
        return tuple(inputs), Fraction(top, bottom)


#: the largest factor a Scale layer takes (its spec reader's limit)
MAX_SCALE_FACTOR = 1 << 64


def lower(graph: FloatGraph, calibration: np.ndarray, input_max: int, weight_bits: int,
          activation_bits: int) -> tuple[tuple[Layer, ...], dict[str, Fraction]]:
    """The integer layers of ``graph`` (which reads pixels in [0, 1]) and every tensor's scale.

    ``calibration`` holds sample images ``(n, C, H, W)`` in [0, 1]: their float peaks set the ReLU shifts.
    """
    lowering = Lowering(graph, graph.peaks(calibration), weight_bits, activation_bits,
                        {graph.input_name: Fraction(input_max)})
    for op in graph.ops:
        rule = RULES.get(type(op))
        if rule is None:
            raise UnsupportedLayer(f"{op.name}: the float operation {op.kind} has no integer layer")
        rule(lowering, op)
    return tuple(lowering.layers), lowering.scales


def _linear(lowering: Lowering, op: ConvOp | DenseOp) -> None:
    k = weight_shift(op.weight, lowering.weight_bits)
    scale = lowering.scale_of(op.inputs[0]) * Fraction(2) ** k
    weight = to_ints(np.ldexp(op.weight, k))
    # exactly, in rationals: a deep stack's scale can pass float's range
    bias = np.array([round(Fraction(float(b)) * scale) for b in op.bias.ravel()], dtype=object).reshape(op.bias.shape)
    if isinstance(op, ConvOp):
        layer: Layer = Conv(op.name, op.inputs[0], op.name, weight, bias, op.stride, op.padding)
    else:
        layer = Dense(op.name, op.inputs[0], op.name, weight, bias)
    lowering.add(layer, scale)


def _relu(lowering: Lowering, op: ReluOp) -> None:
    scale = lowering.scale_of(op.inputs[0])
    peak = math.ceil(Fraction(max(lowering.peaks[op.inputs[0]], 0.0)) * scale)  # exact: scales pass float's range
    shift = max(0, peak.bit_length() - lowering.activation_bits)
    lowering.add(ReLU(op.name, op.inputs[0], op.name, shift), scale / 2 ** shift)


def _max_pool(lowering: Lowering, op: MaxPoolOp) -> None:
    lowering.add(MaxPool(op.name, op.inputs[0], op.name, op.kernel, op.stride, op.padding),
                 lowering.scale_of(op.inputs[0]))


def _sum_pool(lowering: Lowering, op: AvgPoolOp) -> None:
    lowering.add(SumPool(op.name, op.inputs[0], op.name, op.kernel, op.stride, op.padding),
                 lowering.scale_of(op.inputs[0]) * op.kernel[0] * op.kernel[1])


def _add(lowering: Lowering, op: AddOp) -> None:
    inputs, scale = lowering.aligned(op)
    lowering.add(Add(op.name, inputs, op.name), scale)


def _concat(lowering: Lowering, op: ConcatOp) -> None:
    inputs, scale = lowering.aligned(op)
    lowering.add(Concat(op.name, inputs, op.name), scale)


def _flatten(lowering: Lowering, op: FlattenOp) -> None:
    lowering.add(Flatten(op.name, op.inputs[0], op.name), lowering.scale_of(op.inputs[0]))


def _pad(lowering: Lowering, op: PadOp) -> None:
    lowering.add(Pad(op.name, op.inputs[0], op.name, op.pads), lowering.scale_of(op.inputs[0]))


#: float operation -> the rule that lowers it (an AffineOp has none: the importer folds it away)
RULES: dict[type[FloatOp], Callable[[Lowering, FloatOp], None]] = {
    ConvOp: _linear,
    DenseOp: _linear,
    ReluOp: _relu,
    MaxPoolOp: _max_pool,
    AvgPoolOp: _sum_pool,
    AddOp: _add,
    ConcatOp: _concat,
    FlattenOp: _flatten,
    PadOp: _pad,
}
