"""The compiler: a user's own CNN, as a torch module or an ONNX file, becomes an exact integer model.

The networks are defined here, in the test, with seeded random weights and BatchNorm statistics that
are not the identity; nothing is trained. Each compiled model is checked against its source: the
float graph against torch (or ``onnx.reference`` for hand-built ONNX graphs), the integer reference's
classes against the float model's on 200 random images, and the torch and ONNX-file front ends
against each other. Plaintext only: no keys, no protocols.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from torch import nn

import he_cnn
from he_cnn.compiler import CompiledModel, compile_model, onnx_import
from he_cnn.errors import BadRequest, HECNNError, UnsupportedLayer
from he_cnn.graph.integer_model import IntegerModel
from he_cnn.graph.layers import Conv, ReLU
from he_cnn.images import Preprocessing

# the exporters' own deprecation notes, raised by the exports these tests run directly
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")

RGB = (3, 12, 10)  # RGB and not square
GREY = (1, 12, 12)


class SmallVGG(nn.Module):
    """3x3 convolutions with BatchNorm, a max-pool, an average pool and a dense head (grey input)."""

    shape = GREY

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AvgPool2d(2))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8 * 3 * 3, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class SmallResNet(nn.Module):
    """A stem, one residual block (identity skip, BatchNorm) and a global average pool (RGB input)."""

    shape = RGB

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                                   nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        return self.head(torch.relu(self.block(y) + y))


class Branches(nn.Module):
    """A non-square kernel with stride 2, a depthwise convolution, explicit asymmetric padding, two
    branches joined by a concatenation, Dropout and Identity, LogSoftmax at the end (RGB input)."""

    shape = RGB

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, (3, 1), stride=2, padding=(1, 0))  # 12x10 -> 6x5
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pointwise = nn.Conv2d(8, 4, 1)
        self.wide = nn.Conv2d(8, 4, (1, 3))
        self.drop, self.same = nn.Dropout(0.3), nn.Identity()
        self.head = nn.Linear(8 * 3 * 2, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        a = self.pointwise(torch.relu(self.depthwise(x)))
        b = self.wide(nn.functional.pad(x, (2, 0, 0, 0)))  # left only: asymmetric, back to width 5
        y = nn.functional.max_pool2d(torch.relu(torch.cat([a, self.same(b)], 1)), 2)  # 8 x 3 x 2
        return torch.log_softmax(self.head(self.drop(torch.flatten(y, 1))), 1)


NETWORKS = [SmallVGG, SmallResNet, Branches]


def seeded(network: type[nn.Module], seed: int = 0) -> nn.Module:
    """The network with seeded weights and BatchNorm statistics that are not the identity, in eval mode."""
    torch.manual_seed(seed)
    module = network()
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return module.eval()


def images(shape: tuple[int, ...], n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((n, *shape))


def torch_scores(module: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return module(torch.as_tensor(x, dtype=torch.float32)).double().numpy()


@pytest.fixture(scope="module")
def compiled() -> dict[type[nn.Module], tuple[nn.Module, CompiledModel]]:
    """Each network compiled once (torch front end, default settings) for the tests that only read it."""
    out = {}
    for network in NETWORKS:
        module = seeded(network)
        out[network] = module, compile_model(module, images(network.shape, 32, 1))
    return out


def onnx_model(nodes: list, shape: tuple[int, ...], out_features: int, weights: dict[str, np.ndarray],
               constants: dict[str, np.ndarray] | None = None) -> onnx.ModelProto:
    """A hand-written ONNX model (opset 18): input ``x`` of ``shape`` (batch symbolic), output ``y``
    (N, out_features); ``weights`` are float initializers, ``constants`` integer ones."""
    initializers = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()]
    initializers += [numpy_helper.from_array(v.astype(np.int64), k) for k, v in (constants or {}).items()]
    graph = helper.make_graph(
        nodes, "hand", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *shape])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", out_features])], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


# --- the float graph is the user's model --------------------------------------------------------------


@pytest.mark.parametrize("network", NETWORKS)
def test_float_graph_equals_torch(network, compiled):
    module, result = compiled[network]
    x = images(network.shape, 16, 2)
    ours = result.float_graph(x)
    if network is Branches:  # the final LogSoftmax is dropped: same argmax, the test compares after it
        ours = torch.log_softmax(torch.as_tensor(ours), 1).numpy()
    np.testing.assert_allclose(ours, torch_scores(module, x), atol=1e-4)


POOLS = {  # two spellings of a global average pool to (N, C)
    "GlobalAveragePool": [helper.make_node("GlobalAveragePool", ["i"], ["g"]),
                          helper.make_node("Flatten", ["g"], ["f"])],
    "ReduceMean": [helper.make_node("ReduceMean", ["i", "axes"], ["f"], keepdims=0)],
}


@pytest.mark.parametrize("pool", POOLS)
def test_hand_written_onnx_folds_batchnorm_bias_and_identity(pool):
    """Conv -> BatchNormalization -> Relu -> Identity -> global average pool -> Dropout -> MatMul ->
    Add(bias) -> Softmax, checked against onnx.reference; BN and the bias are folded away."""
    rng = np.random.default_rng(3)
    weights = {"w": rng.normal(size=(4, 1, 3, 3)), "s": rng.uniform(0.5, 1.5, 4), "b": rng.normal(size=4),
               "m": rng.normal(size=4) * 0.1, "v": rng.uniform(0.5, 1.5, 4), "fc": rng.normal(size=(4, 3)),
               "fb": rng.normal(size=3)}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["n"], name="bn"),
             helper.make_node("Relu", ["n"], ["r"]), helper.make_node("Identity", ["r"], ["i"]), *POOLS[pool],
             helper.make_node("Dropout", ["f"], ["d"]), helper.make_node("MatMul", ["d", "fc"], ["mm"]),
             helper.make_node("Add", ["mm", "fb"], ["z"]), helper.make_node("Softmax", ["z"], ["y"], axis=1)]
    model = onnx_model(nodes, (1, 6, 6), 3, weights, constants={"axes": np.array([2, 3])})
    x = images((1, 6, 6), 8, 4)
    result = compile_model(model, x)
    expected = ReferenceEvaluator(model).run(None, {"x": x.astype(np.float32)})[0]
    scores = result.float_graph(x)
    probabilities = np.exp(scores) / np.exp(scores).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)
    assert [layer.kind for layer in result.model.layers] == ["conv", "relu", "sumpool", "flatten", "dense"]
    assert result.agreement(images((1, 6, 6), 200, 4)) >= 0.95
    assert any("Softmax" in line for line in result.notices)


def test_hand_written_onnx_windows_and_joins():
    """Pad with an axes-free pads input, a grouped Conv with asymmetric pads, MaxPool with padding,
    AveragePool with asymmetric pads counted in, a Concat of two branches, Gemm with transB=0, alpha
    and beta: the float graph against onnx.reference, the integer model against the float graph."""
    rng = np.random.default_rng(17)
    weights = {"w": rng.normal(size=(6, 1, 3, 3)), "w2": rng.normal(size=(2, 6, 1, 1)),
               "fc": rng.normal(size=(128, 5)) * 0.2, "fb": rng.normal(size=5)}
    nodes = [helper.make_node("Pad", ["x", "pads"], ["p"]),  # (3, 8, 7) -> (3, 9, 9)
             helper.make_node("Conv", ["p", "w"], ["c"], group=3, pads=[0, 1, 1, 0]),  # -> (6, 8, 8)
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("MaxPool", ["r"], ["m"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("AveragePool", ["m"], ["a"], kernel_shape=[2, 2], pads=[0, 0, 1, 1],
                              count_include_pad=1),  # (6, 4, 4)
             helper.make_node("Conv", ["m", "w2"], ["b"]),  # (2, 4, 4)
             helper.make_node("Concat", ["a", "b"], ["j"], axis=1), helper.make_node("Flatten", ["j"], ["f"]),
             helper.make_node("Gemm", ["f", "fc", "fb"], ["y"], alpha=0.5, beta=2.0)]
    model = onnx_model(nodes, (3, 8, 7), 5, weights, constants={"pads": np.array([0, 0, 1, 0, 0, 0, 0, 2])})
    x = images((3, 8, 7), 200, 18)
    result = compile_model(model, x[:32])
    expected = ReferenceEvaluator(model).run(None, {"x": x[:16].astype(np.float32)})[0]
    np.testing.assert_allclose(result.float_graph(x[:16]), expected, atol=1e-4)
    kinds = [layer.kind for layer in result.model.layers]
    assert kinds[:4] == ["pad", "pad", "conv", "maxpool"] and {"sumpool", "concat", "dense"} <= set(kinds)
    assert result.agreement(x) >= 0.95


def test_legacy_exporter_shape_arithmetic_is_folded(tmp_path):
    """The TorchScript exporter writes x.view(x.size(0), -1) as Shape/Gather/Unsqueeze/Concat/Reshape and
    keeps a BatchNormalization node of its own: both compile."""

    class Legacy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn, self.fc = nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Linear(3 * 4 * 4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.relu(self.bn(self.conv(x)))
            return self.fc(y.view(y.size(0), -1))

    module = seeded(Legacy)
    path = tmp_path / "legacy.onnx"
    torch.onnx.export(module, (torch.rand(1, 1, 6, 6),), str(path), dynamo=False, do_constant_folding=False,
                      dynamic_axes={"x": {0: "N"}}, input_names=["x"])
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert {"Shape", "Gather", "BatchNormalization"} <= ops
    x = images((1, 6, 6), 8, 5)
    result = compile_model(path, x)
    np.testing.assert_allclose(result.float_graph(x), torch_scores(module, x), atol=1e-4)


# --- torch and ONNX files give one integer model --------------------------------------------------------


def test_torch_and_onnx_file_give_the_same_integer_model(tmp_path):
    module = seeded(SmallResNet)
    calibration = images(RGB, 16, 6)
    path, inside = tmp_path / "resnet.onnx", tmp_path / "inside.onnx"
    torch.onnx.export(module, (torch.rand(1, *RGB),), str(path), dynamo=True, verbose=False, optimize=True)
    assert (tmp_path / "resnet.onnx.data").is_file()  # torch keeps the weights next to the file
    torch.onnx.export(module, (torch.rand(1, *RGB),), str(inside), dynamo=True, verbose=False,
                      external_data=False)
    from_torch = compile_model(module, calibration)
    from_file = compile_model(path, calibration)
    from_bytes = compile_model(inside.read_bytes(), calibration)
    assert from_torch.model.to_spec() == from_file.model.to_spec() == from_bytes.model.to_spec()
    files = [[layer.to_file() for layer in result.model.layers] for result in (from_torch, from_file, from_bytes)]
    assert files[0] == files[1] == files[2]
    assert (from_torch.model.meta["source"], from_file.model.meta["source"]) == ("torch", "onnx")
    assert he_cnn.compile is compile_model


# --- the integer model ------------------------------------------------------------------------------


@pytest.mark.parametrize("network", NETWORKS)
def test_integer_reference_agrees_with_the_float_model(network, compiled):
    """weight_bits=10, activation_bits=12 (the defaults); 200 random images the calibration never saw."""
    _, result = compiled[network]
    agreement = result.agreement(images(network.shape, 200, 7))
    print(f"{network.__name__}: integer/float argmax agreement {agreement:.3f} on 200 images")
    assert agreement >= 0.95
    spec = result.model.to_spec()
    assert IntegerModel.from_spec(spec).to_spec() == spec  # S1 accepts what the compiler makes


def test_relu_before_maxpool_is_swapped_and_shifts_requantise(compiled):
    _, result = compiled[SmallVGG]
    layers = result.model.layers
    kinds = [layer.kind for layer in layers]
    assert kinds[:3] == ["conv", "maxpool", "relu"]  # conv, relu, maxpool in the torch module
    relus = [layer for layer in layers if isinstance(layer, ReLU)]
    assert relus and all(result.model.bits[r.output] <= 13 for r in relus)  # calibrated peaks: <= 12 bits
    assert all(result.model.meta[key] == value for key, value in
               {"weight_bits": 10, "activation_bits": 12, "source": "torch"}.items())
    for layer in result.model.linear_layers():
        assert max(abs(int(v)) for v in layer.weight.ravel()) <= 511


def test_grouped_convolution_becomes_block_diagonal(compiled):
    module, result = compiled[Branches]
    depthwise = next(layer for layer in result.model.layers
                     if isinstance(layer, Conv) and layer.weight.shape[1] == 8 and layer.kernel == (3, 3))
    off_diagonal = [int(depthwise.weight[o, c].any()) for o in range(8) for c in range(8) if o != c]
    assert not any(off_diagonal)
    kinds = {layer.kind for layer in result.model.layers}
    assert {"pad", "concat", "maxpool", "flatten", "dense"} <= kinds


def test_normalisation_is_folded_into_the_first_layer():
    """mean/std of the preprocessing: the integer model reads raw pixels; a convolution without
    padding makes the fold exact, one with padding gets a notice."""
    torch.manual_seed(8)
    module = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 10 * 8, 3)).eval()
    preprocessing = Preprocessing(12, 10, "rgb", 255, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    x = images(RGB, 200, 9)
    result = compile_model(module, x[:32], preprocessing=preprocessing, classes=["a", "b", "c"])
    mean, std = np.array(preprocessing.mean)[:, None, None], np.array(preprocessing.std)[:, None, None]
    expected = torch_scores(module, (x - mean) / std)
    np.testing.assert_allclose(result.float_graph(x), expected, atol=1e-4)
    np.testing.assert_allclose(result.source_scores(x), expected, atol=1e-4)
    assert result.notices == ()
    assert result.model.classes == ["a", "b", "c"]
    assert result.model.preprocessing == preprocessing
    assert result.agreement(x) >= 0.95

    padded = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 12 * 10, 3))
    noticed: list[str] = []
    compile_model(padded.eval(), x[:8], preprocessing=preprocessing, notice=noticed.append)
    assert len(noticed) == 1 and "mean = 0" in noticed[0]

    dense = nn.Sequential(nn.Flatten(), nn.Linear(3 * 12 * 10, 3)).eval()  # through a flatten: exact too
    result = compile_model(dense, x[:8], preprocessing=preprocessing)
    np.testing.assert_allclose(result.float_graph(x), torch_scores(dense, (x - mean) / std), atol=1e-4)
    pooled = nn.Sequential(nn.MaxPool2d(2), nn.Flatten(), nn.Linear(3 * 6 * 5, 3)).eval()
    with pytest.raises(UnsupportedLayer, match="can only be folded into a Conv or Gemm/MatMul"):
        compile_model(pooled, x[:8], preprocessing=preprocessing)


# --- what is refused, and how --------------------------------------------------------------------------


@pytest.mark.parametrize("layer, op", [(nn.Sigmoid(), "Sigmoid"), (nn.Upsample(scale_factor=2), "Resize")])
def test_unsupported_operation_names_node_and_op(layer, op):
    module = nn.Sequential(nn.Conv2d(1, 2, 3), layer, nn.Flatten(), nn.LazyLinear(2))
    module(torch.rand(1, *GREY))  # materialise the lazy layer
    with pytest.raises(UnsupportedLayer) as caught:
        compile_model(module.eval(), images(GREY, 4, 10))
    message = str(caught.value)
    assert f"({op})" in message and "node " in message and "supported operations: " in message
    assert "Conv" in message.split("supported operations: ")[1]


def test_batchnorm_without_a_linear_layer_before_it_is_refused():
    module = nn.Sequential(nn.BatchNorm2d(1), nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 10 * 10, 2))
    with pytest.raises(UnsupportedLayer, match="BatchNormalization.*must directly follow a Conv"):
        compile_model(module.eval(), images(GREY, 4, 11))


def test_a_file_that_is_not_onnx_is_a_bad_request(tmp_path):
    text = tmp_path / "model.onnx"
    text.write_text("this is not an ONNX model\n" * 10)
    for source in (text, b"\x08\x07garbage", tmp_path / "missing.onnx"):
        with pytest.raises(BadRequest):
            compile_model(source, images(GREY, 2, 12))
    with pytest.raises(BadRequest, match="expected a torch nn.Module"):
        compile_model(42, images(GREY, 2, 12))


def test_external_data_is_read_only_from_the_model_folder(tmp_path):
    module = seeded(SmallVGG)
    path = tmp_path / "vgg.onnx"
    torch.onnx.export(module, (torch.rand(1, *GREY),), str(path), dynamo=True, verbose=False)
    with pytest.raises(BadRequest, match="pass the model's path"):
        compile_model(path.read_bytes(), images(GREY, 2, 16))
    model = onnx.load(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../vgg.onnx.data"
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "vgg.onnx").write_bytes(model.SerializeToString())
    with pytest.raises(BadRequest, match="not a file in the model's folder"):
        compile_model(tmp_path / "sub" / "vgg.onnx", images(GREY, 2, 16))


def test_a_too_large_file_is_refused_before_parsing(tmp_path, monkeypatch):
    path = tmp_path / "big.onnx"
    path.write_bytes(b"\0" * 2048)
    monkeypatch.setattr(onnx_import, "MAX_MODEL_BYTES", 1024)
    with pytest.raises(BadRequest, match="more than 1024"):
        compile_model(path, images(GREY, 2, 13))


def test_input_of_the_wrong_rank_is_refused():
    weights = {"w": np.ones((16, 3))}
    model = onnx_model([helper.make_node("Gemm", ["x", "w"], ["y"])], (16,), 3, weights)
    with pytest.raises(UnsupportedLayer, match=r"rank 2; expected images of shape \(N, C, H, W\)"):
        compile_model(model, images(GREY, 2, 14))


def test_calibration_images_are_checked(compiled):
    module, _ = compiled[SmallVGG]
    for bad in (images(RGB, 4, 15), images(GREY, 4, 15) * 3, np.zeros((4, 12, 12))):
        with pytest.raises(HECNNError):
            compile_model(module, bad)


# --- hostile ONNX files: bounded, and every failure a clear he-cnn error ------------------------------------


def flat_model(nodes: list, weights: dict[str, np.ndarray] | None = None, constants: dict | None = None,
               shape: tuple[int, ...] = (1, 4, 4)) -> onnx.ModelProto:
    """``x`` flattened to ``f`` (N, 16) and then ``nodes``, which write ``y`` (N, 16)."""
    return onnx_model([helper.make_node("Flatten", ["x"], ["f"]), *nodes], shape, 16, weights or {}, constants)


def test_non_finite_weights_are_a_bad_request():
    """A NaN weight, an infinite folded constant and a BatchNormalization whose variance makes a NaN
    scale are refused by name before they reach the integer model."""
    nan_weight = np.ones((16, 16))
    nan_weight[3, 4] = np.nan
    cases = [
        (flat_model([helper.make_node("MatMul", ["f", "w"], ["y"])], {"w": nan_weight}), r"'w' holds non-finite"),
        (flat_model([helper.make_node("Div", ["one", "zero"], ["inf"]), helper.make_node("Mul", ["w", "inf"], ["wi"]),
                     helper.make_node("MatMul", ["f", "wi"], ["y"])],
                    {"w": np.ones((16, 16)), "one": np.ones(1), "zero": np.zeros(1)}), r"'wi' holds non-finite"),
        (onnx_model([helper.make_node("Conv", ["x", "w"], ["c"]),
                     helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["n"]),
                     helper.make_node("Flatten", ["n"], ["y"])], (1, 4, 4), 16,
                    {"w": np.ones((1, 1, 1, 1)), "s": np.ones(1), "b": np.zeros(1), "m": np.zeros(1),
                     "v": -np.ones(1)}), r"Affine 'n': its scale is not finite"),
    ]
    for model, message in cases:
        with pytest.raises(BadRequest, match=message):
            compile_model(model, images((1, 4, 4), 2, 20))


def test_constant_folding_is_bounded_before_it_evaluates(monkeypatch):
    """A broadcasting product of (N, 1) by (1, N) is refused from its inputs' shapes (200000**2
    elements would be 149 GiB); operations outside shape arithmetic are not evaluated on constants;
    a node that does not reach the output is not evaluated at all; all folded constants share one bound."""
    big = flat_model([helper.make_node("Mul", ["a", "b"], ["big"]), helper.make_node("Add", ["f", "big"], ["y"])],
                     {"a": np.zeros((200000, 1)), "b": np.zeros((1, 200000))})
    with pytest.raises(BadRequest, match="would make a constant of 40000000000 elements"):
        compile_model(big, images((1, 4, 4), 2, 21))

    one_hot = flat_model([helper.make_node("OneHot", ["i", "depth", "values"], ["h"]),
                          helper.make_node("Add", ["f", "h"], ["y"])],
                         {"values": np.array([0.0, 1.0])}, {"i": np.arange(16), "depth": np.array(10**9)})
    with pytest.raises(UnsupportedLayer, match=r"\(OneHot\) on constants is not supported"):
        compile_model(one_hot, images((1, 4, 4), 2, 21))
    padded = flat_model([helper.make_node("Pad", ["c", "pads"], ["p"]), helper.make_node("Add", ["f", "p"], ["y"])],
                        {"c": np.ones(16)}, {"pads": np.array([0, 10**9])})
    with pytest.raises(UnsupportedLayer, match=r"\(Pad\) input 0 \('c'\) is a constant"):
        compile_model(padded, images((1, 4, 4), 2, 21))

    dead = flat_model([helper.make_node("ConstantOfShape", ["huge"], ["unused"]),
                       helper.make_node("MatMul", ["f", "w"], ["y"])], {"w": np.eye(16)}, {"huge": np.array([10**12])})
    assert compile_model(dead, images((1, 4, 4), 2, 21)).float_graph.shapes

    monkeypatch.setattr(onnx_import, "MAX_CONSTANT_ELEMENTS", 1000)
    shared = flat_model([helper.make_node("ConstantOfShape", ["n"], ["c1"]),
                         helper.make_node("ConstantOfShape", ["n"], ["c2"]),
                         helper.make_node("Concat", ["c1", "c2"], ["c"], axis=0),
                         helper.make_node("Add", ["f", "c"], ["y"])], constants={"n": np.array([600])})
    with pytest.raises(BadRequest, match=r"\(ConstantOfShape\) would make a constant of 600 elements; the folded "
                                         r"constants may have 1000 in all, 400 are left"):
        compile_model(shared, images((1, 4, 4), 2, 21))


def test_external_data_counts_every_tensor(tmp_path, monkeypatch):
    """A hundred initializers reading one 400-byte file are 40000 bytes; a tensor whose dims need
    more bytes than it declares is refused; so is a Constant whose value lies in a file."""
    (tmp_path / "w.bin").write_bytes(np.ones(100, dtype=np.float32).tobytes())

    def external(name: str, elements: int, **where: int) -> TensorProto:
        tensor = numpy_helper.from_array(np.zeros(elements, dtype=np.float32), name)
        onnx.external_data_helper.set_external_data(tensor, "w.bin", **where)
        tensor.ClearField("raw_data")
        tensor.data_location = TensorProto.EXTERNAL
        return tensor

    def save(tensors: list[tuple[str, int]], name: str) -> str:
        model = flat_model([helper.make_node("Identity", ["f"], ["y"])])
        model.graph.initializer.extend(external(*tensor, offset=0, length=400) for tensor in tensors)
        path = tmp_path / name
        path.write_bytes(model.SerializeToString())
        return str(path)

    many = save([(f"t{i}", 100) for i in range(100)], "many.onnx")
    monkeypatch.setattr(onnx_import, "MAX_MODEL_BYTES", 20000)
    with pytest.raises(BadRequest, match="external data of its tensors have more than 20000 bytes"):
        onnx_import.read_onnx(many)
    monkeypatch.setattr(onnx_import, "MAX_MODEL_BYTES", 256 << 20)
    assert len(onnx_import.read_onnx(many).graph.initializer) == 100
    with pytest.raises(BadRequest, match=r"initializer 'long': external data of 400 bytes .* need 4000 bytes"):
        onnx_import.read_onnx(save([("long", 1000)], "long.onnx"))

    constant = flat_model([helper.make_node("Constant", [], ["c"], value=external("v", 100)),
                           helper.make_node("Add", ["f", "c"], ["y"])])
    with pytest.raises(BadRequest, match="attribute whose data lies in an external file"):
        onnx_import.import_onnx(constant)


def test_padding_and_tensor_sizes_are_bounded():
    """Pads beyond the integer Pad layer's 1024, and tensors beyond MAX_TENSOR_ELEMENTS, are refused
    while importing: nothing is padded or allocated."""
    pad = onnx_model([helper.make_node("Pad", ["x", "pads"], ["p"]), helper.make_node("Flatten", ["p"], ["y"])],
                     (1, 4, 4), 16, {}, {"pads": np.array([0, 0, 0, 2000, 0, 0, 0, 0])})
    conv = onnx_model([helper.make_node("Conv", ["x", "w"], ["c"], pads=[5000, 0, 5000, 0]),
                       helper.make_node("Flatten", ["c"], ["y"])], (1, 4, 4), 16, {"w": np.ones((1, 1, 1, 1))})
    wide = onnx_model([helper.make_node("Pad", ["x", "pads"], ["p"]), helper.make_node("Flatten", ["p"], ["y"])],
                      (1, 2, 2048), 16, {}, {"pads": np.array([0, 0, 1024, 0, 0, 0, 1024, 0])})
    huge_input = onnx_model([helper.make_node("Flatten", ["x"], ["y"])], (1, 4096, 4096), 16, {})
    cases = [(pad, r"\(Pad\): pads \[0, 0, 0, 2000, 0, 0, 0, 0\] exceed 1024"),
             (conv, r"\(Conv\): pads .* exceed 1024"),
             (wide, r"tensor 'p' \(Pad\) would have shape \(1, 2050, 2048\): 4198400 elements per image, more "
                    r"than 4194304"),
             (huge_input, "has more than 4194304 elements per image")]
    for model, message in cases:
        with pytest.raises(BadRequest, match=message):
            onnx_import.import_onnx(model)


def test_a_1x1_convolution_with_padding_gets_a_pad_layer():
    weights = {"w": np.random.default_rng(22).normal(size=(2, 1, 1, 1)), "fc": np.ones((2 * 6 * 6, 3))}
    model = onnx_model([helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
                        helper.make_node("Flatten", ["c"], ["f"]), helper.make_node("MatMul", ["f", "fc"], ["y"])],
                       (1, 4, 4), 3, weights)
    x = images((1, 4, 4), 8, 22)
    result = compile_model(model, x)
    assert [layer.kind for layer in result.model.layers][:2] == ["pad", "conv"]
    expected = ReferenceEvaluator(model).run(None, {"x": x.astype(np.float32)})[0]
    np.testing.assert_allclose(result.float_graph(x), expected, atol=1e-4)


def _raw_with_wrong_length() -> onnx.ModelProto:
    model = flat_model([helper.make_node("MatMul", ["f", "w"], ["y"])], {"w": np.eye(16)})
    model.graph.initializer[0].raw_data = b"\0" * 12
    return model


MALFORMED_MODELS = {  # each used to end in a builtin exception (import_onnx does not rely on onnx.checker)
    "stride 0": lambda: onnx_model([helper.make_node("Conv", ["x", "w"], ["c"], strides=[0, 1]),
                                    helper.make_node("Flatten", ["c"], ["y"])], (1, 4, 4), 16,
                                   {"w": np.ones((1, 1, 1, 1))}),
    "weight for other channels": lambda: onnx_model(
        [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Flatten", ["c"], ["y"])], (1, 4, 4), 16,
        {"w": np.ones((1, 3, 1, 1))}),
    "raw data of the wrong length": _raw_with_wrong_length,
    "gather out of range": lambda: flat_model([helper.make_node("Gather", ["s", "i"], ["g"]),
                                               helper.make_node("Reshape", ["f", "g"], ["y"])],
                                              constants={"s": np.array([1, 16]), "i": np.array([5])}),
    "pads of the wrong length": lambda: onnx_model([helper.make_node("Pad", ["x", "pads"], ["p"]),
                                                    helper.make_node("Flatten", ["p"], ["y"])], (1, 4, 4), 16, {},
                                                   {"pads": np.array([0, 0, 1])}),
}


@pytest.mark.parametrize("name", MALFORMED_MODELS)
def test_malformed_models_are_a_bad_request_or_unsupported(name):
    with pytest.raises((BadRequest, UnsupportedLayer)) as caught:
        onnx_import.import_onnx(MALFORMED_MODELS[name]())
    print(f"{name}: {caught.value}")
    assert "node " in str(caught.value) or "initializer " in str(caught.value)
