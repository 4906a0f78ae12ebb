"""S1's engine: an encrypted model, its one-time set-up, and end-to-end secure inference.

The owner turns an :class:`~he_cnn.graph.integer_model.IntegerModel` into an :class:`EncryptedModel`:
the public architecture (the same typed graph without weights, and the bit lengths of worst-case
bounds: what any cloud must know to run it) plus E(K) and E(b) for every linear layer. S1 decodes an
upload into that typed graph (every layer checked by its catalogue class) and walks it exactly as the
plaintext reference does, calling each layer's :meth:`~he_cnn.graph.layers.Layer.secure` (SCVL/SCT
for linear layers, SACT for ReLU, SMAP for max-pooling), and finally hands the class vector to the
user under the user's key. Every interactive layer records its seconds, rounds, bytes and public-key
operations, and the context's tracer hears about each layer.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from he_cnn.crypto.paillier import PublicKey
from he_cnn.crypto.tensor import EncryptedTensor
from he_cnn.errors import BadRequest, KeyMismatch, ProtocolError, ShapeError
from he_cnn.graph import parse
from he_cnn.graph.integer_model import IntegerModel
from he_cnn.graph.layers import LinearLayer, linear_siblings
from he_cnn.crypto.paillier import KAPPA
from he_cnn.protocols.common import S1Context, slot_bits
from he_cnn.protocols.linear import (EncryptedLinear, LinearPrecomputation, LinearSetup, SharedInput, cross_slot_bits,
                                     new_setup_id, precompute_linear, setup_linear_layers)
from he_cnn.protocols.millionaire import MAX_BITS as MAX_OT_BITS
from he_cnn.protocols.output import reencrypt_for_user
from he_cnn.wire import Message, decode, encode


@dataclass
class EncryptedModel:
    """What S1 holds for a model: the public graph (and its spec) and the encrypted linear layers."""

    graph: IntegerModel
    linear: dict[str, EncryptedLinear]
    public_key: PublicKey
    #: the public spec as sent (``graph.to_spec()`` of the owner's model)
    spec: dict[str, Any]

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.graph.input_shape)

    def bound_bits(self, tensor: str) -> int:
        """l with |v| < 2^l for every value of the tensor."""
        return int(self.graph.bits[tensor])

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
        """Decode an upload into the typed public graph plus its encrypted layers, all checked:
        :class:`BadRequest` (or another he-cnn error) for anything malformed."""
        msg = decode(data)
        if msg.meta.get("key_id") != public_key.key_id:
            raise KeyMismatch(f"model is encrypted under key {parse.shown(msg.meta.get('key_id'))}, "
                              f"expected {public_key.key_id}")
        spec = msg.get("spec", dict)
        try:
            graph = IntegerModel.from_spec(spec)
        except (BadRequest, ShapeError) as e:
            raise BadRequest(f"malformed model architecture: {e}") from e
        linear = {}
        for layer in graph.linear_layers():
            w, b = msg.array(f"{layer.name}.weight"), msg.array(f"{layer.name}.bias")
            linear[layer.name] = _encrypted_linear(
                graph, layer, EncryptedTensor.from_ciphertexts(public_key, w.reshape(-1), w.shape),
                EncryptedTensor.from_ciphertexts(public_key, b.reshape(-1), b.shape))
        extra = {name.rsplit(".", 1)[0] for name in msg.arrays} - set(linear)
        if extra:
            raise BadRequest(f"model upload holds arrays of no linear layer: {sorted(extra)[:5]}")
        return cls(graph, linear, public_key, spec)


def _encrypted_linear(graph: IntegerModel, layer: LinearLayer, weight: EncryptedTensor,
                      bias: EncryptedTensor) -> EncryptedLinear:
    """E(K), E(b) of one layer with the layer's geometry, checked against the graph's shapes."""
    in_shape = graph.shapes[layer.input]  # type: ignore[attr-defined]
    try:
        encrypted = EncryptedLinear(layer.name, layer.geometry(in_shape), weight, bias,
                                    layer.weight_bits)  # type: ignore[attr-defined]
    except ShapeError as e:
        raise BadRequest(f"malformed model architecture: {e}") from e
    if encrypted.out_shape != graph.shapes[layer.output] or weight.shape[1] != layer.channels:  # type: ignore[attr-defined]
        raise BadRequest(f"malformed model architecture: layer {layer.name!r}: encrypted weights of shape "
                         f"{weight.shape} do not give output {list(graph.shapes[layer.output])}")
    return encrypted


def encrypt_model(model: IntegerModel, public_key: PublicKey,
                  progress: Callable[[int], None] | None = None) -> EncryptedModel:
    """Owner side: encrypt every kernel and bias under the clouds' public key."""
    graph = model.public()
    linear = {}
    for layer in model.linear_layers():
        weight = EncryptedTensor.encrypt(public_key, layer.weight_matrix())
        bias = EncryptedTensor.encrypt(public_key, layer.bias)  # type: ignore[attr-defined]
        if progress:
            progress(weight.size + bias.size)
        linear[layer.name] = _encrypted_linear(graph, layer, weight, bias)
    return EncryptedModel(graph, linear, public_key, model.to_spec())


