"""Quantisation of the trained ICNN, the integer model's JSON file, and the plaintext integer reference."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from torch import nn

from he_cnn.images import quantize_image
from he_cnn.errors import BadRequest, BoundExceeded, EncodingOverflow, ShapeError, UnsupportedLayer
from he_cnn.geometry import pool_windows
from he_cnn.graph.integer_model import infer_shapes_and_bounds, load_integer_model, save_integer_model
from he_cnn.graph.layers import Concat, Conv, Dense, MaxPool, ReLU
from he_cnn.training.icnn import ICNN, WIRING
from he_cnn.graph.integer_model import weight_shift
from he_cnn.training.quantize import quantize_icnn, tensor_scale
from he_cnn.graph.reference import (
    classify_reference,
    float_agreement,
    integer_accuracy,
    predict_reference,
    run_reference,
)
from he_cnn.training.train import predict_float


@pytest.fixture(scope="module")
def test_split(trained_icnn):
    """Quantised test images, the integer model's and the float model's predictions on all of them."""
    dataset, result, integer_model = trained_icnn
    images = [quantize_image(x, integer_model.input_max) for x in dataset.x_test]
    return images, predict_reference(integer_model, images), predict_float(result.model, dataset.x_test)


def _as_float(values: np.ndarray, scale) -> np.ndarray:
    return np.array([float(v / scale) for v in values.flat]).reshape(values.shape)


# --- quantisation --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "peak, bits, expected",
    [(0.3, 6, 6), (31.4 / 64, 6, 6), (31.6 / 64, 6, 5), (2.0, 4, 1), (100.0, 6, -2), (0.0, 6, 0)],
)
def test_weight_shift_is_the_largest_that_fits(peak, bits, expected):
    assert weight_shift(np.array([[-peak, peak / 3]]), bits) == expected


def test_layers_follow_the_torch_wiring(trained_icnn):
    _, _, model = trained_icnn
    assert [layer.name for layer in model.layers] == [name for name, _ in WIRING]
    assert all(layer.output == layer.name for layer in model.layers)
    assert model.input_name == "input" and model.output == "fc" and model.num_classes == 10
    assert model.input_shape == (1, 16, 16) and model.input_max == 15
    assert model.layer("a_concat").inputs == ("a_b1", "a_b2", "a_b3", "a_b4")
    assert isinstance(model.layer("b_relu"), ReLU) and isinstance(model.layer("fc"), Dense)
    assert len([layer for layer in model.layers if isinstance(layer, Conv)]) == 11
    assert model.meta["weight_bits"] == 6 and model.meta["input_max"] == 15


def test_weights_are_small_python_ints_and_branches_meet_at_one_scale(trained_icnn):
    _, result, model = trained_icnn
    shifts, exponents = model.meta["weight_shifts"], model.meta["scale_exponents"]
    for layer in model.linear_layers():
        assert all(type(v) is int for v in (*layer.weight.flat, *layer.bias.flat))
        natural = weight_shift(getattr(result.model, layer.name).weight.detach().double().numpy(), 6)
        extra = shifts[layer.name] - natural
        assert extra >= 0
        assert max(abs(v) for v in layer.weight.flat) <= 31.5 * 2**extra  # round(w * 2**k) <= 31 at k - extra
    for layer in model.layers:
        if isinstance(layer, Concat):
            assert len({exponents[name] for name in layer.inputs}) == 1
    assert any(shifts[n] > weight_shift(getattr(result.model, n).weight.detach().numpy(), 6) for n in shifts)


def test_unsupported_module_is_refused():
    model = ICNN()
    model.a_b2_relu = nn.Sigmoid()
    with pytest.raises(UnsupportedLayer, match="a_b2_relu: Sigmoid"):
        quantize_icnn(model)


def test_unsupported_graph_layer_is_refused():
    @dataclasses.dataclass(frozen=True)
    class Softmax:
        name: str
        input: str
        output: str

    with pytest.raises(UnsupportedLayer, match="'soft' of type Softmax"):
        infer_shapes_and_bounds((Softmax("soft", "input", "soft"),), "input", (1, 4, 4), 15)


# --- integer reference ---------------------------------------------------------------------------


def test_integer_model_agrees_with_float_model(trained_icnn, test_split):
    dataset, result, _ = trained_icnn
    _, integer_predictions, float_predictions = test_split
    assert np.mean(integer_predictions == float_predictions) >= 0.99
    assert np.mean(integer_predictions == dataset.y_test) >= 0.97
    assert result.float_test_accuracy >= 0.97


def test_accuracy_helpers(trained_icnn, test_split):
    dataset, _, model = trained_icnn
    images, integer_predictions, float_predictions = test_split
    assert integer_accuracy(model, images[:20], dataset.y_test[:20]) == np.mean(
        integer_predictions[:20] == dataset.y_test[:20]
    )
    assert float_agreement(model, images[:20], float_predictions[:20]) == np.mean(
        integer_predictions[:20] == float_predictions[:20]
    )


@pytest.mark.parametrize("weight_bits, tolerance", [(6, 0.15), (12, 0.005)])
def test_every_tensor_matches_the_float_model_up_to_its_scale(trained_icnn, test_split, weight_bits, tolerance):
    _, result, six_bit = trained_icnn
    # the default model requantises at two ReLUs; the 12-bit case measures the weights alone
    model = six_bit if weight_bits == 6 else quantize_icnn(result.model, weight_bits=weight_bits, activation_bits=None)
    for image in test_split[0][:3]:
        ints = run_reference(model, image)
        with torch.no_grad():
            floats = result.model.forward_all(torch.from_numpy(image.astype(np.float32)[None] / model.input_max))
        for name, values in ints.items():
            expected = floats[name][0].double().numpy()
            error = np.abs(_as_float(values, tensor_scale(model, name)) - expected).max()
            assert error <= tolerance * np.abs(expected).max(), name


def test_only_relus_outside_the_branches_requantise(trained_icnn, test_split):
    _, result, model = trained_icnn
    shifts = {layer.name: layer.shift for layer in model.layers if isinstance(layer, (ReLU, MaxPool))}
    # b_relu has no comparison after it, a_b2_relu and a_b3_relu sit inside block A's branches;
    # mid_relu's shift moved to mid_pool (cheaper there), stem_relu's stayed (a 2x2 pool saves less)
    assert set(model.meta["requantize_shifts"]) == {"stem_relu", "mid_pool"}
    assert shifts["a_b2_relu"] == shifts["b_relu"] == shifts["mid_relu"] == shifts["stem_pool"] == 0
    for name in ("stem_relu", "mid_relu"):
        assert model.bounds[name].bit_length() <= model.meta["activation_bits"]
    plain = quantize_icnn(result.model, activation_bits=None)
    assert all(layer.shift == 0 for layer in plain.layers if isinstance(layer, (ReLU, MaxPool)))
    assert plain.bounds["mid_pool"].bit_length() > model.bounds["mid_pool"].bit_length()
    # truncating before the pool: the window maxima of a_concat, floor-divided, as relu(max) >> k would be
    pool = model.layer("mid_pool")
    for image in test_split[0][:5]:
        tensors = run_reference(model, image)
        flat = tensors["a_concat"].reshape(-1)
        maxima = [max(flat[i] for i in w) for w in pool_windows(model.shapes["a_concat"], pool.kernel, pool.stride, pool.padding)]
        assert list(tensors["mid_pool"].reshape(-1)) == [m >> pool.shift for m in maxima]
        assert list(tensors["mid_relu"].reshape(-1)) == [max(m, 0) >> pool.shift for m in maxima]
        assert (tensors["stem_relu"] == np.maximum(tensors["stem_pool"], 0) // 2 ** shifts["stem_relu"]).all()


def test_tensors_are_exact_python_ints_within_their_bounds(trained_icnn, test_split):
    _, _, model = trained_icnn
    tensors = run_reference(model, test_split[0][0])
    assert set(tensors) == set(model.shapes)
    for name, values in tensors.items():
        assert values.dtype == object and values.shape == model.shapes[name]
        assert all(type(v) is int for v in values.flat), name
        assert max(abs(v) for v in values.flat) <= model.bounds[name]
    assert model.bounds["fc"].bit_length() > 20
    assert np.array_equal(classify_reference(model, test_split[0][0]), tensors["fc"])


def test_a_broken_bound_is_caught(trained_icnn, test_split):
    _, _, model = trained_icnn
    broken = dataclasses.replace(model, bounds={**model.bounds, "mid_relu": 1})
    with pytest.raises(BoundExceeded, match="mid_relu"):
        run_reference(broken, test_split[0][0])


def test_image_checks(trained_icnn):
    _, _, model = trained_icnn
    good = np.zeros((1, 16, 16), dtype=object)
    with pytest.raises(ShapeError, match=r"expected an image of shape \(1, 16, 16\), got \(16, 16\)"):
        run_reference(model, good[0])
    with pytest.raises(EncodingOverflow, match=r"expected pixels in \[0, 15\], got values from 0 to 16"):
        run_reference(model, np.where(np.arange(256).reshape(1, 16, 16) == 7, 16, 0))
    with pytest.raises(EncodingOverflow, match="from -1"):
        run_reference(model, good - 1)
    with pytest.raises(EncodingOverflow, match="dtype float64"):
        run_reference(model, np.zeros((1, 16, 16)))
    assert run_reference(model, good.astype(np.int64))["fc"].dtype == object


# --- JSON file -----------------------------------------------------------------------------------


def test_save_load_round_trip(trained_icnn, test_split, tmp_path):
    _, _, model = trained_icnn
    save_integer_model(model, tmp_path / "model.json")
    loaded = load_integer_model(tmp_path / "model.json")
    assert (loaded.input_shape, loaded.input_max, loaded.input_name, loaded.output, loaded.num_classes) == (
        model.input_shape, model.input_max, model.input_name, model.output, model.num_classes
    )
    assert loaded.shapes == model.shapes and loaded.bounds == model.bounds and loaded.meta == model.meta
    for original, copy in zip(model.layers, loaded.layers, strict=True):
        assert type(copy) is type(original)
        for f in dataclasses.fields(original):
            a, b = getattr(original, f.name), getattr(copy, f.name)
            assert np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b, (original.name, f.name)
    image = test_split[0][0]
    assert np.array_equal(classify_reference(loaded, image), classify_reference(model, image))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d.update(version=2), "expected format version 1, got 2"),
        (lambda d: d.update(format="other"), "expected format"),
        (lambda d: d.pop("layers"), "missing field 'layers'"),
        (lambda d: d["layers"][0]["weight"]["values"].pop(), "does not hold"),
        (lambda d: d["layers"][0].update(stride=True), "field 'stride' must be an integer, got True"),
        (lambda d: d["layers"][0].update(type="Softmax"), "type 'Softmax' is not one of"),
        (lambda d: d["layers"][1].update(input="nowhere"), "reads \\['nowhere'\\]"),
        (lambda d: d["layers"][0]["weight"].update(shape=[4, 1, 7, 7, 1]), "must have 4 dimensions, got 5"),
        (lambda d: d["layers"][0].update(weight={"shape": [4, 2, 7, 7], "values": [0] * 392}), "does not fit"),
        (lambda d: d.update(num_classes=11), r"expected \(11,\)"),
        (lambda d: d["layers"][0].update(colour="red"), "unexpected fields \\['colour'\\]"),
    ],
)
def test_load_rejects_corrupt_files(trained_icnn, tmp_path, change, message):
    _, _, model = trained_icnn
    save_integer_model(model, tmp_path / "model.json")
    document = json.loads((tmp_path / "model.json").read_text())
    change(document)
    (tmp_path / "model.json").write_text(json.dumps(document))
    with pytest.raises(BadRequest, match=message):
        load_integer_model(tmp_path / "model.json")


def test_load_rejects_missing_and_non_json_files(tmp_path):
    with pytest.raises(BadRequest, match="does not exist"):
        load_integer_model(tmp_path / "absent.json")
    (tmp_path / "garbage.json").write_text("{not json")
    with pytest.raises(BadRequest, match="not readable JSON"):
        load_integer_model(tmp_path / "garbage.json")
