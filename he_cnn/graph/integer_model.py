"""The integer model: a small, explicit graph of catalogue layers over named tensors.

Quantisation turns a trained torch model into an :class:`IntegerModel`; the plaintext integer
reference (:mod:`he_cnn.graph.reference`), the owner's export and S1's secure inference
(:mod:`he_cnn.parties.compute_cloud`) all walk the same graph of :mod:`~he_cnn.graph.layers`
objects, so they compute the same function by construction. Every tensor is channel-first
``(C, H, W)`` (or ``(F,)`` after a flatten) and holds exact Python integers.

On the owner's side the layers carry their weights and ``bounds`` gives, for each tensor, a
worst-case bound ``|v| <= bound`` proven by interval arithmetic from the input range and the weights
(:func:`infer_shapes_and_bounds`). The public form (:meth:`IntegerModel.to_spec`) drops weights and
keeps only each bound's bit length (exact bounds are weight norms) and the input's
:class:`~he_cnn.images.Preprocessing` (how a user turns a picture into the input) and the training's
:class:`~he_cnn.graph.privacy.TrainingPrivacy` (DP or not, its ε and δ); S1 decodes an uploaded spec
with :meth:`IntegerModel.from_spec` into the same typed graph, without weights, checking every layer
through the catalogue. :func:`save_integer_model` / :func:`load_integer_model` keep the owner's
model (weights included) as versioned JSON.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from he_cnn.bounded_json import JSONLimits, read_json_file
from he_cnn.errors import BadRequest, HECNNError, ShapeError
from he_cnn.graph import parse
from he_cnn.graph.layers import Interval, Layer, LinearLayer, check_kind, layer_from_file, layer_from_spec
from he_cnn.graph.privacy import TrainingPrivacy
from he_cnn.images import Preprocessing

#: version of the public architecture (the spec S1 and S2 see)
SPEC_VERSION = 1
#: the owner's integer-model file
FORMAT = "he-cnn-integer-model"
FORMAT_VERSION = 1
#: the largest input a model may declare (channels * height * width)
MAX_INPUT_ELEMENTS = 3 * 256 * 256
#: no tensor of a model that fits a Paillier plaintext can need more bits than this
MAX_VALUE_BITS = 4096
#: the most elements any tensor of a model may have (a 256 x 256 map of 64 channels)
MAX_TENSOR_ELEMENTS = 1 << 22
#: the most layers a model may have
MAX_LAYERS = 4096
#: the owner's model file: 8 million values (weights, mostly) in at most 128 MiB. A model file spends
#: ~9 bytes per value (one weight a line); S1's default upload limit of 64 MiB carries ~130,000 2048-bit
#: ciphertexts, so this leaves a wide margin for operators who raise it, while a hostile file costs at
#: most a few hundred MB of memory to refuse or read.
MODEL_FILE_LIMITS = JSONLimits(max_bytes=128 << 20, max_items=1 << 23)


@dataclass(frozen=True)
class IntegerModel:
    """A quantised model: catalogue layers in execution order plus what is needed to use it.

    ``input_shape`` is (C, H, W); the user encodes pixels as integers in ``[0, input_max]``.
    ``shapes`` maps every tensor name (including the input and the output) to its shape; ``bounds``
    to its worst-case absolute bound (owner side; empty in the public form) and ``bits`` to that
    bound's bit length l (|v| < 2^l), which is all the protocols need. ``output`` is the name of the
    class-vector tensor. ``meta`` may hold ``"preprocessing"`` (:meth:`Preprocessing.to_json`); a model
    without one has :meth:`Preprocessing.default_for` its input. ``meta["privacy"]`` is the owner's
    :class:`~he_cnn.graph.privacy.TrainingPrivacy` card (absent: no DP declared).
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
    bits: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.bounds and not self.bits:
            self.bits.update({name: int(bound).bit_length() for name, bound in self.bounds.items()})

    def layer(self, name: str) -> Layer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    def linear_layers(self) -> list[LinearLayer]:
        return [layer for layer in self.layers if isinstance(layer, LinearLayer)]

    @property
    def classes(self) -> list[str]:
        return list(self.meta.get("classes", [str(i) for i in range(self.num_classes)]))

    @property
    def preprocessing(self) -> Preprocessing:
        """How a user's picture becomes this model's input (checked against ``input_shape`` and ``input_max``)."""
        return Preprocessing.declared(self.meta.get("preprocessing"), self.input_shape, self.input_max)

    @property
    def privacy(self) -> TrainingPrivacy:
        """Whether the model was trained with differential privacy, and its (epsilon, delta)."""
        return TrainingPrivacy.declared(self.meta.get("privacy"))

    # -- the public architecture ------------------------------------------------------------------
    def to_spec(self) -> dict[str, Any]:
        """The public part of the model: layers without weights, shapes, and bit lengths only."""
        for layer in self.layers:
            check_kind(layer)
        return {
            "version": SPEC_VERSION,
            "layers": [layer.to_spec() for layer in self.layers],
            "input_name": self.input_name,
            "input_shape": list(self.input_shape),
            "input_max": self.input_max,
            "output": self.output,
            "num_classes": self.num_classes,
            "shapes": {k: list(v) for k, v in self.shapes.items()},
            "bits": dict(self.bits),
            "classes": self.classes,
            "preprocessing": self.preprocessing.to_json(),
            "privacy": self.privacy.to_json(),
        }

    @classmethod
    def from_spec(cls, spec: Any) -> "IntegerModel":
        """The public graph of a received spec, every part checked: known layer kinds with valid
        fields, each layer reading tensors computed before it, each declared shape equal to what the
        catalogue derives, bit lengths in range. :class:`BadRequest` (or :class:`ShapeError`,
        :class:`UnsupportedLayer`) otherwise, never another exception."""
        try:
            return _public_model(spec)
        except HECNNError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as e:
            raise BadRequest(f"model spec is malformed: {type(e).__name__} {str(e)[:120]}") from e

    def public(self) -> "IntegerModel":
        """The same graph without weights or exact bounds: what S1 holds."""
        return IntegerModel(tuple(layer.public() for layer in self.layers), self.input_shape, self.input_max,
                            self.input_name, self.output, self.num_classes, dict(self.shapes), {},
                            {"classes": self.classes, "preprocessing": self.preprocessing.to_json(),
                             "privacy": self.privacy.to_json()}, dict(self.bits))


