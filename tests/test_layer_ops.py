"""Every operator of the layer catalogue, secure == integer reference, at 1024 bits.

Each case is a small graph whose first convolution (random signed weights) makes negative values,
zeros and, on the narrow value ranges used here, ties; the operator under test follows, and an
identity dense layer returns its output whole, so the decrypted class vector is the operator's
output itself. Every case runs once with each comparison protocol (the ``s1`` fixture).
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from he_cnn.crypto.tensor import EncryptedTensor
from he_cnn.errors import BadRequest, ShapeError
from he_cnn.graph.integer_model import IntegerModel, build_model
from he_cnn.graph.layers import Add, Concat, Conv, Dense, Flatten, MaxPool, Pad, ReLU, Scale, SumPool, layer_from_spec
from he_cnn.graph.reference import classify_reference, run_reference
from he_cnn.parties.compute_cloud import EncryptedModel, encrypt_model, secure_inference, setup_model


def ints(values) -> np.ndarray:
    return np.array([int(v) for v in np.ravel(values)], dtype=object).reshape(np.shape(values))


def first_conv(rng: np.random.Generator, c_in: int, c_out: int, kernel: tuple[int, int] = (3, 3), **kw) -> Conv:
    weight = ints(rng.integers(-3, 4, (c_out, c_in, *kernel)))
    return Conv("c0", "input", "c0", weight, ints(rng.integers(-4, 5, c_out)), **kw)


def with_identity_head(layers: list, last: str, shape: tuple[int, ...], input_shape=(1, 5, 6)) -> IntegerModel:
    """The layers, then flatten and an identity dense layer: the class vector is ``last`` itself."""
    size = math.prod(shape)
    layers = [*layers, Flatten("flat", last, "flat"),
              Dense("out", "flat", "out", ints(np.eye(size, dtype=np.int64)), ints(np.zeros(size, dtype=np.int64)))]
    return build_model(tuple(layers), "input", input_shape, 3, "out")


def depthwise_weight(rng: np.random.Generator, channels: int, kernel: tuple[int, int]) -> np.ndarray:
    """A depthwise kernel as the compiler expands it: block-diagonal over the channels."""
    weight = np.zeros((channels, channels, *kernel), dtype=np.int64)
    for c in range(channels):
        weight[c, c] = rng.integers(-3, 4, kernel)
    return ints(weight)


def case(name: str) -> IntegerModel:
    rng = np.random.default_rng(sum(map(ord, name)))
    c0 = first_conv(rng, 1, 2, padding=1)  # (2, 5, 6), signed
    if name == "conv non-square, strided, padded":
        conv = Conv("op", "c0", "op", ints(rng.integers(-3, 4, (3, 2, 2, 3))), ints(rng.integers(-3, 4, 3)),
                    stride=(2, 1), padding=(1, 0))
        return with_identity_head([c0, conv], "op", (3, 3, 4))
    if name == "conv depthwise":
        conv = Conv("op", "c0", "op", depthwise_weight(rng, 2, (3, 1)), ints(rng.integers(-3, 4, 2)), padding=(1, 0))
        return with_identity_head([c0, conv], "op", (2, 5, 6))
    if name == "maxpool non-square, padded":
        return with_identity_head([c0, MaxPool("op", "c0", "op", (2, 3), (2, 1), (1, 1))], "op", (2, 3, 6))
    if name == "maxpool with shift":
        return with_identity_head([c0, MaxPool("op", "c0", "op", 2, 2, 0, shift=2)], "op", (2, 2, 3))
    if name == "relu with shift":
        return with_identity_head([c0, ReLU("op", "c0", "op", shift=1)], "op", (2, 5, 6))
    if name == "sumpool padded":
        return with_identity_head([c0, SumPool("op", "c0", "op", (3, 2), (2, 2), (1, 1))], "op", (2, 3, 4))
    if name == "global sumpool":
        return with_identity_head([c0, SumPool("op", "c0", "op", (5, 6), 1)], "op", (2, 1, 1))
    if name == "add with scale (residual)":
        conv = Conv("c1", "c0", "c1", ints(rng.integers(-3, 4, (2, 2, 3, 3))), ints(rng.integers(-3, 4, 2)), padding=1)
        layers = [c0, ReLU("r0", "c0", "r0"), conv, Scale("skip", "r0", "skip", 4), Add("op", ("c1", "skip"), "op")]
        return with_identity_head(layers, "op", (2, 5, 6))
    if name == "pad":
        return with_identity_head([c0, Pad("op", "c0", "op", (1, 0, 2, 1))], "op", (2, 8, 7))
    if name == "concat":
        conv = Conv("c1", "input", "c1", ints(rng.integers(-3, 4, (1, 1, 1, 1))), ints([2]))
        return with_identity_head([c0, conv, Concat("op", ("c0", "c1"), "op")], "op", (3, 5, 6))
    raise KeyError(name)


CASES = ["conv non-square, strided, padded", "conv depthwise", "maxpool non-square, padded", "maxpool with shift",
         "relu with shift", "sumpool padded", "global sumpool", "add with scale (residual)", "pad", "concat"]


@pytest.mark.parametrize("name", CASES)
def test_secure_equals_reference(name, keys1024, s1, user_keys):
    model = case(name)
    uploaded = EncryptedModel.deserialize(keys1024.public, encrypt_model(model, keys1024.public).serialize())
    setup = setup_model(s1, uploaded)
    rng = np.random.default_rng(7)
    for image in (ints(rng.integers(0, 4, (1, 5, 6))), ints(np.zeros((1, 5, 6), dtype=np.int64))):
        result = secure_inference(s1, uploaded, setup, EncryptedTensor.encrypt(keys1024.public, image), user_keys.public)
        assert np.array_equal(result.output.decrypt(user_keys.private), classify_reference(model, image))


@pytest.mark.parametrize("name", CASES)
def test_reference_is_the_float_operator(name):
    """The integer reference of each operator is the textbook operator (torch), on the same integers."""
    torch = pytest.importorskip("torch")
    model = case(name)
    image = ints(np.random.default_rng(8).integers(0, 4, (1, 5, 6)))
    tensors = run_reference(model, image)
    op = model.layer("op")
    x = torch.tensor(np.array(tensors[op.sources()[0]], dtype=np.float64))[None]
    f = torch.nn.functional
    if isinstance(op, Conv):
        groups_free = torch.tensor(np.array(op.weight, dtype=np.float64))
        expected = f.conv2d(x, groups_free, torch.tensor(np.array(op.bias, dtype=np.float64)), op.stride, op.padding)
    elif isinstance(op, MaxPool):
        expected = f.max_pool2d(torch.floor(x / 2 ** op.shift), op.kernel, op.stride, op.padding)
    elif isinstance(op, ReLU):
        expected = torch.floor(torch.relu(x) / 2 ** op.shift)
    elif isinstance(op, SumPool):
        expected = f.avg_pool2d(x, op.kernel, op.stride, op.padding, count_include_pad=True) * math.prod(op.kernel)
    elif isinstance(op, Add):
        expected = sum(torch.tensor(np.array(tensors[t], dtype=np.float64))[None] for t in op.inputs)
    elif isinstance(op, Pad):
        top, left, bottom, right = op.pads
        expected = f.pad(x, (left, right, top, bottom))
    else:
        expected = torch.cat([torch.tensor(np.array(tensors[t], dtype=np.float64))[None] for t in op.inputs], 1)
    assert np.array_equal(np.array(tensors["op"], dtype=np.float64), expected[0].round().numpy())


def test_bounds_hold_on_extreme_images():
    """Every tensor of every case stays within its worst-case bound, on the all-max image too."""
    for name in CASES:
        model = case(name)
        for fill in (0, model.input_max):
            tensors = run_reference(model, ints(np.full((1, 5, 6), fill)))
            for tensor, values in tensors.items():
                assert max(abs(int(v)) for v in np.ravel(values)) <= model.bounds[tensor], (name, tensor)


def test_window_sizes_round_trip_through_the_spec():
    model = case("maxpool non-square, padded")
    spec = model.to_spec()
    pool = next(e for e in spec["layers"] if e["kind"] == "maxpool")
    assert pool["kernel"] == [2, 3] and pool["stride"] == [2, 1]
    assert IntegerModel.from_spec(spec).to_spec() == spec
    old_style = {**pool, "kernel": 2, "stride": 2, "padding": 0}  # specs written before pairs existed
    assert layer_from_spec(old_style).kernel == (2, 2)
    with pytest.raises(BadRequest, match="one integer or a list of two"):
        layer_from_spec({**pool, "kernel": [2, 2, 2]})


def test_malformed_new_layers_are_refused():
    spec = case("pad").to_spec()
    pad = next(e for e in spec["layers"] if e["kind"] == "pad")
    with pytest.raises(ShapeError, match="pads must be 4"):
        layer_from_spec({**pad, "pads": [1, 2, 3]})
    scale = next(e for e in case("add with scale (residual)").to_spec()["layers"] if e["kind"] == "scale")
    with pytest.raises(BadRequest, match="must lie in"):
        layer_from_spec({**scale, "factor": 0})
    broken = case("add with scale (residual)").to_spec()
    next(e for e in broken["layers"] if e["kind"] == "add")["inputs"] = ["c1", "c0"]  # c0 is (2,5,6) too: fine
    IntegerModel.from_spec(broken)
    next(e for e in broken["layers"] if e["kind"] == "add")["inputs"] = ["c1", "flat"]
    with pytest.raises((BadRequest, ShapeError)):
        IntegerModel.from_spec(broken)


def test_a_model_that_overflows_the_key_is_refused_at_upload(keys1024, s1):
    """Bounds past the key's plaintext space: a one-line refusal when S1 sets the model up, before any
    message to S2 and long before a query."""
    big = 1 << 62
    layers = [Flatten("flat", "input", "flat")]
    for i in range(16):  # each dense layer adds 64 bits to the bound
        layers.append(Dense(f"fc{i}", layers[-1].output, f"fc{i}", ints(np.full((4, 4), big)), ints([0] * 4)))
    model = build_model(tuple(layers), "input", (1, 2, 2), 3, "fc15")
    uploaded = EncryptedModel.deserialize(keys1024.public, encrypt_model(model, keys1024.public).serialize())
    rounds = s1.channel.stats.rounds
    with pytest.raises(BadRequest, match="overflow a 1024-bit key: 'fc"):
        setup_model(s1, uploaded)
    assert s1.channel.stats.rounds == rounds


def test_a_spec_whose_tensors_grow_past_the_cap_is_refused():
    """Zero padding costs no weights: a spec of pads that grows a tensor past the cap is refused when
    S1 reads it, before anything is built for it."""
    spec = case("pad").to_spec()
    pads = [{"kind": "pad", "name": f"p{i}", "input": "input" if i == 0 else f"p{i - 1}", "output": f"p{i}",
             "pads": [1024, 1024, 1024, 1024]} for i in range(3)]
    spec["layers"] = pads + spec["layers"]
    with pytest.raises(ShapeError, match="more than"):
        IntegerModel.from_spec(spec)
