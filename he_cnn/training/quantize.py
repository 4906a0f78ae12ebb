"""From the trained float ICNN to an exact integer model, and the integer model's JSON file.

Homomorphic layers compute on integers only, so every real number is fixed once, here. Input pixels
become integers ``0..input_max`` (scale ``input_max``). Each convolution or dense layer gets weights
``round(W * 2**k)`` with its own power-of-two ``k``, the largest that keeps ``|W_int| <= 2**(bits-1) - 1``,
and biases ``round(b * s_out)`` where ``s_out = s_in * 2**k``; so scales multiply along a path and no
layer ever rescales (ReLU and max-pool commute with a positive scale). The branches of an Inception
block must reach their concatenation at one scale: the last linear layer of each lower-scale branch
takes the extra powers of two (exact, at the cost of wider weights there). Every tensor's scale is
``input_max * 2**e``; ``meta`` records the shifts ``k`` and exponents ``e``. :func:`save_integer_model`
writes the model as versioned JSON (integers of any size, no pickle); :func:`load_integer_model`
checks everything it reads and re-derives shapes and bounds.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable

import numpy as np
from torch import nn

from he_cnn.errors import BadRequest, HECNNError, UnsupportedLayer
from he_cnn.graph.integer_model import (Concat, Conv, Dense, Flatten, IntegerModel, Layer, MaxPool, ReLU, infer_shapes_and_bounds,
                    maxpool_comparisons)
from he_cnn.training.icnn import INPUT, ICNN, ChannelConcat

FORMAT = "he-cnn-integer-model"
FORMAT_VERSION = 1
#: default width of requantised activations (see :func:`quantize_icnn`)
ACTIVATION_BITS = 10
LAYER_TYPES: dict[str, type] = {t.__name__: t for t in (Conv, Dense, ReLU, MaxPool, Concat, Flatten)}

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


def weight_shift(weight: np.ndarray, weight_bits: int) -> int:
    """Largest ``k`` with ``max |round(W * 2**k)| <= 2**(weight_bits-1) - 1`` (0 for all-zero weights)."""
    peak = float(np.max(np.abs(weight)))
    if peak == 0.0:
        return 0
    limit = 2 ** (weight_bits - 1) - 1
    k = math.floor(math.log2(limit / peak))
    while np.rint(math.ldexp(peak, k + 1)) <= limit:
        k += 1
    while np.rint(math.ldexp(peak, k)) > limit:
        k -= 1
    return k


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
        weight = _to_ints(np.ldexp(module.weight.detach().double().numpy(), shifts[name]))
        bias_scale = math.ldexp(input_max, exponents[name])
        bias = module.bias.detach().double().numpy() if module.bias is not None else np.zeros(weight.shape[0])
        bias = _to_ints(bias * bias_scale)
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


def _to_ints(values: np.ndarray) -> np.ndarray:
    """Round floats to exact Python ints (object array, same shape); no int64 on the way."""
    return np.array([int(v) for v in np.rint(values).ravel()], dtype=object).reshape(values.shape)


# --- JSON file ---------------------------------------------------------------------------------


def save_integer_model(model: IntegerModel, path: str | Path) -> None:
    """Write ``model`` as JSON; shapes and bounds are not stored (loading re-derives them)."""
    document = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "input_name": model.input_name,
        "input_shape": list(model.input_shape),
        "input_max": model.input_max,
        "output": model.output,
        "num_classes": model.num_classes,
        "meta": model.meta,
        "layers": [_layer_to_json(layer) for layer in model.layers],
    }
    target = Path(path)
    partial = target.with_name(target.name + ".partial")
    partial.write_text(json.dumps(document, indent=1))
    os.replace(partial, target)  # a reader never sees a half-written model


def load_integer_model(path: str | Path) -> IntegerModel:
    """Read a model written by :func:`save_integer_model`; :class:`BadRequest` if anything is off."""
    source = Path(path)
    try:
        document = json.loads(source.read_text())
    except FileNotFoundError as e:
        raise BadRequest(f"integer model file {str(source)!r} does not exist") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadRequest(f"integer model file {str(source)!r} is not readable JSON: {e}") from e
    try:
        return _model_from_json(document)
    except HECNNError as e:
        raise BadRequest(f"integer model file {str(source)!r} is invalid: {e}") from e


def _layer_to_json(layer: Layer) -> dict[str, Any]:
    fields: dict[str, Any] = {"type": type(layer).__name__}
    for f in dataclasses.fields(layer):
        value = getattr(layer, f.name)
        if isinstance(value, np.ndarray):
            value = {"shape": list(value.shape), "values": [int(v) for v in value.ravel()]}
        elif isinstance(value, tuple):
            value = list(value)
        fields[f.name] = value
    return fields


def _model_from_json(document: Any) -> IntegerModel:
    top = _expect_dict(document, "the file")
    if top.get("format") != FORMAT:
        raise BadRequest(f"expected format {FORMAT!r}, got {top.get('format')!r}")
    if top.get("version") != FORMAT_VERSION:
        raise BadRequest(f"expected format version {FORMAT_VERSION}, got {top.get('version')!r}")
    input_name = _str(_field(top, "input_name"), "input_name")
    input_shape = tuple(_int_list(_field(top, "input_shape"), "input_shape"))
    if len(input_shape) != 3 or min(input_shape) < 1:
        raise BadRequest(f"input_shape must be 3 positive ints (C, H, W), got {list(input_shape)}")
    input_max = _positive_int(_field(top, "input_max"), "input_max")
    output = _str(_field(top, "output"), "output")
    num_classes = _positive_int(_field(top, "num_classes"), "num_classes")
    meta = _expect_dict(_field(top, "meta"), "meta")
    raw_layers = _field(top, "layers")
    if not isinstance(raw_layers, list) or not raw_layers:
        raise BadRequest("layers must be a non-empty list")
    layers = tuple(_layer_from_json(raw, i) for i, raw in enumerate(raw_layers))
    _check_tensor_names(layers, input_name, output)
    shapes, bounds = infer_shapes_and_bounds(layers, input_name, input_shape, input_max)
    if shapes[output] != (num_classes,):
        raise BadRequest(f"output {output!r} has shape {shapes[output]}, expected ({num_classes},)")
    return IntegerModel(layers, input_shape, input_max, input_name, output, num_classes, shapes, bounds, meta)


def _layer_from_json(raw: Any, index: int) -> Layer:
    fields = _expect_dict(raw, f"layer {index}")
    kind = fields.get("type")
    if kind not in LAYER_TYPES:
        raise BadRequest(f"layer {index}: type {kind!r} is not one of {', '.join(LAYER_TYPES)}")
    cls = LAYER_TYPES[kind]
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(fields) - set(known) - {"type"}
    if unknown:
        raise BadRequest(f"layer {index} ({kind}): unexpected fields {sorted(unknown)}")
    values = {}
    for name, f in known.items():
        if name not in fields:
            if f.default is dataclasses.MISSING:
                raise BadRequest(f"layer {index} ({kind}): missing field {name!r}")
            continue
        values[name] = _FIELD_PARSERS[name](fields[name], f"layer {index} ({kind}) field {name!r}")
    for name, rank in _ARRAY_RANKS.get(cls, {}).items():
        if values[name].ndim != rank:
            raise BadRequest(f"layer {index} ({kind}): {name} must have {rank} dimensions, got {values[name].ndim}")
    return cls(**values)


def _check_tensor_names(layers: tuple[Layer, ...], input_name: str, output: str) -> None:
    """Every layer reads tensors made earlier and writes a new one; the output tensor exists."""
    known = {input_name}
    for layer in layers:
        reads = layer.inputs if isinstance(layer, Concat) else (layer.input,)
        missing = [t for t in reads if t not in known]
        if missing:
            raise BadRequest(f"layer {layer.name!r} reads {missing}, which no earlier layer produces")
        if layer.output in known:
            raise BadRequest(f"layer {layer.name!r} writes tensor {layer.output!r}, which already exists")
        known.add(layer.output)
    if output not in known:
        raise BadRequest(f"output tensor {output!r} is produced by no layer")


def _field(fields: dict[str, Any], name: str) -> Any:
    if name not in fields:
        raise BadRequest(f"missing field {name!r}")
    return fields[name]


def _expect_dict(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BadRequest(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def _str(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise BadRequest(f"{what} must be a non-empty string, got {value!r}")
    return value


def _int(value: Any, what: str) -> int:
    if type(value) is not int:  # bool and float are not ints here
        raise BadRequest(f"{what} must be an integer, got {value!r}")
    return value


def _positive_int(value: Any, what: str) -> int:
    if _int(value, what) < 1:
        raise BadRequest(f"{what} must be positive, got {value}")
    return value


def _non_negative_int(value: Any, what: str) -> int:
    if _int(value, what) < 0:
        raise BadRequest(f"{what} must not be negative, got {value}")
    return value


def _int_list(value: Any, what: str) -> list[int]:
    if not isinstance(value, list):
        raise BadRequest(f"{what} must be a list of integers, got {type(value).__name__}")
    return [_int(v, what) for v in value]


def _str_tuple(value: Any, what: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise BadRequest(f"{what} must be a non-empty list of strings, got {value!r}")
    return tuple(_str(v, what) for v in value)


def _int_array(value: Any, what: str) -> np.ndarray:
    array = _expect_dict(value, what)
    shape = _int_list(_field(array, "shape"), f"{what} shape")
    values = _int_list(_field(array, "values"), f"{what} values")
    if min(shape, default=0) < 1 or math.prod(shape) != len(values):
        raise BadRequest(f"{what}: shape {shape} does not hold {len(values)} values")
    return np.array(values, dtype=object).reshape(shape)


_ARRAY_RANKS: dict[type, dict[str, int]] = {Conv: {"weight": 4, "bias": 1}, Dense: {"weight": 2, "bias": 1}}

_FIELD_PARSERS: dict[str, Callable[[Any, str], Any]] = {
    "name": _str,
    "input": _str,
    "output": _str,
    "inputs": _str_tuple,
    "weight": _int_array,
    "bias": _int_array,
    "kernel": _positive_int,
    "stride": _positive_int,
    "padding": _non_negative_int,
    "shift": _non_negative_int,
}