def _read_io(fields: dict[str, Any], where: str) -> tuple[str, tuple[int, int, int], int, str, int]:
    """The input and output of a spec or a file: input name, (C, H, W), input_max, output name, classes."""
    input_shape = tuple(parse.int_list(parse.field(fields, "input_shape"), f"{where}input_shape"))
    if len(input_shape) != 3 or min(input_shape) < 1:
        raise BadRequest(f"{where}input_shape must be 3 positive ints (C, H, W), got {list(input_shape)}")
    if math.prod(input_shape) > MAX_INPUT_ELEMENTS:
        raise BadRequest(f"{where}input of {list(input_shape)} exceeds {MAX_INPUT_ELEMENTS} elements")
    return (parse.text(parse.field(fields, "input_name"), f"{where}input_name"), input_shape,  # type: ignore[return-value]
            parse.positive_int(parse.field(fields, "input_max"), f"{where}input_max"),
            parse.text(parse.field(fields, "output"), f"{where}output"),
            parse.positive_int(parse.field(fields, "num_classes"), f"{where}num_classes"))


def _public_model(spec: Any) -> IntegerModel:
    spec = parse.expect_dict(spec, "model spec")
    if spec.get("version") != SPEC_VERSION:
        raise BadRequest(f"model spec version {parse.shown(spec.get('version'))}, expected {SPEC_VERSION}")
    input_name, input_shape, input_max, output, num_classes = _read_io(spec, "model spec: ")
    classes = parse.field(spec, "classes")
    if not isinstance(classes, list) or len(classes) != num_classes or not all(isinstance(c, str) for c in classes):
        raise BadRequest("model spec: classes must be a list of num_classes names")
    shapes_in = parse.expect_dict(parse.field(spec, "shapes"), "model spec: shapes")
    bits_in = parse.expect_dict(parse.field(spec, "bits"), "model spec: bits")
    raw_layers = parse.field(spec, "layers")
    if not isinstance(raw_layers, list) or not 0 < len(raw_layers) <= MAX_LAYERS:
        raise BadRequest(f"model spec: layers must be a list of 1 to {MAX_LAYERS} layers")
    layers = tuple(layer_from_spec(entry, f"model spec: layer {i}") for i, entry in enumerate(raw_layers))
    shapes = _check_wiring(layers, input_name, input_shape, output, num_classes)
    declared = {name: tuple(parse.int_list(value, f"model spec: shape of {name!r}"))
                for name, value in shapes_in.items()}
    for name, shape in shapes.items():
        if declared.get(name) != shape:
            raise ShapeError(f"model spec: tensor {name!r} has shape {list(shape)}, the spec says "
                             f"{list(declared[name]) if name in declared else 'nothing'}")
    if set(declared) != set(shapes):
        raise BadRequest(f"model spec: shapes of tensors no layer computes: {sorted(set(declared) - set(shapes))[:5]}")
    bits = {}
    for name in shapes:
        value = bits_in.get(name)
        if type(value) is not int or not 0 <= value <= MAX_VALUE_BITS:
            raise BadRequest(f"model spec: tensor {name!r} lacks a bit length in 0..{MAX_VALUE_BITS}")
        bits[name] = value
    if bits[input_name] != input_max.bit_length():
        raise BadRequest("model spec: the input tensor's bit length differs from input_max")
    # optional: specs stored before preprocessing existed lack it and get the default
    if "preprocessing" in spec and spec["preprocessing"] is None:
        raise BadRequest("model spec: preprocessing must be a JSON object, got null")
    preprocessing = Preprocessing.declared(spec.get("preprocessing"), input_shape, input_max)
    # optional too (specs stored before it existed declare no DP), but never null
    if "privacy" in spec and spec["privacy"] is None:
        raise BadRequest("model spec: privacy must be a JSON object, got null")
    privacy = TrainingPrivacy.declared(spec.get("privacy"))
    return IntegerModel(layers, input_shape, input_max, input_name, output, num_classes, shapes, {},
                        {"classes": list(classes), "preprocessing": preprocessing.to_json(),
                         "privacy": privacy.to_json()}, bits)