@dataclass
class ModelSetup:
    """S1's state after the one-time set-up with S2."""

    setup_id: str
    layers: dict[str, LinearSetup]


def plaintext_needs(graph: IntegerModel) -> tuple[int, int, str]:
    """(plaintext bits, compared bits, where): the widest packing slot any protocol step of the model
    needs (a masked reveal holds l + kappa + 3 bits; a linear layer's cross terms, see
    :func:`~he_cnn.protocols.linear.cross_slot_bits`), the longest comparison, and the layer that
    needs the wider slot. Both follow from the public graph alone."""
    shapes, bits = graph.shapes, graph.bits
    widest, longest, where = 0, 0, ""
    for layer in graph.layers:
        in_shapes = [shapes[t] for t in layer.sources()]
        cost = layer.cost(in_shapes, [bits[t] for t in layer.sources()])
        slots = [slot_bits(revealed, KAPPA) for _, revealed, _ in cost.passes]
        if cost.linear is not None:
            taps, x_bits = cost.linear[1], cost.linear[4]
            slots.append(cross_slot_bits(x_bits, layer.weight_bits, taps))  # type: ignore[attr-defined]
        if slots and max(slots) > widest:
            widest, where = max(slots), layer.name
        longest = max([longest] + [compared for _, _, compared in cost.passes])
    result = slot_bits(bits[graph.output], KAPPA)  # the class vector's reveal for the user's key
    if result > widest:
        widest, where = result, graph.output
    return widest, longest, where


def check_fits(graph: IntegerModel, key_bits: int, compare_limit: int = MAX_OT_BITS) -> None:
    """:class:`BadRequest` unless every protocol step of the model fits a ``key_bits``-bit key's
    plaintexts and the comparison's bit limit (the owner's compile checks the key it plans for; S1
    checks its own at upload: never half-way through a query)."""
    widest, longest, where = plaintext_needs(graph)
    if widest > key_bits - 2:
        raise BadRequest(f"the model's bounds overflow a {key_bits}-bit key: {where!r} needs {widest}-bit plaintext "
                         f"slots, the key holds {key_bits - 2}; compile with fewer --bits or --activation-bits, or "
                         f"use a larger key")
    if longest > compare_limit:
        raise BadRequest(f"the model compares {longest}-bit values; the comparison handles at most {compare_limit}: "
                         f"compile with fewer --activation-bits")


def check_fits_key(graph: IntegerModel, ctx: S1Context) -> None:
    """:func:`check_fits` for S1's key and comparison protocol."""
    check_fits(graph, ctx.public_key.bits, MAX_OT_BITS if ctx.comparison == "ot" else ctx.dgk_key.max_bits)


def setup_model(ctx: S1Context, model: EncryptedModel, setup_id: str | None = None) -> ModelSetup:
    """The one-time set-up with S2: the linear layers' masked weights, and (for the OT comparison) the
    OT link's base OTs if the context's link has none yet, so that no query pays for them. A model
    that does not fit the key is refused first (:func:`check_fits_key`)."""
    check_fits_key(model.graph, ctx)
    setup_id = setup_id or new_setup_id()
    setup = ModelSetup(setup_id, setup_linear_layers(ctx, setup_id, list(model.linear.values())))
    if ctx.comparison == "ot":
        ctx.ot_link.receiver(ctx)
    return setup


@dataclass
class PreparedQuery:
    """The offline part of one future query: input masks and E(A_cols @ (K + B)) for every linear layer."""

    linear: dict[str, LinearPrecomputation]
    seconds: float
    #: set once a query consumed it: masks used twice would show S2 the difference of two inputs
    used: bool = False


def prepare_query(ctx: S1Context, model: EncryptedModel, setup: ModelSetup,
                  layer_done: Callable[[str, float], None] | None = None) -> PreparedQuery:
    """Offline phase at S1: everything of a query's linear layers that does not depend on the image
    (sibling layers get the same input masks: they share one reveal). ``layer_done(name, seconds)``
    is called after each layer (the benchmark times them)."""
    start = time.perf_counter()
    linear: dict[str, LinearPrecomputation] = {}
    first: dict[str, list[int]] = {}
    for layer in model.graph.linear_layers():
        t0 = time.perf_counter()
        linear[layer.name] = _precompute_layer(ctx, model, setup, layer, first)
        if layer_done:
            layer_done(layer.name, time.perf_counter() - t0)
    return PreparedQuery(linear, time.perf_counter() - start)


