"""From the trained float ICNN to an exact integer model, and the integer model's JSON file.

Homomorphic layers compute on integers only, so every real number is fixed once, here. Input pixels
become integers ``0..input_max`` (scale ``input_max``). Each convolution or dense layer gets weights
``round(W * 2**k)`` with its own power-of-two ``k``, the largest that keeps ``|W_int| <= 2**(bits-1) - 1``,
and biases ``round(b * s_out)`` where ``s_out = s_in * 2**k``; so scales multiply along a path and no
layer ever rescales (ReLU and max-pool commute with a positive scale). The branches of an Inception
block must reach their concatenation at one scale: the last linear layer of each lower-scale branch
takes the extra powers of two (exact, at the cost of wider weights there). Every tensor's scale is
``input_max * 2**e``; ``meta`` records the shifts ``k`` and exponents ``e``. The integer model's
file is :mod:`he_cnn.graph.integer_model`'s.
"""
from __future__ import annotations

import math
from fractions import Fraction


import numpy as np
from torch import nn

from he_cnn.errors import BadRequest, UnsupportedLayer
from he_cnn.geometry import maxpool_comparisons
from he_cnn.graph.integer_model import IntegerModel, infer_shapes_and_bounds, to_ints, weight_shift
from he_cnn.graph.layers import Concat, Conv, Dense, Flatten, Layer, MaxPool, ReLU
from he_cnn.training.icnn import INPUT, ICNN, ChannelConcat

#: default width of requantised activations (see :func:`quantize_icnn`)
ACTIVATION_BITS = 10

Step = tuple[str, nn.Module, tuple[str, ...]]


def quantize_icnn(model: ICNN, input_max: int = 15, weight_bits: int = 6,
                  activation_bits: int | None = ACTIVATION_BITS) -> IntegerModel:
    """Quantise a trained :class:`ICNN`; the integer model's layers keep the torch step names.

    With ``activation_bits``, every ReLU that is not inside an Inception branch (its output reaches
    every branch of each later concatenation, so its scale cannot misalign one) also requantises:
    it shifts right until its worst-case output fits ``activation_bits`` bits, and the shift moves
    to the max-pool before it where that costs fewer compared bits (the same integers either way).
    None keeps every scale (the activations then grow along the network).
    """
    if type(input_max) is not int or input_max < 1:
        raise BadRequest(f"input_max must be a positive int, got {input_max!r}")
    if type(weight_bits) is not int or weight_bits < 2:
        raise BadRequest(f"weight_bits must be an int >= 2, got {weight_bits!r}")
    if activation_bits is not None and (type(activation_bits) is not int or activation_bits < 2):
        raise BadRequest(f"activation_bits must be an int >= 2 or None, got {activation_bits!r}")
    steps = model.steps()
    for name, module, _ in steps:
        _check_supported(name, module)
    shifts = {
        name: weight_shift(module.weight.detach().double().numpy(), weight_bits)
        for name, module, _ in steps
        if isinstance(module, (nn.Conv2d, nn.Linear))
    }
    _align_concat_scales(steps, shifts)
    requant_shifts: dict[str, int] = {}

    def build(requant: dict[str, int]) -> tuple[tuple[Layer, ...], dict, dict]:
        exps = _scale_exponents(steps, shifts, requant)
        built = tuple(_integer_layer(step, shifts, exps, input_max, requant) for step in steps)
        return (built, *infer_shapes_and_bounds(built, INPUT, model.input_shape, input_max))

    for relu in _requantizing_relus(steps) if activation_bits is not None else []:
        # layers up to this ReLU are final once the earlier ReLUs' shifts are set
        _, _, bounds = build(requant_shifts)
        source = next(inputs[0] for name, _, inputs in steps if name == relu)
        requant_shifts[relu] = max(0, int(bounds[source]).bit_length() - activation_bits)
    requant_shifts = {k: v for k, v in requant_shifts.items() if v}
    _, shapes, bounds = build(requant_shifts)
    for relu, k in list(requant_shifts.items()):
        pool = next(inputs[0] for name, _, inputs in steps if name == relu)
        if _cheaper_before_pool(steps, relu, pool, k, shapes, bounds):
            requant_shifts[pool] = requant_shifts.pop(relu)
    layers, shapes, bounds = build(requant_shifts)
    exponents = _scale_exponents(steps, shifts, requant_shifts)
    output = steps[-1][0]
    meta = {
        "source": type(model).__name__,
        "input_max": input_max,
        "weight_bits": weight_bits,
        "activation_bits": activation_bits,
        "weight_shifts": shifts,
        "requantize_shifts": requant_shifts,
        "scale_exponents": exponents,
        "scales": {t: str(input_max * Fraction(2) ** e) for t, e in exponents.items()},
    }
    return IntegerModel(
        layers, model.input_shape, input_max, INPUT, output, shapes[output][0], shapes, bounds, meta
    )


def tensor_scale(model: IntegerModel, tensor: str) -> Fraction:
    """The factor between a tensor's integers and the float model's values (``int ~= float * scale``)."""
    return Fraction(model.meta["scales"][tensor])


