"""The model zoo: every architecture builds for grey and colour inputs, its secure cost is what its
module docstring says, and training any of them is reproducible for a seed."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch import nn

from he_cnn.errors import BadRequest
from he_cnn.training import zoo
from he_cnn.training.data import Dataset
from he_cnn.training.train import float_logits, train_architecture, train_classifier
from he_cnn.training.zoo import ARCHITECTURES, build_model

SHAPES = [(1, 16, 16), (1, 28, 28), (3, 12, 10)]
#: the largest number of ReLU evaluations a zoo model may cost on a 28x28 input
RELU_BUDGET = 8000


def secure_cost(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, int]:
    """The cost the zoo's docstring tabulates, counted through forward hooks on one zero input: ReLU
    values once each max pool reading a ReLU's output runs first (on the pooled values), pool windows,
    comparisons (one per ReLU value, k*k - 1 per k x k window) and multiply-accumulates."""
    relu_outputs: dict[int, torch.Tensor] = {}  # by id; held so that no other tensor gets the id
    cost = {"relus": 0, "windows": 0, "comparisons": 0, "macs": 0}

    def count(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if isinstance(module, nn.ReLU):
            relu_outputs[id(output)] = output
            cost["relus"] += output.numel()
        elif isinstance(module, nn.MaxPool2d):
            side = module.kernel_size
            cost["windows"] += output.numel()
            cost["comparisons"] += output.numel() * (side * side - 1)
            if id(inputs[0]) in relu_outputs:
                cost["relus"] += output.numel() - relu_outputs.pop(id(inputs[0])).numel()
        elif isinstance(module, nn.Conv2d):
            cost["macs"] += output.numel() * module.in_channels * module.kernel_size[0] * module.kernel_size[1]
        elif isinstance(module, nn.Linear):
            cost["macs"] += output.numel() * module.in_features

    hooks = [m.register_forward_hook(count) for m in model.modules()]
    with torch.no_grad():
        model.eval()(torch.zeros(1, *input_shape))
    for hook in hooks:
        hook.remove()
    cost["comparisons"] += cost["relus"]
    return cost


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("shape", SHAPES)
def test_every_architecture_builds_and_classifies(arch, shape):
    if arch == "icnn" and shape[0] != 1:
        with pytest.raises(BadRequest, match="square grey"):
            build_model(arch, shape, 10)
        return
    model = build_model(arch, shape, 7).eval()
    assert float_logits(model, np.zeros((2, *shape), dtype=np.float32)).shape == (2, 7)


def test_the_docstring_table_is_the_cost():
    rows = {m[0]: [int(v.replace(",", "")) for v in m[1:]]
            for m in re.findall(r"^(\w+)\s+([\d,]+)\s+([\d,]+)\s+([\d,]+)\s+([\d,]+)\s+([\d,]+)$", zoo.__doc__, re.M)}
    assert set(rows) == set(ARCHITECTURES)
    for arch in ARCHITECTURES:
        model = build_model(arch, (1, 28, 28), zoo.architecture(arch).outputs(10))
        cost = secure_cost(model, (1, 28, 28))
        parameters = sum(p.numel() for p in model.parameters())
        assert rows[arch] == [cost["relus"], cost["windows"], cost["comparisons"], cost["macs"], parameters], arch
        if arch != "icnn":
            assert cost["relus"] < RELU_BUDGET and cost["comparisons"] < 1.2 * RELU_BUDGET


@pytest.mark.parametrize("call, message", [
    (lambda: build_model("alexnet", (1, 16, 16), 10), "unknown architecture"),
    (lambda: build_model("vgg", (1, 3, 16), 10), "smaller than"),
    (lambda: build_model("vgg", (1, 16), 10), "3 positive ints"),
    (lambda: build_model("resnet", (1, 16, 16), 1), "at least 2 classes"),
    (lambda: build_model("icnn", (1, 18, 18), 10), "multiple of 4"),
])
def test_bad_requests(call, message):
    with pytest.raises(BadRequest, match=message):
        call()


def test_building_leaves_the_random_state_alone():
    state = torch.get_rng_state()
    build_model("resnet", (3, 12, 10), 4)
    assert torch.equal(torch.get_rng_state(), state)


def tiny_dataset(shape: tuple[int, int, int]) -> Dataset:
    rng = np.random.default_rng(0)
    images = rng.random((48, *shape), dtype=np.float32)
    labels = np.arange(48, dtype=np.int64) % 3
    return Dataset(images[:36], labels[:36], images[36:], labels[36:], ["a", "b", "c"], shape[1])


@pytest.mark.parametrize("arch", ["vgg", "resnet"])
def test_training_is_deterministic_for_a_seed(arch):
    data = tiny_dataset((3, 12, 10))
    first, second, other = (train_classifier(build_model(arch, (3, 12, 10), 3), data, epochs=1, seed=s)
                            for s in (4, 4, 5))
    weights = [r.model.state_dict() for r in (first, second, other)]
    for name, tensor in weights[0].items():
        assert torch.equal(tensor, weights[1][name]), name
    assert any(not torch.equal(t, weights[2][n]) for n, t in weights[0].items() if t.is_floating_point())
    assert not first.model.training and first.epoch_losses == second.epoch_losses
    if arch == "resnet":  # batch norm learnt its statistics in train mode
        assert not torch.equal(first.model.stem_bn.running_mean, torch.zeros(8))


def test_train_architecture_uses_the_zoo_plan():
    result = train_architecture("vgg", tiny_dataset((1, 16, 16)), seed=1, epochs=1)
    assert result.epochs == 1 and len(result.epoch_losses) == 1 and 0.0 <= result.float_test_accuracy <= 1.0
    assert zoo.architecture("resnet").epochs == 25
