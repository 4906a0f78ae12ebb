"""The secure ICNN: an encrypted model, its one-time set-up, and end-to-end secure inference.

The owner turns an :class:`~he_cnn.graph.IntegerModel` into an :class:`EncryptedModel`: the public
architecture (layer kinds, geometry, shapes and the bit lengths of worst-case bounds: what any cloud must know to run
it) plus E(K) and E(b) for every convolution and dense layer. S1 walks the same layer graph as the
plaintext reference, calling SCVL/SCT for linear layers, SACT for ReLU and SMAP for max-pooling, and
finally hands the class vector to the user under the user's key. Every layer records its seconds,
rounds, bytes and public-key operations.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from he_cnn.errors import BadRequest, KeyMismatch, ProtocolError, ShapeError, UnsupportedLayer
from he_cnn.graph.integer_model import Concat, Conv, Dense, Flatten, IntegerModel, MaxPool, ReLU
from he_cnn.crypto.paillier import PublicKey
from he_cnn.protocols.common import S1Context
from he_cnn.protocols.comparison import secure_maxpool, secure_relu
from he_cnn.protocols.linear import (EncryptedLinear, LinearGeometry, LinearPrecomputation, LinearSetup, SharedInput,
                               new_setup_id, precompute_linear, secure_linear, setup_linear_layers)
from he_cnn.protocols.output import reencrypt_for_user
from he_cnn.crypto.tensor import EncryptedTensor
from he_cnn.transport.wire import Message, decode, encode

SPEC_VERSION = 1
LAYER_KINDS = ("conv", "dense", "relu", "maxpool", "concat", "flatten")


def architecture(model: IntegerModel) -> dict[str, Any]:
    """The public part of a model: layers without weights, shapes, and bit lengths only.

    Exact bounds are sums of |weights| and would tell the clouds weight norms; their bit lengths
    (|v| < 2^bits) are all the protocols need.
    """
    layers = []
    for layer in model.layers:
        if isinstance(layer, Conv):
            entry = {"kind": "conv", "kernel": int(layer.weight.shape[2]), "stride": layer.stride,
                     "padding": layer.padding, "channels": int(layer.weight.shape[0]),
                     "weight_bits": _max_bits(layer.weight)}
        elif isinstance(layer, Dense):
            entry = {"kind": "dense", "channels": int(layer.weight.shape[0]), "weight_bits": _max_bits(layer.weight)}
        elif isinstance(layer, ReLU):
            entry = {"kind": "relu", "shift": layer.shift}
        elif isinstance(layer, MaxPool):
            entry = {"kind": "maxpool", "kernel": layer.kernel, "stride": layer.stride, "padding": layer.padding,
                     "shift": layer.shift}
        elif isinstance(layer, Concat):
            entry = {"kind": "concat", "inputs": list(layer.inputs)}
        elif isinstance(layer, Flatten):
            entry = {"kind": "flatten"}
        else:
            raise UnsupportedLayer(f"layer {getattr(layer, 'name', layer)!r} of type {type(layer).__name__} "
                                   f"is not supported; expected one of {', '.join(LAYER_KINDS)}")
        entry["name"] = layer.name
        entry["output"] = layer.output
        if not isinstance(layer, Concat):
            entry["input"] = layer.input
        layers.append(entry)
    return {
        "version": SPEC_VERSION,
        "layers": layers,
        "input_name": model.input_name,
        "input_shape": list(model.input_shape),
        "input_max": model.input_max,
        "output": model.output,
        "num_classes": model.num_classes,
        "shapes": {k: list(v) for k, v in model.shapes.items()},
        "bits": {k: int(v).bit_length() for k, v in model.bounds.items()},
        "classes": list(model.meta.get("classes", [str(i) for i in range(model.num_classes)])),
    }


def _max_bits(values: np.ndarray) -> int:
    return max(abs(int(v)) for v in values.reshape(-1)).bit_length()


@dataclass
class EncryptedModel:
    """What S1 holds for a model: the public architecture and the encrypted linear layers."""

    spec: dict[str, Any]
    linear: dict[str, EncryptedLinear]
    public_key: PublicKey

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.spec["input_shape"])

    def bound_bits(self, tensor: str) -> int:
        """l with |v| < 2^l for every value of the tensor."""
        return int(self.spec["bits"][tensor])

    def serialize(self) -> bytes:
        msg = Message(meta={"spec": self.spec, "key_id": self.public_key.key_id})
        width = self.public_key.ciphertext_bytes
        for name, layer in self.linear.items():
            msg.arrays[f"{name}.weight"] = layer.weight.data
            msg.arrays[f"{name}.bias"] = layer.bias.data
            msg.widths[f"{name}.weight"] = msg.widths[f"{name}.bias"] = width
        return encode(msg)

    @classmethod
    def deserialize(cls, public_key: PublicKey, data: bytes) -> "EncryptedModel":
        msg = decode(data)
        if msg.meta.get("key_id") != public_key.key_id:
            raise KeyMismatch(f"model is encrypted under key {msg.meta.get('key_id')}, expected {public_key.key_id}")
        spec = msg.get("spec", dict)
        return cls(spec, _linear_layers(spec, public_key, msg), public_key)


def _linear_layers(spec: dict, pk: PublicKey, msg: Message) -> dict[str, EncryptedLinear]:
    """Rebuild and check the encrypted linear layers against the architecture."""
    try:
        if spec.get("version") != SPEC_VERSION:
            raise BadRequest(f"model spec version {spec.get('version')!r}, expected {SPEC_VERSION}")
        shapes = {k: tuple(int(x) for x in v) for k, v in spec["shapes"].items()}
        out = {}
        for entry in spec["layers"]:
            if entry["kind"] not in LAYER_KINDS:
                raise UnsupportedLayer(f"layer {entry.get('name')!r} of kind {entry['kind']!r} is not supported; "
                                       f"expected one of {', '.join(LAYER_KINDS)}")
            if entry["kind"] in ("relu", "maxpool") and not (type(entry.get("shift", 0)) is int
                                                            and 0 <= entry.get("shift", 0) <= 4096):
                raise BadRequest(f"layer {entry.get('name')!r}: shift must be an int in [0, 4096], got {entry.get('shift')!r}")
            if entry["kind"] not in ("conv", "dense"):
                continue
            name = entry["name"]
            in_shape = shapes[entry["input"]]
            geometry = LinearGeometry.from_dict(
                {"kind": entry["kind"], "in_shape": in_shape, "kernel": entry.get("kernel", 1),
                 "stride": entry.get("stride", 1), "padding": entry.get("padding", 0)})
            w = msg.array(f"{name}.weight")
            b = msg.array(f"{name}.bias")
            weight = EncryptedTensor.from_ciphertexts(pk, w.reshape(-1), w.shape)
            bias = EncryptedTensor.from_ciphertexts(pk, b.reshape(-1), b.shape)
            out[name] = EncryptedLinear(name, geometry, weight, bias, int(entry["weight_bits"]))
        return out
    except ProtocolError as e:
        raise BadRequest(f"malformed model architecture: {e}") from e
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise BadRequest(f"malformed model architecture: {type(e).__name__} {e}") from e


def encrypt_model(model: IntegerModel, public_key: PublicKey,
                  progress: Callable[[int], None] | None = None) -> EncryptedModel:
    """Owner side: encrypt every kernel and bias under the clouds' public key."""
    spec = architecture(model)
    linear = {}
    for layer in model.linear_layers():
        if isinstance(layer, Conv):
            c_out, c_in, k, _ = layer.weight.shape
            geometry = LinearGeometry("conv", tuple(model.shapes[layer.input]), k, layer.stride, layer.padding)
            matrix = layer.weight.reshape(c_out, -1).T
        else:
            geometry = LinearGeometry("dense", tuple(model.shapes[layer.input]))
            matrix = layer.weight.T
        weight = EncryptedTensor.encrypt(public_key, np.ascontiguousarray(matrix))
        bias = EncryptedTensor.encrypt(public_key, layer.bias)
        if progress:
            progress(weight.size + bias.size)
        linear[layer.name] = EncryptedLinear(layer.name, geometry, weight, bias, _max_bits(layer.weight))
    return EncryptedModel(spec, linear, public_key)


