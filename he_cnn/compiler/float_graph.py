"""The compiler's float model: a small graph of float operations over named tensors, and its evaluator.

The ONNX importer (:mod:`he_cnn.compiler.onnx_import`) turns a model file into this graph; the
lowering (:mod:`he_cnn.compiler.lower`) turns the graph into the exact integer model. In between, the
graph is the one place where the user's network is a plain float function: :meth:`FloatGraph.__call__`
evaluates it in float64 on a batch (vectorised with numpy, batch-first), which is what the tests hold
against torch and what calibrates the integer model's requantising shifts. Each operation is one
frozen dataclass deriving from :class:`FloatOp` that knows its output shape and its evaluation;
shapes are per sample (the batch axis is never part of a shape here): ``(C, H, W)`` or ``(F,)``.
Shape inference bounds every tensor (:data:`MAX_TENSOR_ELEMENTS`, :data:`MAX_GRAPH_ELEMENTS` in all)
and every padding (:data:`MAX_PAD`), so a hostile model is refused before its evaluation allocates.

The rewrites the importer applies before lowering live here too, since each is a statement about
float functions: :func:`fold_affine` (a BatchNormalization or a constant bias add into the Conv/Gemm
before it), :func:`swap_relu_maxpool` (relu(max(S)) = max(relu(S)) for every non-empty window S, so
the costly secure ReLU sees the pooled, fewer values - what the ICNN does by hand), :func:`prune`
(operations that do not reach the output) and :func:`fold_normalisation` (the user's per-channel
``(p - mean) / std`` into the first linear layers, so the integer model reads the pixels themselves).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import ClassVar, Iterator

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from he_cnn.graph.integer_model import MAX_TENSOR_ELEMENTS
from he_cnn.graph.layers import MAX_PAD
from he_cnn.errors import BadRequest, ShapeError, UnsupportedLayer

Shape = tuple[int, ...]
Pair = tuple[int, int]

#: images evaluated at once, at most
CHUNK = 64
#: the most elements all tensors of a graph may have together, per image; the evaluation holds every
#: tensor of a chunk at once, so a chunk has at most this many elements in all (at least one image)
MAX_GRAPH_ELEMENTS = 1 << 24
#: the most elements a convolution's patches may have at once (it evaluates a few images or output
#: rows at a time); one output row of one image must fit
MAX_PATCH_ELEMENTS = 1 << 24
#: the most zero padding on one side (the integer Pad layer's limit, he_cnn.graph.layers.Pad)


@dataclass(frozen=True, eq=False)
class FloatOp:
    """One float operation; its output tensor is named after the operation (``name``)."""

    kind: ClassVar[str] = ""
    name: str
    inputs: tuple[str, ...]

    def out_shape(self, shapes: list[Shape]) -> Shape:
        """The output shape for these input shapes; :class:`ShapeError` where they do not fit."""
        raise NotImplementedError

    def run(self, xs: list[np.ndarray]) -> np.ndarray:
        """The output for batch-first float64 inputs."""
        raise NotImplementedError


def _spatial(op: FloatOp, shape: Shape) -> tuple[int, int, int]:
    if len(shape) != 3:
        raise ShapeError(f"{op.name}: {op.kind} expects a (C, H, W) tensor, got shape {shape}")
    return shape  # type: ignore[return-value]


def _window_shape(op: FloatOp, shape: Shape, kernel: Pair, stride: Pair, padding: Pair) -> tuple[int, int]:
    c, h, w = _spatial(op, shape)
    if len(kernel) != 2 or len(stride) != 2 or len(padding) != 2 or min(kernel) < 1 or min(stride) < 1 \
            or not 0 <= min(padding) <= max(padding) <= MAX_PAD:
        raise ShapeError(f"{op.name}: window {kernel} stride {stride} pad {padding} is not a 2-D window with "
                         f"strides >= 1 and pads in [0, {MAX_PAD}]")
    _bounded(op, f"the padded input of {op.name!r}", (c, h + 2 * padding[0], w + 2 * padding[1]))
    out = tuple((n + 2 * p - k) // s + 1 for n, k, s, p in zip((h, w), kernel, stride, padding))
    if min(out) < 1:
        raise ShapeError(f"{op.name}: window {kernel} stride {stride} pad {padding} does not fit input {shape}")
    return out  # type: ignore[return-value]


def _bounded(op: FloatOp, what: str, shape: Shape) -> Shape:
    """``shape``, refused where a tensor of it would have more than :data:`MAX_TENSOR_ELEMENTS` elements."""
    elements = math.prod(shape)
    if elements > MAX_TENSOR_ELEMENTS:
        raise BadRequest(f"{what} ({op.kind}) would have shape {tuple(shape)}: {elements} elements per image, "
                         f"more than {MAX_TENSOR_ELEMENTS}")
    return shape


def inferred_shape(op: FloatOp, shapes: list[Shape]) -> Shape:
    """The output shape of ``op`` (:class:`ShapeError` where the inputs do not fit), refused with
    :class:`BadRequest` where its tensor would exceed :data:`MAX_TENSOR_ELEMENTS`."""
    return _bounded(op, f"tensor {op.name!r}", tuple(op.out_shape(shapes)))


def _windows(x: np.ndarray, kernel: Pair, stride: Pair, padding: Pair, fill: float) -> np.ndarray:
    """(n, C, OH, OW, kh, kw) windows of a batch, padded with ``fill`` (a view where possible)."""
    (ph, pw), (sh, sw) = padding, stride
    if ph or pw:
        x = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=fill)
    return sliding_window_view(x, kernel, axis=(2, 3))[:, :, ::sh, ::sw]


@dataclass(frozen=True, eq=False)
class ConvOp(FloatOp):
    """``weight (C_out, C_in, kh, kw) * x + bias`` with stride and symmetric zero padding per axis
    (a grouped convolution arrives here expanded, block-diagonally)."""

    kind: ClassVar[str] = "Conv"
    weight: np.ndarray
    bias: np.ndarray
    stride: Pair = (1, 1)
    padding: Pair = (0, 0)

    def out_shape(self, shapes: list[Shape]) -> Shape:
        c = _spatial(self, shapes[0])[0]
        if c != self.weight.shape[1]:
            raise ShapeError(f"{self.name}: weight {self.weight.shape} does not fit {c} input channels")
        oh, ow = _window_shape(self, shapes[0], self.weight.shape[2:], self.stride, self.padding)
        row = c * ow * math.prod(self.weight.shape[2:])
        if row > MAX_PATCH_ELEMENTS:
            raise BadRequest(f"{self.name} ({self.kind}): one output row reads {row} input values, more than "
                             f"{MAX_PATCH_ELEMENTS}")
        return (self.weight.shape[0], oh, ow)

    def run(self, xs: list[np.ndarray]) -> np.ndarray:
        """The einsum copies the patches it reads: a few images, or a few output rows of one, at a time."""
        patches = _windows(xs[0], self.weight.shape[2:], self.stride, self.padding, 0.0)
        n, _, oh, ow = patches.shape[:4]
        row = math.prod(patches.shape[1:]) // oh  # the patches of one output row of one image
        rows = min(oh, max(1, MAX_PATCH_ELEMENTS // row))
        images = max(1, MAX_PATCH_ELEMENTS // (row * oh))
        out = np.empty((n, self.weight.shape[0], oh, ow))
        for i in range(0, n, images):
            for r in range(0, oh, rows):
                out[i:i + images, :, r:r + rows] = np.einsum("nchwuv,ocuv->nohw", patches[i:i + images, :, r:r + rows],
                                                             self.weight, optimize=True)
        return out + self.bias[None, :, None, None]


@dataclass(frozen=True, eq=False)
class DenseOp(FloatOp):
    """``weight (out, in) @ x + bias`` on a flat tensor."""

    kind: ClassVar[str] = "Dense"
    weight: np.ndarray
    bias: np.ndarray

    def out_shape(self, shapes: list[Shape]) -> Shape:
        if shapes[0] != (self.weight.shape[1],):
            raise ShapeError(f"{self.name}: weight {self.weight.shape} does not fit input of shape {shapes[0]} "
                             "(a dense layer reads a flat tensor)")
        return (self.weight.shape[0],)

    def run(self, xs: list[np.ndarray]) -> np.ndarray:
        return xs[0] @ self.weight.T + self.bias


@dataclass(frozen=True, eq=False)
class AffineOp(FloatOp):
    """``x * scale[c] + shift[c]`` per channel (feature): a BatchNormalization or a constant bias add.
    The importer folds it into the linear layer before it; the integer catalogue has no such layer."""

    kind: ClassVar[str] = "Affine"
    scale: np.ndarray
    shift: np.ndarray
    origin: str = "BatchNormalization"  # the ONNX operation it stands for, for messages

    def out_shape(self, shapes: list[Shape]) -> Shape:
        if not shapes[0] or shapes[0][0] != self.scale.shape[0]:
            raise ShapeError(f"{self.name}: {self.scale.shape[0]} per-channel factors do not fit shape {shapes[0]}")
        return shapes[0]

    def run(self, xs: list[np.ndarray]) -> np.ndarray:
        axes = (slice(None),) + (None,) * (xs[0].ndim - 2)
        return xs[0] * self.scale[axes] + self.shift[axes]


@dataclass(frozen=True, eq=False)
class ReluOp(FloatOp):
    kind: ClassVar[str] = "Relu"

    def out_shape(self, shapes: list[Shape]) -> Shape:
        return shapes[0]

    def run(self, xs: list[np.ndarray]) -> np.ndarray:
        return np.maximum(xs[0], 0.0)


@dataclass(frozen=True, eq=False)
class PoolOp(FloatOp):
    """A pooling window: the base of MaxPoolOp and AvgPoolOp."""

    kernel: Pair
    stride: Pair
    padding: Pair = (0, 0)

    def out_shape(self, shapes: list[Shape]) -> Shape:
        return (shapes[0][0], *_window_shape(self, shapes[0], self.kernel, self.stride, self.padding))


@dataclass(frozen=True, eq=False)
class MaxPoolOp(PoolOp):
    """Window maxima; padded positions never win (torch's -inf padding)."""

    kind: ClassVar[str] = "MaxPool"

    def run(self, xs: list[np.ndarray]) -> np.ndarray:
        return _windows(xs[0], self.kernel, self.stride, self.padding, -np.inf).max(axis=(-2, -1))


@dataclass(frozen=True, eq=False)
class AvgPoolOp(PoolOp):
    """Window means over kh * kw cells, zero padding counted (ONNX ``count_include_pad=1``)."""

    kind: ClassVar[str] = "AveragePool"

    def run(self, xs: list[np.ndarray]) -> np.ndarray:
        return _windows(xs[0], self.kernel, self.stride, self.padding, 0.0).mean(axis=(-2, -1))


@dataclass(frozen=True, eq=False)
class AddOp(FloatOp):
    kind: ClassVar[str] = "Add"

    def out_shape(self, shapes: list[Shape]) -> Shape:
        if len(set(shapes)) != 1:
            raise ShapeError(f"{self.name}: added tensors must have one shape (no broadcasting); got {shapes}")
        return shapes[0]

    def run(self, xs: list[np.ndarray]) -> np.ndarray:
        return sum(xs[1:], xs[0])


@dataclass(frozen=True, eq=False)
class ConcatOp(FloatOp):
    """Concatenation along the channel axis."""

    kind: ClassVar[str] = "Concat"

    def out_shape(self, shapes: list[Shape]) -> Shape:
        if any(len(s) != 3 for s in shapes) or len({s[1:] for s in shapes}) != 1:
            raise ShapeError(f"{self.name}: concatenated tensors must be (C, H, W) with one H, W; got {shapes}")
        return (sum(s[0] for s in shapes), *shapes[0][1:])

    def run(self, xs: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(xs, axis=1)


@dataclass(frozen=True, eq=False)
class FlattenOp(FloatOp):
    kind: ClassVar[str] = "Flatten"

    def out_shape(self, shapes: list[Shape]) -> Shape:
        return (math.prod(_spatial(self, shapes[0])),)

    def run(self, xs: list[np.ndarray]) -> np.ndarray:
        return xs[0].reshape(xs[0].shape[0], -1)


@dataclass(frozen=True, eq=False)
class PadOp(FloatOp):
    """Zero padding by (top, left, bottom, right)."""

    kind: ClassVar[str] = "Pad"
    pads: tuple[int, int, int, int]

    def out_shape(self, shapes: list[Shape]) -> Shape:
        c, h, w = _spatial(self, shapes[0])
        if len(self.pads) != 4 or not 0 <= min(self.pads) <= max(self.pads) <= MAX_PAD:
            raise ShapeError(f"{self.name}: pads must be 4 integers in [0, {MAX_PAD}] (top, left, bottom, right); "
                             f"got {list(self.pads)}")
        top, left, bottom, right = self.pads
        return (c, h + top + bottom, w + left + right)

    def run(self, xs: list[np.ndarray]) -> np.ndarray:
        top, left, bottom, right = self.pads
        return np.pad(xs[0], ((0, 0), (0, 0), (top, bottom), (left, right)))


LINEAR_OPS = (ConvOp, DenseOp)


@dataclass(frozen=True)
class FloatGraph:
    """Operations in execution order over named tensors; ``shapes`` (per sample) is derived.

    Calling the graph evaluates it on a batch ``(n, C, H, W)`` and returns the output ``(n, F)``.
    """

    ops: tuple[FloatOp, ...]
    input_name: str
    input_shape: tuple[int, int, int]
    output: str
    shapes: dict[str, Shape] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        elements = math.prod(self.input_shape)
        if len(self.input_shape) != 3 or elements > MAX_TENSOR_ELEMENTS:
            raise BadRequest(f"the input {self.input_name!r} must be (C, H, W) of at most {MAX_TENSOR_ELEMENTS} "
                             f"elements; got {tuple(self.input_shape)}")
        shapes: dict[str, Shape] = {self.input_name: tuple(self.input_shape)}
        for op in self.ops:
            missing = [t for t in op.inputs if t not in shapes]
            if missing or op.name in shapes:
                raise ShapeError(f"{op.name}: reads unknown tensors {missing} or rewrites an existing one")
            shapes[op.name] = inferred_shape(op, [shapes[t] for t in op.inputs])
            elements += math.prod(shapes[op.name])
            if elements > MAX_GRAPH_ELEMENTS:
                raise BadRequest(f"the graph's tensors up to {op.name!r} have {elements} elements per image, more "
                                 f"than {MAX_GRAPH_ELEMENTS}")
        if self.output not in shapes:
            raise ShapeError(f"output {self.output!r} is computed by no operation")
        self.shapes.clear()
        self.shapes.update(shapes)

    def consumers(self) -> dict[str, list[FloatOp]]:
        """Tensor name -> the operations that read it (once per reading operation)."""
        found: dict[str, list[FloatOp]] = {}
        for op in self.ops:
            for name in dict.fromkeys(op.inputs):
                found.setdefault(name, []).append(op)
        return found

    def with_ops(self, ops: list[FloatOp], output: str | None = None) -> "FloatGraph":
        return FloatGraph(tuple(ops), self.input_name, self.input_shape, output or self.output)

    # -- evaluation -----------------------------------------------------------------------------------
    def tensors(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Every tensor of the graph for one batch (keep it small: nothing is freed)."""
        batch = np.asarray(x, dtype=np.float64)
        if batch.ndim != 4 or batch.shape[1:] != tuple(self.input_shape):
            raise ShapeError(f"expected images of shape (n, {', '.join(map(str, self.input_shape))}), "
                             f"got {batch.shape}")
        values = {self.input_name: batch}
        for op in self.ops:
            values[op.name] = op.run([values[t] for t in op.inputs])
        return values

    def __call__(self, x: np.ndarray) -> np.ndarray:
        outputs = [values[self.output] for values in self._chunks(x)]
        return np.concatenate(outputs) if outputs else np.zeros((0, *self.shapes[self.output]))

    def peaks(self, x: np.ndarray) -> dict[str, float]:
        """The largest value of every tensor over the batch (what calibrates requantisation)."""
        peaks: dict[str, float] = {}
        for values in self._chunks(x):
            for name, value in values.items():
                peaks[name] = max(peaks.get(name, -np.inf), float(value.max()))
        return peaks

    def _chunks(self, x: np.ndarray) -> Iterator[dict[str, np.ndarray]]:
        """Every tensor, :data:`CHUNK` images at a time, or fewer where their tensors would hold more than
        :data:`MAX_GRAPH_ELEMENTS` elements."""
        batch = np.asarray(x, dtype=np.float64)
        step = max(1, min(CHUNK, MAX_GRAPH_ELEMENTS // sum(math.prod(s) for s in self.shapes.values())))
        for start in range(0, len(batch), step):
            yield self.tensors(batch[start:start + step])


# --- rewrites --------------------------------------------------------------------------------------


def fold_affine(graph: FloatGraph) -> FloatGraph:
    """Fold every per-channel affine (BatchNormalization, constant bias add) into the Conv or Dense
    that produces its input and that nothing else reads: w' = w * scale[c], b' = b * scale[c] + shift[c].

    Raises :class:`UnsupportedLayer` for an affine without such a producer: the integer catalogue has
    no per-channel multiplication of its own.
    """
    ops, output = list(graph.ops), graph.output
    while (affine := next((op for op in ops if isinstance(op, AffineOp)), None)) is not None:
        source = affine.inputs[0]
        at = next((i for i, op in enumerate(ops) if op.name == source), None)
        producer = ops[at] if at is not None else None
        shared = source == output or any(source in op.inputs for op in ops if op is not affine)
        if not isinstance(producer, LINEAR_OPS) or shared:
            raise UnsupportedLayer(
                f"node {affine.name!r} ({affine.origin}) must directly follow a Conv or Gemm/MatMul whose "
                "output only it reads: it is folded into that layer's weights, and he-cnn has no per-channel "
                "multiplication of its own")
        axes = (slice(None),) + (None,) * (producer.weight.ndim - 1)
        ops[at] = dataclasses.replace(producer, weight=producer.weight * affine.scale[axes],
                                      bias=producer.bias * affine.scale + affine.shift)
        ops.remove(affine)
        ops, output = _renamed(ops, output, affine.name, producer.name)
    return graph.with_ops(ops, output)


def swap_relu_maxpool(graph: FloatGraph) -> FloatGraph:
    """Run each ReLU whose only reader is a max-pool after that pool instead: max(relu(S)) =
    relu(max(S)) for every window S (never empty: padding is at most half a window), and the secure
    ReLU, the costly comparison, then sees the pooled values only. Both keep their names; the pool's
    readers read the ReLU."""
    ops, output = list(graph.ops), graph.output
    for k in range(len(ops)):
        relu = ops[k]
        readers = [op for op in ops if relu.name in op.inputs]
        if not isinstance(relu, ReluOp) or relu.name == output or len(readers) != 1 \
                or not isinstance(readers[0], MaxPoolOp):
            continue
        pool = readers[0]
        j = ops.index(pool)
        ops, output = _renamed(ops, output, pool.name, relu.name)  # positions k and j stay as they are
        ops[k] = dataclasses.replace(pool, inputs=relu.inputs)
        ops[j] = dataclasses.replace(relu, inputs=(pool.name,))
    return graph.with_ops(ops, output)


def prune(graph: FloatGraph) -> FloatGraph:
    """Drop the operations whose output does not reach the graph's output."""
    needed = {graph.output}
    for op in reversed(graph.ops):
        if op.name in needed:
            needed.update(op.inputs)
    if graph.input_name not in needed:
        raise UnsupportedLayer("the model's output does not depend on its input")
    return graph.with_ops([op for op in graph.ops if op.name in needed])


def fold_normalisation(graph: FloatGraph, mean: np.ndarray, std: np.ndarray) -> tuple[FloatGraph, list[str]]:
    """The graph on pixels p, for ``graph`` on normalised inputs (p - mean[c]) / std[c].

    Every reader of the input must be a Conv, or a Flatten read only by Dense layers; their weights
    absorb the normalisation: w' = w / std[c], b' = b - sum w * mean[c] / std[c]. Exact, except that a
    convolution's zero padding then pads p with 0 where the float model padded (p - mean) / std with 0:
    the two agree only where mean = 0 (returned as a notice; the measured agreement includes it).
    Raises :class:`UnsupportedLayer` for any other reader.
    """
    if not np.any(mean) and np.all(std == 1.0):
        return graph, []
    ops = list(graph.ops)
    consumers = graph.consumers()
    notices: list[str] = []
    for reader in consumers.get(graph.input_name, []):
        if isinstance(reader, ConvOp):
            ops[ops.index(reader)] = _normalised(reader, mean, std)
            if any(reader.padding) and np.any(mean):
                notices.append(f"the normalisation is folded into {reader.name!r}, whose zero padding now pads "
                               "the pixels with 0 rather than the normalised input: exact only where mean = 0")
            continue
        dense = consumers.get(reader.name, [])
        if not isinstance(reader, FlattenOp) or not dense or not all(isinstance(d, DenseOp) for d in dense) \
                or reader.name == graph.output:
            raise UnsupportedLayer(
                f"node {reader.name!r} ({reader.kind}) reads the normalised input: the normalisation (mean "
                "and std) can only be folded into a Conv or Gemm/MatMul reading the input")
        for d in dense:
            ops[ops.index(d)] = _normalised(d, mean, std)
    return graph.with_ops(ops), notices


def _normalised(op: ConvOp | DenseOp, mean: np.ndarray, std: np.ndarray) -> ConvOp | DenseOp:
    """The layer with (x - mean[c]) / std[c] folded in. Its inputs are channel-major (a kernel's
    (C, kh, kw), a flattened (C, H, W)), so each channel's weights are one contiguous run."""
    weight = op.weight.reshape(op.weight.shape[0], len(mean), -1) / std[None, :, None]  # (out, C, taps)
    bias = op.bias - np.einsum("ocf,c->o", weight, mean)
    return dataclasses.replace(op, weight=weight.reshape(op.weight.shape), bias=bias)


def _renamed(ops: list[FloatOp], output: str, old: str, new: str) -> tuple[list[FloatOp], str]:
    """Every reading of tensor ``old`` redirected to ``new``."""
    ops = [dataclasses.replace(op, inputs=tuple(new if t == old else t for t in op.inputs))
           if old in op.inputs else op for op in ops]
    return ops, new if output == old else output