def _check_wiring(layers: tuple[Layer, ...], input_name: str, input_shape: tuple[int, ...], output: str,
                  num_classes: int) -> dict[str, tuple[int, ...]]:
    """Shapes of every tensor; each layer reads tensors made earlier and writes a new one, under a
    name no other layer has; the output is a computed tensor of shape (num_classes,)."""
    shapes: dict[str, tuple[int, ...]] = {input_name: tuple(input_shape)}
    names: set[str] = set()
    for layer in layers:
        check_kind(layer)
        missing = [t for t in layer.sources() if t not in shapes]
        if missing:
            raise ShapeError(f"layer {layer.name!r} reads {missing}, which no earlier layer produces")
        if layer.output in shapes:
            raise BadRequest(f"layer {layer.name!r} writes tensor {layer.output!r}, which already exists")
        if layer.name in names:
            raise BadRequest(f"layer name {layer.name!r} is used twice")
        names.add(layer.name)
        shapes[layer.output] = _bounded(layer, layer.out_shape([shapes[t] for t in layer.sources()]))
    if output not in shapes or output == input_name:
        raise BadRequest(f"output tensor {output!r} is produced by no layer")
    if shapes[output] != (num_classes,):
        raise BadRequest(f"output {output!r} has shape {shapes[output]}, expected ({num_classes},)")
    return shapes