@dataclass
class ModelSetup:
    """S1's state after the one-time set-up with S2."""

    setup_id: str
    layers: dict[str, LinearSetup]


def setup_model(ctx: S1Context, model: EncryptedModel, setup_id: str | None = None) -> ModelSetup:
    setup_id = setup_id or new_setup_id()
    return ModelSetup(setup_id, setup_linear_layers(ctx, setup_id, list(model.linear.values())))


@dataclass
class PreparedQuery:
    """The offline part of one future query: input masks and E(A_cols @ (K + B)) for every linear layer."""

    linear: dict[str, LinearPrecomputation]
    seconds: float
    #: set once a query consumed it: masks used twice would show S2 the difference of two inputs
    used: bool = False


def linear_siblings(spec: dict[str, Any]) -> dict[str, list[str]]:
    """Input tensor -> the linear layers that read it, in spec order, for every tensor two or more
    linear layers read (an Inception block's 1x1 reductions): they share one reveal of the input."""
    readers: dict[str, list[str]] = {}
    for entry in spec["layers"]:
        if entry["kind"] in ("conv", "dense"):
            readers.setdefault(entry["input"], []).append(entry["name"])
    return {tensor: names for tensor, names in readers.items() if len(names) > 1}


def prepare_query(ctx: S1Context, model: EncryptedModel, setup: ModelSetup,
                  layer_done: Callable[[str, float], None] | None = None) -> PreparedQuery:
    """Offline phase at S1: everything of a query's linear layers that does not depend on the image
    (sibling layers get the same input masks: they share one reveal). ``layer_done(name, seconds)``
    is called after each layer (the benchmark times them)."""
    start = time.perf_counter()
    linear: dict[str, LinearPrecomputation] = {}
    first: dict[str, list[int]] = {}
    for entry in model.spec["layers"]:
        if entry["kind"] in ("conv", "dense"):
            t0 = time.perf_counter()
            linear[entry["name"]] = _precompute_layer(ctx, model, setup, entry, first)
            if layer_done:
                layer_done(entry["name"], time.perf_counter() - t0)
    return PreparedQuery(linear, time.perf_counter() - start)


