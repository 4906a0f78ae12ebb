"""ONNX import: a model file, bounded and checked, becomes the compiler's float graph.

:func:`read_onnx` bounds the file's size before it parses it, parses it without following external
data (external data is read only from the model's folder, every tensor's bytes counted), and runs
``onnx.checker``; every failure is a :class:`~he_cnn.errors.BadRequest`. :func:`import_onnx` drops
the nodes that do not reach the output, then walks the rest once, in its (topological) order:

* a node of :data:`FOLDED_OPS` (shape arithmetic) whose inputs are all constants (initializers,
  ``Constant`` outputs, shapes of data tensors, which are static here with a batch of 1) is evaluated
  at once (``onnx.reference``), so the shape arithmetic of the legacy exporter (Shape, Gather,
  Concat, Cast, Slice, ConstantOfShape, Reshape on constants, ...) disappears; its output's size is
  bounded from its inputs' shapes before it is computed, and all folded constants together are
  bounded too;
* every other node must be one of :data:`CONVERTERS` (the supported operations, one converter each)
  and becomes :class:`~he_cnn.compiler.float_graph.FloatOp` objects; anything else is an
  :class:`~he_cnn.errors.UnsupportedLayer` naming the node, its operation and the supported list.

A hostile file is expected here: sizes are bounded before anything is allocated (constants, pads,
every tensor of the float graph), weights must be finite, and whatever else goes wrong on a malformed
model ends as a :class:`~he_cnn.errors.BadRequest` naming what was wrong.

The result is then cleaned by the float graph's rewrites: unused operations pruned, BatchNormalization
and constant bias adds folded into the Conv/Gemm before them, ReLU-then-MaxPool swapped. Tensors keep
their ONNX names, made safe (letters, digits, ``_ . -``) and unique; the integer layers inherit them.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import onnx.external_data_helper
from google.protobuf.message import DecodeError
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator

from he_cnn.compiler.float_graph import (MAX_PAD, MAX_TENSOR_ELEMENTS, AddOp, AffineOp, AvgPoolOp, ConcatOp,
                                         ConvOp, DenseOp, FlattenOp, FloatGraph, FloatOp, MaxPoolOp, PadOp,
                                         ReluOp, Shape, fold_affine, inferred_shape, prune, swap_relu_maxpool)
from he_cnn.errors import BadRequest, HECNNError, ShapeError, UnsupportedLayer

#: the largest model file read (weights included)
MAX_MODEL_BYTES = 256 << 20
#: the most nodes a graph may have
MAX_NODES = 20_000
#: the most elements one initializer, or all folded constants together, may have (a shape subgraph
#: never comes close); a grouped convolution's expanded weight too
MAX_CONSTANT_ELEMENTS = 1 << 25
FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
               onnx.TensorProto.BFLOAT16}
#: the element types an external data file may hold (fixed width: its length follows from the dims)
EXTERNAL_TYPES = FLOAT_TYPES | {getattr(onnx.TensorProto, t) for t in ("INT8", "INT16", "INT32", "INT64", "UINT8",
                                                                     "UINT16", "UINT32", "UINT64", "BOOL")}
#: elementwise operations folded on constants: their output has the inputs' broadcast shape
BROADCASTING_OPS = frozenset({
    "Add", "Sub", "Mul", "Div", "Pow", "Mod", "Min", "Max", "Sum", "Mean", "Equal", "Less", "Greater",
    "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor", "Not", "Neg", "Abs", "Floor", "Ceil", "Round", "Sqrt",
    "Reciprocal", "Sign", "Relu", "Clip", "Where"})
#: operations folded on constants whose output has at most as many elements as their largest input
SHRINKING_OPS = frozenset({
    "Identity", "Cast", "CastLike", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Slice",
    "ReduceProd", "ReduceSum", "ReduceMin", "ReduceMax", "ReduceMean"})
#: the operations evaluated on constants (shape arithmetic): a bound on each one's output size is
#: known from its inputs' shapes and values (:func:`_fold_bound`) before it is evaluated
FOLDED_OPS = BROADCASTING_OPS | SHRINKING_OPS | {"Constant", "Shape", "Size", "Concat", "Gather",
                                                 "ConstantOfShape", "Expand", "Tile", "Range"}
#: what malformed input makes onnx, numpy and the converters raise, turned into BadRequest
MALFORMED = (ValueError, TypeError, IndexError, KeyError, AttributeError, ArithmeticError, RuntimeError,
             DecodeError, onnx.checker.ValidationError)

ModelSource = str | os.PathLike | bytes | bytearray | onnx.ModelProto


def read_onnx(source: ModelSource) -> onnx.ModelProto:
    """The checked ``ModelProto`` of a path, the bytes of a file, or a ``ModelProto``.

    A file's weights may lie in external data files (torch writes ``model.onnx.data`` next to
    ``model.onnx``): they are read only from a path source, only from files inside the model's folder,
    and count towards :data:`MAX_MODEL_BYTES`. Every failure is a :class:`BadRequest`.
    """
    try:
        return _read(source)
    except HECNNError:
        raise
    except (OSError, *MALFORMED) as e:
        raise BadRequest(f"cannot read the ONNX model: {type(e).__name__}: {str(e)[:300]}") from e


def _read(source: ModelSource) -> onnx.ModelProto:
    if isinstance(source, onnx.ModelProto):
        if source.ByteSize() > MAX_MODEL_BYTES:
            raise BadRequest(f"the ONNX model has {source.ByteSize()} bytes, more than {MAX_MODEL_BYTES}")
        model = source
    else:
        data = _bounded_bytes(source)
        model = _parse(data)
    if len(model.graph.node) > MAX_NODES:
        raise BadRequest(f"the ONNX graph has {len(model.graph.node)} nodes, more than {MAX_NODES}")
    external = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    if external:
        if not isinstance(source, (str, os.PathLike)):
            raise BadRequest(f"initializer {external[0].name!r} keeps its data in an external file; pass the "
                             "model's path (its data files next to it) or save it with the weights inside")
        _load_external(external, Path(source).parent, len(data))
    try:
        onnx.checker.check_model(model)
    except Exception as e:  # the checker raises ValidationError, and C++ errors for broken protos
        raise BadRequest(f"the ONNX model does not pass onnx.checker: {str(e).strip()[:300]}") from e
    return model


def _load_external(tensors: list[onnx.TensorProto], folder: Path, size: int) -> None:
    """Read the external data of ``tensors`` from files inside ``folder``. Every tensor's bytes count
    (many tensors may read one file), each must be what its dims and type make, and together with the
    model's ``size`` they are bounded by :data:`MAX_MODEL_BYTES` before anything is read."""
    root = folder.resolve()
    for tensor in tensors:
        where = f"initializer {tensor.name!r}"
        try:
            info = onnx.external_data_helper.ExternalDataInfo(tensor)
            location, offset = str(info.location), int(info.offset or 0)
            target = (root / location).resolve()
            if not location or Path(location).is_absolute() or root not in target.parents or not target.is_file():
                raise BadRequest(f"{where}: external data {location[:80]!r} is not a file in the model's folder")
            available = target.stat().st_size - offset
            length = available if info.length is None else int(info.length)
        except (OSError, ValueError, TypeError) as e:
            raise BadRequest(f"{where}: malformed external data reference: {str(e)[:200]}") from e
        if tensor.data_type not in EXTERNAL_TYPES:
            raise BadRequest(f"{where}: external data must hold fixed-width numbers, not element type "
                             f"{tensor.data_type}")
        expected = _count(tensor.dims, where) * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
        if not 0 <= length <= available or length != expected:
            raise BadRequest(f"{where}: external data of {length} bytes at offset {offset} of a "
                             f"{available + offset}-byte file; its dims {list(tensor.dims)} need {expected} bytes")
        size += length
        if size > MAX_MODEL_BYTES:
            raise BadRequest(f"the ONNX model and the external data of its tensors have more than {MAX_MODEL_BYTES} "
                             f"bytes (counted up to {where})")
    try:
        for tensor in tensors:
            onnx.external_data_helper.load_external_data_for_tensor(tensor, str(root))
    except (OSError, ValueError) as e:
        raise BadRequest(f"cannot read the ONNX model's external data: {e}") from e