def _bounded(layer: Layer, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The layer's output shape, refused past :data:`MAX_TENSOR_ELEMENTS`."""
    if math.prod(shape) > MAX_TENSOR_ELEMENTS:
        raise ShapeError(f"layer {layer.name!r} makes a tensor of {list(shape)}: more than {MAX_TENSOR_ELEMENTS} "
                         "elements")
    return tuple(shape)


def infer_shapes_and_bounds(
    layers: tuple[Layer, ...], input_name: str, input_shape: tuple[int, int, int], input_max: int
) -> tuple[dict[str, tuple[int, ...]], dict[str, int]]:
    """Shapes of every tensor, and worst-case bounds ``|v| <= bound`` by interval arithmetic.

    The intervals are kept per channel and two-sided ([lo, hi]: after a ReLU lo = 0, so only the
    positive weights raise the next layer's hi and only the negative ones lower its lo); a tensor's
    bound is the largest |lo| or |hi| over its channels. Each layer's rule is its catalogue class's
    :meth:`~he_cnn.graph.layers.Layer.interval`. The bound holds for every image with pixels in
    [0, input_max].

    Raises :class:`UnsupportedLayer` for a layer of no registered kind and :class:`ShapeError` where
    a layer's parameters do not fit its input.
    """
    shapes: dict[str, tuple[int, ...]] = {input_name: tuple(input_shape)}
    intervals: dict[str, Interval] = {input_name: ([0] * input_shape[0], [int(input_max)] * input_shape[0])}
    for layer in layers:
        check_kind(layer)
        missing = [s for s in layer.sources() if s not in shapes]
        if missing:
            raise ShapeError(f"layer {layer.name!r} reads {missing}, which no earlier layer produces")
        in_shapes = [shapes[s] for s in layer.sources()]
        shapes[layer.output] = _bounded(layer, layer.out_shape(in_shapes))
        intervals[layer.output] = layer.interval(in_shapes, [intervals[s] for s in layer.sources()])
    bounds = {name: max([abs(v) for v in lo] + [abs(v) for v in hi] + [0]) for name, (lo, hi) in intervals.items()}
    return shapes, bounds


def build_model(layers: tuple[Layer, ...], input_name: str, input_shape: tuple[int, int, int], input_max: int,
                output: str, meta: dict | None = None) -> IntegerModel:
    """An :class:`IntegerModel` with shapes and bounds derived from its layers."""
    shapes, bounds = infer_shapes_and_bounds(layers, input_name, input_shape, input_max)
    if output not in shapes or len(shapes[output]) != 1:
        raise ShapeError(f"output {output!r} must be a computed 1-D tensor")
    return IntegerModel(layers, tuple(input_shape), input_max, input_name, output, shapes[output][0], shapes, bounds,
                        dict(meta or {}))


# --- from floats to the model's integers ----------------------------------------------------------


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


def to_ints(values: np.ndarray) -> np.ndarray:
    """Round floats to exact Python ints (object array, same shape); no int64 on the way."""
    return np.array([int(v) for v in np.rint(values).ravel()], dtype=object).reshape(values.shape)


# --- the owner's JSON file ---------------------------------------------------------------------


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
        "layers": [layer.to_file() for layer in model.layers],
    }
    target = Path(path)
    partial = target.with_name(target.name + ".partial")
    partial.write_text(json.dumps(document, indent=1))
    os.replace(partial, target)  # a reader never sees a half-written model


def load_integer_model(path: str | Path) -> IntegerModel:
    """Read a model written by :func:`save_integer_model`; :class:`BadRequest` if anything is off."""
    source = Path(path)
    try:
        document = read_json_file(source, MODEL_FILE_LIMITS, f"integer model file {str(source)!r}")
    except FileNotFoundError as e:
        raise BadRequest(f"integer model file {str(source)!r} does not exist") from e
    except OSError as e:
        raise BadRequest(f"integer model file {str(source)!r} is not readable: {e.strerror or e}") from e
    try:
        return _model_from_file(document)
    except HECNNError as e:
        raise BadRequest(f"integer model file {str(source)!r} is invalid: {e}") from e


def _model_from_file(document: Any) -> IntegerModel:
    top = parse.expect_dict(document, "the file")
    if top.get("format") != FORMAT:
        raise BadRequest(f"expected format {FORMAT!r}, got {parse.shown(top.get('format'))}")
    if top.get("version") != FORMAT_VERSION:
        raise BadRequest(f"expected format version {FORMAT_VERSION}, got {parse.shown(top.get('version'))}")
    input_name, input_shape, input_max, output, num_classes = _read_io(top, "")
    meta = parse.expect_dict(parse.field(top, "meta"), "meta")
    Preprocessing.declared(meta.get("preprocessing"), input_shape, input_max)  # a bad one fails here, not at upload
    TrainingPrivacy.declared(meta.get("privacy"))
    raw_layers = parse.field(top, "layers")
    if not isinstance(raw_layers, list) or not raw_layers:
        raise BadRequest("layers must be a non-empty list")
    layers = tuple(layer_from_file(raw, f"layer {i}") for i, raw in enumerate(raw_layers))
    _check_wiring(layers, input_name, input_shape, output, num_classes)
    shapes, bounds = infer_shapes_and_bounds(layers, input_name, input_shape, input_max)
    return IntegerModel(layers, input_shape, input_max, input_name, output, num_classes, shapes, bounds, meta)