def _precompute_layer(ctx: S1Context, model: EncryptedModel, setup: ModelSetup, layer: LinearLayer,
                      first_masks: dict[str, list[int]]) -> LinearPrecomputation:
    """One linear layer's offline part, with the masks of the first layer that read the same input
    (``first_masks``: input tensor -> masks, filled as layers go by)."""
    source = layer.input  # type: ignore[attr-defined]
    pre = precompute_linear(ctx, model.linear[layer.name], setup.layers[layer.name], model.bound_bits(source),
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


@dataclass
class SecureRun:
    """One query in progress at S1: what a layer's :meth:`~he_cnn.graph.layers.Layer.secure` may use."""

    ctx: S1Context
    model: EncryptedModel
    setup: ModelSetup
    prepared: PreparedQuery | None
    #: input tensor -> its shared reveal, for tensors several linear layers read
    shared: dict[str, SharedInput] = field(default_factory=dict)
    #: without ``prepared``: each input's masks, for its sibling layers
    first_masks: dict[str, list[int]] = field(default_factory=dict)

    def bits(self, tensor: str) -> int:
        """The bit bound l (|v| < 2^l) of a tensor, from the public spec."""
        return self.model.bound_bits(tensor)

    def precomputation(self, layer: LinearLayer) -> LinearPrecomputation:
        """A linear layer's offline part: prepared before the query, or computed now."""
        pre = self.prepared.linear.get(layer.name) if self.prepared else None
        return pre if pre is not None else _precompute_layer(self.ctx, self.model, self.setup, layer, self.first_masks)

    def shared_input(self, tensor: str) -> SharedInput | None:
        return self.shared.get(tensor)


#: a replacement for the last step of :func:`secure_inference`: (its kind, fn(E(output), bit bound))
Finish = tuple[str, Callable[[EncryptedTensor, int], EncryptedTensor]]


def secure_inference(ctx: S1Context, model: EncryptedModel, setup: ModelSetup, image: EncryptedTensor,
                     user_key: PublicKey, prepared: PreparedQuery | None = None,
                     finish: Finish | None = None) -> InferenceResult:
    """Run the whole network on E(image) and return E_u(class vector) with per-layer statistics.

    ``prepared`` (from :func:`prepare_query`, used once) moves the query-independent work offline;
    without it that work is done inline and counted in the layers' time. ``finish`` = (kind, fn)
    replaces the last step, the output's re-encryption to the user, by fn(E(output), its bit bound)
    (identification: :mod:`he_cnn.protocols.identify`).
    """
    graph = model.graph
    if image.shape != model.input_shape:
        raise ShapeError(f"image shape {image.shape}, expected {model.input_shape}")
    if prepared is not None:
        if prepared.used:
            raise ProtocolError("a prepared query was offered twice: its masks must be used only once")
        prepared.used = True
    ctx.public_key.require_same(image.public_key, "image")
    shared = {tensor: SharedInput(len(names) - 1) for tensor, names in linear_siblings(graph.layers).items()}
    run = SecureRun(ctx, model, setup, prepared, shared)
    tensors: dict[str, EncryptedTensor] = {graph.input_name: image}
    stats: list[LayerStats] = []
    start = time.perf_counter()

    def timed(name: str, kind: str, fn: Callable[[], EncryptedTensor]) -> EncryptedTensor:
        ctx.tracer.layer_start(name, kind)
        before, ops_before = ctx.channel.stats.snapshot(), dict(ctx.ops)
        t0 = time.perf_counter()
        result = fn()
        after = ctx.channel.stats.snapshot()
        ops = {k: v - ops_before.get(k, 0) for k, v in ctx.ops.items() if v != ops_before.get(k, 0)}
        stats.append(LayerStats(name, kind, time.perf_counter() - t0, after[0] - before[0], after[1] - before[1],
                                after[2] - before[2], ops))
        ctx.tracer.layer_end(name, kind, stats[-1])
        return result

    for layer in graph.layers:
        xs = [tensors[name] for name in layer.sources()]
        if layer.interactive:
            tensors[layer.output] = timed(layer.name, layer.kind, lambda: layer.secure(run, xs))
        else:
            tensors[layer.output] = layer.secure(run, xs)
    y = tensors[graph.output]
    kind, last = finish or ("to_user", lambda v, bits: reencrypt_for_user(ctx, v, bits, user_key))
    out = timed("result", kind, lambda: last(y, model.bound_bits(graph.output)))
    return InferenceResult(out, stats, time.perf_counter() - start)