def _count(dims: Any, what: str) -> int:
    """The number of elements of a shape given as a sequence (or 1-D array) of non-negative integers."""
    values = [int(v) for v in np.asarray(dims).ravel()]
    if any(v < 0 for v in values):
        raise BadRequest(f"{what}: dimensions {values[:8]} must not be negative")
    return math.prod(values)


def import_onnx(model: onnx.ModelProto) -> tuple[FloatGraph, list[str]]:
    """The float graph of a checked model, and notices about what the import changed.

    Raises :class:`UnsupportedLayer` for what he-cnn cannot compile and :class:`BadRequest` for a
    malformed or oversized model.
    """
    try:
        importer = _Importer(model)
        graph = importer.run()
        return swap_relu_maxpool(fold_affine(prune(graph))), importer.notices
    except ShapeError as e:
        raise BadRequest(f"the ONNX model's tensors do not fit together: {e}") from e
    except HECNNError:
        raise
    except MALFORMED as e:
        raise BadRequest(f"malformed ONNX model: {type(e).__name__}: {str(e)[:300]}") from e


def _bounded_bytes(source: str | os.PathLike | bytes | bytearray) -> bytes:
    if isinstance(source, (bytes, bytearray)):
        data = bytes(source)
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        try:
            size = path.stat().st_size
            if size > MAX_MODEL_BYTES:
                raise BadRequest(f"ONNX file {str(path)!r} has {size} bytes, more than {MAX_MODEL_BYTES}")
            with path.open("rb") as file:
                data = file.read(MAX_MODEL_BYTES + 1)
        except OSError as e:
            raise BadRequest(f"cannot read ONNX file {str(path)!r}: {e.strerror or e}") from e
    else:
        raise BadRequest(f"expected a torch module, an ONNX file path, its bytes or an onnx.ModelProto; "
                         f"got {type(source).__name__}")
    if len(data) > MAX_MODEL_BYTES:
        raise BadRequest(f"the ONNX model has more than {MAX_MODEL_BYTES} bytes")
    return data