def _precompute_layer(ctx: S1Context, model: EncryptedModel, setup: ModelSetup, entry: dict,
                      first_masks: dict[str, list[int]]) -> LinearPrecomputation:
    """One linear layer's offline part, with the masks of the first layer that read the same input
    (``first_masks``: input tensor -> masks, filled as layers go by)."""
    name, source = entry["name"], entry["input"]
    pre = precompute_linear(ctx, model.linear[name], setup.layers[name], model.bound_bits(source),
                            first_masks.get(source))
    first_masks.setdefault(source, pre.masks)
    return pre


@dataclass
class LayerStats:
    name: str
    kind: str
    seconds: float
    rounds: int
    bytes_to_s2: int
    bytes_to_s1: int
    ops: dict[str, int] = field(default_factory=dict)


@dataclass
class InferenceResult:
    output: EncryptedTensor  # E_u(class vector) under the user's key
    layers: list[LayerStats]
    seconds: float

    @property
    def rounds(self) -> int:
        return sum(s.rounds for s in self.layers)


def secure_inference(ctx: S1Context, model: EncryptedModel, setup: ModelSetup, image: EncryptedTensor,
                     user_key: PublicKey, prepared: PreparedQuery | None = None) -> InferenceResult:
    """Run the whole network on E(image) and return E_u(class vector) with per-layer statistics.

    ``prepared`` (from :func:`prepare_query`, used once) moves the query-independent work offline;
    without it that work is done inline and counted in the layers' time.
    """
    if image.shape != model.input_shape:
        raise ShapeError(f"image shape {image.shape}, expected {model.input_shape}")
    if prepared is not None:
        if prepared.used:
            raise ProtocolError("a prepared query was offered twice: its masks must be used only once")
        prepared.used = True
    ctx.public_key.require_same(image.public_key, "image")
    tensors: dict[str, EncryptedTensor] = {model.spec["input_name"]: image}
    shared = {tensor: SharedInput(len(names) - 1) for tensor, names in linear_siblings(model.spec).items()}
    first_masks: dict[str, list[int]] = {}  # without ``prepared``: each input's masks, for its siblings
    stats: list[LayerStats] = []
    start = time.perf_counter()

    def timed(name: str, kind: str, fn: Callable[[], EncryptedTensor]) -> EncryptedTensor:
        before, ops_before = ctx.channel.stats.snapshot(), dict(ctx.ops)
        t0 = time.perf_counter()
        result = fn()
        after = ctx.channel.stats.snapshot()
        ops = {k: v - ops_before.get(k, 0) for k, v in ctx.ops.items() if v != ops_before.get(k, 0)}
        stats.append(LayerStats(name, kind, time.perf_counter() - t0, after[0] - before[0], after[1] - before[1],
                                after[2] - before[2], ops))
        return result

    for entry in model.spec["layers"]:
        kind, name = entry["kind"], entry["name"]
        if kind in ("conv", "dense"):
            x, x_bits = tensors[entry["input"]], model.bound_bits(entry["input"])

            def linear_layer() -> EncryptedTensor:
                pre = prepared.linear.get(name) if prepared else None
                if pre is None:
                    pre = _precompute_layer(ctx, model, setup, entry, first_masks)
                return secure_linear(ctx, setup.setup_id, model.linear[name], setup.layers[name], x, x_bits, pre,
                                     shared.get(entry["input"]))

            tensors[entry["output"]] = timed(name, kind, linear_layer)
        elif kind == "relu":
            x = tensors[entry["input"]]
            tensors[entry["output"]] = timed(name, kind, lambda: secure_relu(
                ctx, x, model.bound_bits(entry["input"]), int(entry.get("shift", 0))))
        elif kind == "maxpool":
            x = tensors[entry["input"]]
            tensors[entry["output"]] = timed(name, kind, lambda: secure_maxpool(
                ctx, x, int(entry["kernel"]), int(entry["stride"]), int(entry["padding"]),
                model.bound_bits(entry["input"]), int(entry.get("shift", 0))))
        elif kind == "concat":
            tensors[entry["output"]] = EncryptedTensor.concatenate([tensors[i] for i in entry["inputs"]], axis=0)
        elif kind == "flatten":
            tensors[entry["output"]] = tensors[entry["input"]].flatten()
        else:
            raise UnsupportedLayer(f"layer {name!r} of kind {kind!r} is not supported")
    y = tensors[model.spec["output"]]
    out = timed("result", "to_user", lambda: reencrypt_for_user(ctx, y, model.bound_bits(model.spec["output"]), user_key))
    return InferenceResult(out, stats, time.perf_counter() - start)