def _check_supported(name: str, module: nn.Module) -> None:
    if isinstance(module, nn.Conv2d):
        k, s, p = module.kernel_size, module.stride, module.padding
        plain = module.groups == 1 and module.dilation == (1, 1) and module.padding_mode == "zeros"
        if not (plain and k[0] == k[1] and s[0] == s[1] and isinstance(p, tuple) and p[0] == p[1]):
            raise UnsupportedLayer(
                f"{name}: only square, ungrouped, undilated, zero-padded convolutions are supported; got {module}"
            )
    elif isinstance(module, nn.MaxPool2d):
        if not all(isinstance(v, int) for v in (module.kernel_size, module.stride, module.padding)) or (
            module.dilation != 1 or module.ceil_mode
        ):
            raise UnsupportedLayer(f"{name}: only square, undilated, floor-mode max pools are supported; got {module}")
    elif isinstance(module, nn.Flatten):
        if module.start_dim != 1 or module.end_dim != -1:
            raise UnsupportedLayer(f"{name}: only a full flatten (start_dim=1) is supported; got {module}")
    elif not isinstance(module, (nn.Linear, nn.ReLU, ChannelConcat)):
        raise UnsupportedLayer(
            f"{name}: {type(module).__name__} has no integer counterpart; "
            "expected Conv2d, Linear, ReLU, MaxPool2d, ChannelConcat or Flatten"
        )


def _scale_exponents(steps: list[Step], shifts: dict[str, int], requant_shifts: dict[str, int] | None = None
                     ) -> dict[str, int]:
    """Exponent ``e`` of every tensor's scale ``input_max * 2**e``; a concat takes its largest input's;
    a requantising ReLU lowers it by its shift."""
    requant_shifts = requant_shifts or {}
    exponents = {INPUT: 0}
    for name, _, inputs in steps:
        exponents[name] = max(exponents[i] for i in inputs) + shifts.get(name, 0) - requant_shifts.get(name, 0)
    return exponents


def _cheaper_before_pool(steps: list[Step], relu: str, pool: str, k: int, shapes: dict, bounds: dict) -> bool:
    """Whether a ReLU's shift k costs fewer DGK bits on the max-pool before it (relu(max(x)) >> k =
    relu(max(x >> k)), exactly): truncating the pool's inputs (k + 1 bits each) lets every pool
    comparison and the ReLU run k bits shorter."""
    by_name = {name: (module, inputs) for name, module, inputs in steps}
    module, inputs = by_name.get(pool, (None, ()))
    if not isinstance(module, nn.MaxPool2d) or [n for n, _, i in steps if pool in i] != [relu]:
        return False
    l = int(bounds[inputs[0]]).bit_length()
    n_in, n_out = math.prod(shapes[inputs[0]]), math.prod(shapes[relu])
    comparisons = maxpool_comparisons(shapes[inputs[0]], module.kernel_size, module.stride, module.padding)
    at_relu = comparisons * (l + 2) + n_out * (l + 2)
    at_pool = n_in * (k + 1) + comparisons * (l - k + 2) + n_out * (l - k + 1)
    return at_pool < at_relu


def _requantizing_relus(steps: list[Step]) -> list[str]:
    """ReLUs outside every Inception branch (each concatenation downstream gets all its inputs from
    it) with a comparison (ReLU, max-pool) downstream, the only place shorter values pay."""
    consumers: dict[str, list[str]] = {}
    for name, _, inputs in steps:
        for i in inputs:
            consumers.setdefault(i, []).append(name)
    out = []
    for name, module, _ in steps:
        if not isinstance(module, nn.ReLU):
            continue
        reached, stack = {name}, [name]
        while stack:
            for c in consumers.get(stack.pop(), []):
                if c not in reached:
                    reached.add(c)
                    stack.append(c)
        later = [(n, m, inputs) for n, m, inputs in steps if n in reached and n != name]
        compares = any(isinstance(m, (nn.ReLU, nn.MaxPool2d)) for _, m, _ in later)
        if compares and all(set(inputs) <= reached for _, m, inputs in later if isinstance(m, ChannelConcat)):
            out.append(name)
    return out


def _align_concat_scales(steps: list[Step], shifts: dict[str, int]) -> None:
    """Raise the shift of each lower-scale branch's last linear layer so every concat is exact."""
    by_name = {name: (module, inputs) for name, module, inputs in steps}
    for name, module, inputs in steps:
        if not isinstance(module, ChannelConcat):
            continue
        exponents = _scale_exponents(steps, shifts)  # earlier alignments change later scales
        target = max(exponents[i] for i in inputs)
        for branch in inputs:
            if exponents[branch] < target:
                shifts[_last_linear(branch, name, by_name)] += target - exponents[branch]


def _last_linear(tensor: str, concat: str, by_name: dict[str, tuple[nn.Module, tuple[str, ...]]]) -> str:
    """The linear layer that last sets ``tensor``'s scale, looking back through scale-free steps."""
    while tensor in by_name:
        module, inputs = by_name[tensor]
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            return tensor
        if isinstance(module, ChannelConcat):
            break
        tensor = inputs[0]
    raise UnsupportedLayer(f"{concat}: branch {tensor!r} has no convolution of its own to rescale")


def _integer_layer(step: Step, shifts: dict[str, int], exponents: dict[str, int], input_max: int,
                   requant_shifts: dict[str, int] | None = None) -> Layer:
    name, module, inputs = step
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        weight = to_ints(np.ldexp(module.weight.detach().double().numpy(), shifts[name]))
        bias_scale = math.ldexp(input_max, exponents[name])
        bias = module.bias.detach().double().numpy() if module.bias is not None else np.zeros(weight.shape[0])
        bias = to_ints(bias * bias_scale)
        if isinstance(module, nn.Linear):
            return Dense(name, inputs[0], name, weight, bias)
        return Conv(name, inputs[0], name, weight, bias, module.stride[0], module.padding[0])
    if isinstance(module, nn.MaxPool2d):
        return MaxPool(name, inputs[0], name, module.kernel_size, module.stride, module.padding,
                       (requant_shifts or {}).get(name, 0))
    if isinstance(module, ChannelConcat):
        return Concat(name, inputs, name)
    if isinstance(module, nn.ReLU):
        return ReLU(name, inputs[0], name, (requant_shifts or {}).get(name, 0))
    return Flatten(name, inputs[0], name)