def _parse(data: bytes) -> onnx.ModelProto:
    try:
        model = onnx.load_model_from_string(data)
    except MALFORMED as e:
        raise BadRequest(f"not an ONNX model: {str(e)[:200] or type(e).__name__}") from e
    if not model.graph.node:
        raise BadRequest("not an ONNX model: the file holds no graph nodes")
    return model


def _label(node: onnx.NodeProto) -> str:
    """How messages name a node: its name (or first output) and its operation."""
    return f"node {node.name or (node.output[0] if node.output else '')!r} ({node.op_type})"


def _attribute_tensors(attribute: onnx.AttributeProto) -> list[onnx.TensorProto]:
    sparse = [attribute.sparse_tensor] if attribute.HasField("sparse_tensor") else []
    sparse += list(attribute.sparse_tensors)
    return [attribute.t] * attribute.HasField("t") + list(attribute.tensors) + \
        [t for s in sparse for t in (s.values, s.indices)]


def _attributes(node: onnx.NodeProto) -> dict[str, Any]:
    values = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    return {k: v.decode() if isinstance(v, bytes) else v for k, v in values.items()}


class _Importer:
    """The walk over one graph: constants, data tensors (their IR names and per-sample shapes), ops."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.graph = model.graph
        self.opsets = {"": next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)}
        self.constants: dict[str, np.ndarray] = {}
        self.names: dict[str, str] = {}  # ONNX data tensor -> IR tensor (aliases point to one tensor)
        self.shapes: dict[str, Shape] = {}  # IR tensor -> per-sample shape
        self.ops: list[FloatOp] = []
        self.dropped: dict[str, str] = {}  # output of a dropped final softmax -> that node
        self.folded = 0  # elements of all folded constants
        self.notices: list[str] = []

    # -- the walk ----------------------------------------------------------------------------------
    def run(self) -> FloatGraph:
        if len(self.graph.node) > MAX_NODES:
            raise BadRequest(f"the ONNX graph has {len(self.graph.node)} nodes, more than {MAX_NODES}")
        if len(self.graph.output) != 1:
            raise UnsupportedLayer(f"the model must have one output (the class scores), it has "
                                   f"{len(self.graph.output)}")
        for tensor in self.graph.initializer:
            self.constants[tensor.name] = _initializer(tensor)
        input_name, input_shape = self._input()
        for node in self._reaching(self.graph.output[0].name):
            self._node(node)
        output = self.graph.output[0].name
        if output in self.dropped:
            self.notices.append(f"the final {self.dropped[output]} is dropped: the integer model outputs the "
                                "scores before it, which have the same argmax")
        elif output not in self.names:
            raise UnsupportedLayer(f"the model's output {output!r} does not depend on its input")
        ir_output = self.names[output]
        if len(self.shapes[ir_output]) != 1:
            raise UnsupportedLayer(f"the model's output must be class scores of shape (N, classes); "
                                   f"got (N, {', '.join(map(str, self.shapes[ir_output]))})")
        return FloatGraph(tuple(self.ops), input_name, input_shape, ir_output)

    def _input(self) -> tuple[str, tuple[int, int, int]]:
        inputs = [i for i in self.graph.input if i.name not in self.constants]
        if len(inputs) != 1:
            raise UnsupportedLayer(f"the model must have one input (a batch of images), it has {len(inputs)}: "
                                   f"{[i.name for i in inputs][:5]}")
        tensor = inputs[0].type.tensor_type
        if not inputs[0].type.HasField("tensor_type") or tensor.elem_type not in FLOAT_TYPES:
            raise UnsupportedLayer(f"the model's input {inputs[0].name!r} must be a float tensor")
        dims = tensor.shape.dim
        if len(dims) != 4:
            raise UnsupportedLayer(f"the model's input {inputs[0].name!r} has rank {len(dims)}; expected images "
                                   "of shape (N, C, H, W)")
        shape = tuple(d.dim_value if d.HasField("dim_value") else 0 for d in dims[1:])
        if min(shape) < 1:
            raise UnsupportedLayer(f"the model's input {inputs[0].name!r} must have fixed C, H, W; got "
                                   f"{[d.dim_param or d.dim_value for d in dims]}")
        if math.prod(shape) > MAX_TENSOR_ELEMENTS:
            raise BadRequest(f"the model's input {inputs[0].name!r} of shape {shape} has more than "
                             f"{MAX_TENSOR_ELEMENTS} elements per image")
        name = self._fresh(inputs[0].name)
        self.names[inputs[0].name] = name
        self.shapes[name] = shape
        return name, shape  # type: ignore[return-value]

    def _reaching(self, output: str) -> list[onnx.NodeProto]:
        """The nodes the output depends on, in graph order (nothing else is folded or converted)."""
        needed, kept = {output}, []
        for node in reversed(self.graph.node):
            if needed.intersection(node.output):
                kept.append(node)
                needed.update(node.input)
        return kept[::-1]

    def _node(self, node: onnx.NodeProto) -> None:
        label = _label(node)
        try:
            with np.errstate(all="ignore"):  # non-finite results are refused where they are used
                self._convert(node, label)
        except ShapeError as e:
            raise BadRequest(f"{label} does not fit its inputs: {e}") from e
        except HECNNError:
            raise
        except MALFORMED as e:
            raise BadRequest(f"{label} has invalid parameters: {type(e).__name__}: {str(e)[:200]}") from e

    def _convert(self, node: onnx.NodeProto, label: str) -> None:
        if node.domain not in ("", "ai.onnx") or any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                                                     for a in node.attribute):
            raise UnsupportedLayer(f"{label} is not supported: operations of domain {node.domain!r} and "
                                   "operations with subgraphs are not; supported: " + ", ".join(sorted(CONVERTERS)))
        if any(t.data_location == onnx.TensorProto.EXTERNAL for a in node.attribute for t in _attribute_tensors(a)):
            raise BadRequest(f"{label} has an attribute whose data lies in an external file; only initializers "
                             "may keep their data outside the model")
        if node.op_type == "Shape" and node.input and node.input[0] in self.names:
            return self._static_shape(node)
        constant = all(not name or name in self.constants for name in node.input)
        if constant and node.op_type in FOLDED_OPS:
            return self._fold(node, label)
        convert = CONVERTERS.get(node.op_type)
        if convert is None:
            if constant:
                raise UnsupportedLayer(f"{label} on constants is not supported: only shape arithmetic is evaluated "
                                       f"on constants ({', '.join(sorted(FOLDED_OPS))})")
            raise UnsupportedLayer(f"{label} is not supported; supported operations: {', '.join(sorted(CONVERTERS))}")
        convert(self, node)

    def _static_shape(self, node: onnx.NodeProto) -> None:
        """Shape of a data tensor: static, batch 1 (what a flatten's reshape target is made of)."""
        attributes = _attributes(node)
        full = np.array((1, *self.shapes[self.names[node.input[0]]]), dtype=np.int64)
        self.constants[node.output[0]] = full[attributes.get("start", 0):attributes.get("end", len(full))]

    def _fold(self, node: onnx.NodeProto, label: str) -> None:
        """Evaluate a node of :data:`FOLDED_OPS` on constants, its output bounded before it is made."""
        values = [self.constants[name] if name else None for name in node.input]
        try:
            promised = _fold_bound(node, values)
        except HECNNError:
            raise
        except MALFORMED as e:
            raise BadRequest(f"{label} has invalid constant inputs: {type(e).__name__}: {str(e)[:200]}") from e
        left = MAX_CONSTANT_ELEMENTS - self.folded
        if promised > left:
            raise BadRequest(f"{label} would make a constant of {promised} elements; the folded constants may have "
                             f"{MAX_CONSTANT_ELEMENTS} in all, {left} are left")
        feeds = {name: value for name, value in zip(node.input, values) if name}
        try:
            results = ReferenceEvaluator(node, opsets=self.opsets).run(None, feeds)
        except Exception as e:  # onnx.reference raises whatever its kernels raise
            raise BadRequest(f"{label} on constants could not be evaluated: {str(e)[:200]}") from e
        for name, value in zip(node.output, results):
            if name:
                value = np.asarray(value)
                self.folded += value.size
                if self.folded > MAX_CONSTANT_ELEMENTS:
                    raise BadRequest(f"{label} made a constant of {value.size} elements, more than the "
                                     f"{left} left of {MAX_CONSTANT_ELEMENTS}")
                self.constants[name] = value

    # -- what converters use -------------------------------------------------------------------------
    def data(self, node: onnx.NodeProto, index: int) -> str:
        """The IR tensor of a data input of ``node``."""
        name = node.input[index] if index < len(node.input) else ""
        if name in self.dropped:
            raise UnsupportedLayer(f"{_label(node)} reads the output of the {self.dropped[name]}: a Softmax/LogSoftmax is supported only at the end")
        if name not in self.names:
            what = "a constant" if name in self.constants else "an output he-cnn does not compute"
            raise UnsupportedLayer(f"{_label(node)} input {index} ({name!r}) is {what}; expected a tensor computed from the image")
        return self.names[name]

    def const(self, node: onnx.NodeProto, index: int, what: str) -> np.ndarray | None:
        """A constant input of ``node`` as float64 (None where the optional input is absent)."""
        name = node.input[index] if index < len(node.input) else ""
        if not name:
            return None
        if name not in self.constants:
            raise UnsupportedLayer(f"{_label(node)}: {what} must be a constant (an initializer), not computed "
                                   "from the image")
        value = self.constants[name]
        if value.dtype.kind not in "biuf":
            raise BadRequest(f"{_label(node)}: {what} {name!r} must hold numbers, not {value.dtype}")
        value = value.astype(np.float64)
        if not np.all(np.isfinite(value)):
            raise BadRequest(f"{_label(node)}: {what} {name!r} holds non-finite values (NaN or infinity)")
        return value

    def shape(self, tensor: str) -> Shape:
        return self.shapes[tensor]

    def emit(self, op_type: type[FloatOp], onnx_name: str, inputs: tuple[str, ...], **params: Any) -> str:
        """Append one float operation writing (the IR tensor of) ``onnx_name``; its IR name."""
        name = self._fresh(onnx_name)
        op = op_type(name=name, inputs=inputs, **params)
        for key, value in params.items():
            if isinstance(value, np.ndarray) and not np.all(np.isfinite(value)):
                raise BadRequest(f"{op.kind} {onnx_name!r}: its {key} is not finite (NaN or infinity), made from "
                                 "the node's constants and attributes")
        self.shapes[name] = inferred_shape(op, [self.shapes[t] for t in inputs])
        self.ops.append(op)
        self.names[onnx_name] = name
        return name

    def alias(self, node: onnx.NodeProto, source: str) -> None:
        self.names[node.output[0]] = source

    def unsupported(self, node: onnx.NodeProto, why: str) -> UnsupportedLayer:
        return UnsupportedLayer(f"{_label(node)}: {why}")

    def spatial_pads(self, node: onnx.NodeProto, tensor: str, pads: list[int], kernel: tuple[int, ...],
                     inline: Callable[[int, int], bool]) -> tuple[str, tuple[int, int]]:
        """ONNX ``pads`` (top, left, bottom, right) as the window's own symmetric (h, w) padding where
        they are symmetric and ``inline(pad, kernel size)`` holds on both axes (what the integer layer
        takes); otherwise as an explicit zero :class:`PadOp` first (then none)."""
        top, left, bottom, right = pads
        if (top, left) == (bottom, right) and len(kernel) == 2 and inline(top, kernel[0]) and inline(left, kernel[1]):
            return tensor, (top, left)
        return self.emit(PadOp, f"{node.output[0]}_pad", (tensor,), pads=(top, left, bottom, right)), (0, 0)

    def window(self, node: onnx.NodeProto, attributes: dict[str, Any]) -> tuple[tuple[int, int], list[int]]:
        """(stride, pads) of a Conv or pooling node, refusing dilation, ceil mode and SAME padding."""
        if any(d != 1 for d in attributes.get("dilations", [])):
            raise self.unsupported(node, "dilated windows are not supported")
        if attributes.get("ceil_mode", 0):
            raise self.unsupported(node, "ceil_mode=1 is not supported")
        auto_pad = attributes.get("auto_pad", "NOTSET")
        if auto_pad not in ("NOTSET", "VALID"):
            raise self.unsupported(node, f"auto_pad={auto_pad} is not supported (give explicit pads)")
        pads = list(attributes.get("pads", [0] * 4)) if auto_pad == "NOTSET" else [0] * 4
        stride = tuple(attributes.get("strides", [1, 1]))
        if len(stride) != 2 or len(attributes.get("kernel_shape", stride)) != 2:
            raise self.unsupported(node, "only 2-D windows are supported")
        return stride, self.checked_pads(node, pads, 4)  # type: ignore[return-value]

    def checked_pads(self, node: onnx.NodeProto, pads: list[int], count: int) -> list[int]:
        """``count`` non-negative pads, each at most :data:`MAX_PAD` (the integer Pad layer's limit)."""
        pads = [int(p) for p in pads]
        if len(pads) != count or min(pads, default=0) < 0:
            raise self.unsupported(node, f"pads {pads[:8]} must be {count} non-negative numbers")
        if max(pads, default=0) > MAX_PAD:
            raise BadRequest(f"{_label(node)}: pads {pads[:8]} exceed {MAX_PAD}, the most zero padding he-cnn "
                             "applies on one side")
        return pads

    def _fresh(self, onnx_name: str) -> str:
        base = re.sub(r"[^A-Za-z0-9_.-]+", "_", onnx_name).strip("_") or "tensor"
        name, k = base, 1
        while name in self.shapes:
            k += 1
            name = f"{base}_{k}"
        return name


def _initializer(tensor: onnx.TensorProto) -> np.ndarray:
    """An initializer's value, its size bounded first."""
    where = f"initializer {tensor.name!r}"
    if tensor.data_location == onnx.TensorProto.EXTERNAL:  # read_onnx loads external data from the folder
        raise BadRequest(f"{where} keeps its data in an external file; read the model with read_onnx(path)")
    elements = _count(tensor.dims, where)
    if elements > MAX_CONSTANT_ELEMENTS:
        raise BadRequest(f"{where} has {elements} elements, more than {MAX_CONSTANT_ELEMENTS}")
    try:
        return numpy_helper.to_array(tensor)
    except MALFORMED as e:
        raise BadRequest(f"{where} is malformed: {type(e).__name__}: {str(e)[:200]}") from e


def _fold_bound(node: onnx.NodeProto, values: list[np.ndarray | None]) -> int:
    """A bound on the elements of the constant a node of :data:`FOLDED_OPS` makes, from its inputs'
    shapes and values and its attributes, without evaluating it."""
    op, given = node.op_type, [v for v in values if v is not None]
    where = _label(node)
    if op in BROADCASTING_OPS:
        return math.prod(np.broadcast_shapes(*(v.shape for v in given)))
    if op in SHRINKING_OPS:
        if (op == "Cast" and _attributes(node).get("to") == onnx.TensorProto.STRING) or \
                (op == "CastLike" and given[-1].dtype.kind in "OSU"):
            raise UnsupportedLayer(f"{where}: casting to strings is not supported")
        return max((v.size for v in given), default=0)
    if op in ("Shape", "Size"):
        return max(1, given[0].ndim) if given else 1
    if op == "Concat":
        return sum(v.size for v in given)
    if op == "Gather":
        data, indices = values[0], values[1]
        axis = int(_attributes(node).get("axis", 0)) % max(data.ndim, 1)
        return math.prod(data.shape[:axis]) * indices.size * math.prod(data.shape[axis + 1:])
    if op == "ConstantOfShape":
        return _count(values[0], where)
    if op == "Expand":
        return math.prod(np.broadcast_shapes(values[0].shape, tuple(int(v) for v in values[1].ravel())))
    if op == "Tile":
        return values[0].size * _count(values[1], where)
    if op == "Range":
        start, limit, delta = (float(np.asarray(v).reshape(())) for v in values)
        return max(0, math.ceil((limit - start) / delta)) if delta else 0
    if op == "Constant":
        if any(a.HasField("sparse_tensor") for a in node.attribute):
            raise UnsupportedLayer(f"{where}: sparse constants are not supported")
        return sum(_count(a.t.dims, where) * a.HasField("t") + len(a.floats) + len(a.ints) + len(a.strings) + 1
                   for a in node.attribute)  # + 1: a scalar value
    raise UnsupportedLayer(f"{where} is not evaluated on constants")


# --- one converter per supported operation ---------------------------------------------------------


def _conv(imp: _Importer, node: onnx.NodeProto) -> None:
    attributes = _attributes(node)
    x = imp.data(node, 0)
    weight = imp.const(node, 1, "the weight")
    if weight is None or weight.ndim != 4:
        raise imp.unsupported(node, "only 2-D convolutions (a 4-D weight) are supported")
    bias = imp.const(node, 2, "the bias")
    stride, pads = imp.window(node, attributes)
    weight = _ungrouped(imp, node, weight, int(attributes.get("group", 1)), imp.shape(x))
    # the integer convolution pads less than a kernel; a 1x1 convolution with padding gets a PadOp
    x, padding = imp.spatial_pads(node, x, pads, weight.shape[2:], lambda p, k: p < k)
    imp.emit(ConvOp, node.output[0], (x,), weight=weight,
             bias=np.zeros(weight.shape[0]) if bias is None else bias.reshape(weight.shape[0]),
             stride=stride, padding=padding)


def _ungrouped(imp: _Importer, node: onnx.NodeProto, weight: np.ndarray, groups: int, shape: Shape) -> np.ndarray:
    """A grouped (depthwise) convolution's weight as an ordinary one: zeros outside each group's block."""
    c_out, c_group = weight.shape[:2]
    if len(shape) != 3 or groups < 1 or c_out % groups or shape[0] != c_group * groups:
        raise imp.unsupported(node, f"weight {weight.shape} with group={groups} does not fit input {shape}")
    if groups == 1:
        return weight
    if weight.size * groups > MAX_CONSTANT_ELEMENTS:
        raise BadRequest(f"{_label(node)}: weight {weight.shape} with group={groups} would expand to "
                         f"{weight.size * groups} elements, more than {MAX_CONSTANT_ELEMENTS}")
    full = np.zeros((c_out, shape[0], *weight.shape[2:]))
    per = c_out // groups
    for g in range(groups):
        full[g * per:(g + 1) * per, g * c_group:(g + 1) * c_group] = weight[g * per:(g + 1) * per]
    return full


def _gemm(imp: _Importer, node: onnx.NodeProto) -> None:
    attributes = _attributes(node)
    x = imp.data(node, 0)
    if attributes.get("transA", 0):
        raise imp.unsupported(node, "transA=1 is not supported")
    b = imp.const(node, 1, "the weight")
    weight = (b if attributes.get("transB", 0) else b.T) * attributes.get("alpha", 1.0)
    c = imp.const(node, 2, "the bias")
    bias = np.zeros(weight.shape[0]) if c is None else \
        np.broadcast_to(c, (1, weight.shape[0])).reshape(-1) * attributes.get("beta", 1.0)
    imp.emit(DenseOp, node.output[0], (x,), weight=weight, bias=bias)


def _matmul(imp: _Importer, node: onnx.NodeProto) -> None:
    x = imp.data(node, 0)
    weight = imp.const(node, 1, "the second factor")
    if len(imp.shape(x)) != 1 or weight.ndim != 2:
        raise imp.unsupported(node, f"only (N, F) @ (F, out) with a constant (F, out) is supported; got "
                                    f"(N, {', '.join(map(str, imp.shape(x)))}) @ {weight.shape}")
    imp.emit(DenseOp, node.output[0], (x,), weight=weight.T, bias=np.zeros(weight.shape[1]))


def _relu(imp: _Importer, node: onnx.NodeProto) -> None:
    imp.emit(ReluOp, node.output[0], (imp.data(node, 0),))


def _max_pool(imp: _Importer, node: onnx.NodeProto) -> None:
    attributes = _attributes(node)
    x = imp.data(node, 0)
    stride, pads = imp.window(node, attributes)
    kernel = tuple(attributes["kernel_shape"])
    if pads[:2] != pads[2:] or any(2 * p > k for p, k in zip(pads, kernel)):
        raise imp.unsupported(node, f"pads {pads} must be symmetric and at most half the window {kernel} for a "
                                    "max-pool")
    imp.emit(MaxPoolOp, node.output[0], (x,), kernel=kernel, stride=stride, padding=tuple(pads[:2]))


def _average_pool(imp: _Importer, node: onnx.NodeProto) -> None:
    attributes = _attributes(node)
    x = imp.data(node, 0)
    stride, pads = imp.window(node, attributes)
    if any(pads) and not attributes.get("count_include_pad", 0):
        raise imp.unsupported(node, "padding with count_include_pad=0 is not supported (windows of unequal "
                                    "size have no single scale); use count_include_pad=1")
    kernel = tuple(attributes["kernel_shape"])
    # the integer sum-pool pads at most half a window; zero padding counted in is a PadOp otherwise
    x, padding = imp.spatial_pads(node, x, pads, kernel, lambda p, k: 2 * p <= k)
    imp.emit(AvgPoolOp, node.output[0], (x,), kernel=kernel, stride=stride, padding=padding)


def _global_average_pool(imp: _Importer, node: onnx.NodeProto) -> None:
    x = imp.data(node, 0)
    shape = imp.shape(x)
    if len(shape) != 3:
        raise imp.unsupported(node, f"expects a (C, H, W) tensor, got {shape}")
    imp.emit(AvgPoolOp, node.output[0], (x,), kernel=shape[1:], stride=(1, 1))


def _reduce_mean(imp: _Importer, node: onnx.NodeProto) -> None:
    attributes = _attributes(node)
    x = imp.data(node, 0)
    shape = imp.shape(x)
    axes = attributes.get("axes")
    if axes is None:
        given = imp.const(node, 1, "the axes")
        axes = [] if given is None else [int(a) for a in given.ravel()]
    if len(shape) != 3 or sorted(a % 4 for a in axes) != [2, 3]:
        raise imp.unsupported(node, f"only a mean over H and W (axes 2, 3) of (N, C, H, W) is supported; got "
                                    f"axes {list(axes)} of rank {len(shape) + 1}")
    if attributes.get("keepdims", 1):
        imp.emit(AvgPoolOp, node.output[0], (x,), kernel=shape[1:], stride=(1, 1))
    else:
        pooled = imp.emit(AvgPoolOp, f"{node.output[0]}_pool", (x,), kernel=shape[1:], stride=(1, 1))
        imp.emit(FlattenOp, node.output[0], (pooled,))


def _batch_norm(imp: _Importer, node: onnx.NodeProto) -> None:
    attributes = _attributes(node)
    x = imp.data(node, 0)
    if attributes.get("training_mode", 0):
        raise imp.unsupported(node, "training_mode=1 is not supported (export the model in eval mode)")
    scale, shift, mean, var = (imp.const(node, i, "the statistics") for i in range(1, 5))
    factor = scale / np.sqrt(var + attributes.get("epsilon", 1e-5))
    imp.emit(AffineOp, node.output[0], (x,), scale=factor, shift=shift - mean * factor)


def _add(imp: _Importer, node: onnx.NodeProto) -> None:
    data = [i for i, name in enumerate(node.input) if name not in imp.constants]
    if len(data) == 2:
        a, b = imp.data(node, 0), imp.data(node, 1)
        imp.emit(AddOp, node.output[0], (a, b))
        return
    x = imp.data(node, data[0])
    constant = imp.const(node, 1 - data[0], "the added value")
    shape = imp.shape(x)
    full = (1, *shape)
    aligned = constant.reshape((1,) * (len(full) - constant.ndim) + constant.shape)
    if constant.ndim > len(full) or any(n != 1 for i, n in enumerate(aligned.shape) if i != 1) \
            or aligned.shape[1] not in (1, shape[0]):
        raise imp.unsupported(node, f"adding a constant of shape {constant.shape} to (N, {', '.join(map(str, shape))}) "
                                    "is supported only per channel (a bias after a Conv or MatMul)")
    shift = np.broadcast_to(aligned.reshape(-1), (shape[0],)).copy()
    imp.emit(AffineOp, node.output[0], (x,), scale=np.ones(shape[0]), shift=shift, origin="Add")


def _concat(imp: _Importer, node: onnx.NodeProto) -> None:
    inputs = tuple(imp.data(node, i) for i in range(len(node.input)))
    axis = _attributes(node)["axis"]
    if any(len(imp.shape(t)) != 3 for t in inputs) or axis % 4 != 1:
        raise imp.unsupported(node, f"only a concatenation of (N, C, H, W) tensors along channels (axis 1) is "
                                    f"supported; got axis {axis}")
    imp.emit(ConcatOp, node.output[0], inputs)


def _flatten(imp: _Importer, node: onnx.NodeProto) -> None:
    x = imp.data(node, 0)
    rank = len(imp.shape(x)) + 1
    axis = _attributes(node).get("axis", 1)
    if axis % rank != 1:
        raise imp.unsupported(node, f"only a flatten from axis 1 (keeping the batch) is supported; got axis {axis}")
    _flattened(imp, node, x)


def _reshape(imp: _Importer, node: onnx.NodeProto) -> None:
    x = imp.data(node, 0)
    shape = imp.shape(x)
    full = (1, *shape)
    target = [int(v) for v in imp.const(node, 1, "the target shape").ravel()]
    if not _attributes(node).get("allowzero", 0):
        target = [full[i] if v == 0 and i < len(full) else v for i, v in enumerate(target)]
    if target.count(-1) == 1:
        known = math.prod(v for v in target if v != -1)
        target[target.index(-1)] = math.prod(full) // known if known else 0
    if tuple(target) == full:
        imp.alias(node, x)
    elif tuple(target) == (1, math.prod(shape)):
        _flattened(imp, node, x)
    else:
        raise imp.unsupported(node, f"only a reshape to (N, -1) (a flatten) is supported; got {target} for "
                                    f"(N, {', '.join(map(str, shape))})")


def _flattened(imp: _Importer, node: onnx.NodeProto, x: str) -> None:
    if len(imp.shape(x)) == 1:
        imp.alias(node, x)
    else:
        imp.emit(FlattenOp, node.output[0], (x,))


def _pad(imp: _Importer, node: onnx.NodeProto) -> None:
    attributes = _attributes(node)
    x = imp.data(node, 0)
    shape = imp.shape(x)
    if attributes.get("mode", "constant") != "constant":
        raise imp.unsupported(node, f"mode {attributes['mode']!r} is not supported (only zero padding)")
    pads = attributes.get("pads")
    if pads is None:
        pads = [int(v) for v in imp.const(node, 1, "the pads").ravel()]
    value = imp.const(node, 2, "the padding value")
    if float(attributes.get("value", 0.0)) != 0.0 or (value is not None and np.any(value)):
        raise imp.unsupported(node, "only zero padding is supported")
    rank = len(shape) + 1
    axes = imp.const(node, 3, "the axes")
    axes = list(range(rank)) if axes is None else [int(a) % rank for a in axes.ravel()]
    pads = imp.checked_pads(node, pads, 2 * len(axes))
    begin, end = [0] * rank, [0] * rank
    for k, axis in enumerate(axes):
        begin[axis], end[axis] = pads[k], pads[len(axes) + k]
    if rank != 4 or any(begin[:2]) or any(end[:2]) or min(begin + end) < 0:
        raise imp.unsupported(node, f"only non-negative padding of H and W of (N, C, H, W) is supported; got pads "
                                    f"{pads} for rank {rank}")
    imp.emit(PadOp, node.output[0], (x,), pads=(begin[2], begin[3], end[2], end[3]))


def _identity(imp: _Importer, node: onnx.NodeProto) -> None:
    training = imp.constants.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if training is not None and bool(np.asarray(training).any()):
        raise imp.unsupported(node, "a dropout in training mode is not supported (export the model in eval mode)")
    imp.alias(node, imp.data(node, 0))


def _softmax(imp: _Importer, node: onnx.NodeProto) -> None:
    x = imp.data(node, 0)
    if len(imp.shape(x)) != 1 or _attributes(node).get("axis", -1) % 2 != 1:
        raise imp.unsupported(node, "only a final softmax over the class scores (N, classes) is supported")
    imp.alias(node, x)
    imp.dropped[node.output[0]] = f"{node.op_type} {node.name or node.output[0]!r}"


#: ONNX operation -> its converter: the operations he-cnn compiles (data path)
CONVERTERS: dict[str, Callable[[_Importer, onnx.NodeProto], None]] = {
    "Conv": _conv,
    "Gemm": _gemm,
    "MatMul": _matmul,
    "Relu": _relu,
    "MaxPool": _max_pool,
    "AveragePool": _average_pool,
    "GlobalAveragePool": _global_average_pool,
    "ReduceMean": _reduce_mean,
    "BatchNormalization": _batch_norm,
    "Add": _add,
    "Concat": _concat,
    "Flatten": _flatten,
    "Reshape": _reshape,
    "Pad": _pad,
    "Identity": _identity,
    "Dropout": _identity,
    "Softmax": _softmax,
    "LogSoftmax": _softmax,
}
