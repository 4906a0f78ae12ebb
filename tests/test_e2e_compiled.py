"""Bring your own model, end to end: two networks defined only here, in the test, exported to ONNX
by torch, compiled with ``he-cnn owner compile``, uploaded with ``he-cnn owner upload --model`` to
real S1 and S2 processes and queried over HTTP with ``he-cnn user query``; every decrypted class
vector must equal the integer reference of the compiled model on the user's own encoding of the
same picture (an RGB, non-square PNG).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from he_cnn.graph.integer_model import load_integer_model
from he_cnn.graph.reference import classify_reference

from test_e2e import Clouds, he_cnn

pytestmark = pytest.mark.slow

SHAPE = (3, 12, 10)  # RGB, not square


class SmallVGG(nn.Module):
    """3x3 convolutions with BatchNorm, a max-pool, an average pool and a dense head."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AvgPool2d(2))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 3 * 2, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class SmallResNet(nn.Module):
    """A stem, one residual block (identity skip) and a global average pool."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2))
        self.block = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                   nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        return self.head(torch.relu(self.block(y) + y))


def exported(module: nn.Module, path) -> None:
    """Seeded weights, BatchNorm statistics that are not the identity, exported to ONNX by torch."""
    torch.manual_seed(0)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
    module.eval()
    torch.onnx.export(module, (torch.rand(1, *SHAPE),), str(path), dynamo=True, verbose=False)


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pictures")
    rng = np.random.default_rng(1)
    paths = []
    for i in range(2):
        path = folder / f"picture-{i}.png"
        Image.fromarray(rng.integers(0, 256, (SHAPE[1], SHAPE[2], 3), dtype=np.uint8), "RGB").save(path)
        paths.append(path)
    calibration = folder / "calibration.npy"
    np.save(calibration, rng.random((32, *SHAPE)).astype(np.float32))
    return paths, calibration


@pytest.mark.parametrize("network", [SmallVGG, SmallResNet])
def test_compile_upload_query(network, tmp_path, pictures):
    images, calibration = pictures
    onnx_file, compiled = tmp_path / "model.onnx", tmp_path / "model.hecnn"
    exported(network(), onnx_file)
    report = json.loads(he_cnn("owner", "compile", str(onnx_file), "--calibrate", str(calibration),
                               "--out", str(compiled), "--json"))
    assert report["layers"] and report["predicted"]["predicted_seconds"] > 0
    model = load_integer_model(compiled)
    clouds = Clouds(tmp_path, 1024)
    try:
        out = he_cnn("owner", "upload", "--model", str(compiled), "--s1", clouds.s1_url, "--json",
                     env={"HECNN_OWNER_TOKEN": clouds.owner_token})
        model_id = json.loads(out)["model_id"]
        key = tmp_path / "user.key"
        he_cnn("user", "keygen", "--out", str(key), "--bits", "1024")
        out = he_cnn("user", "query", "--s1", clouds.s1_url, "--model", model_id, "--key", str(key), "--json",
                     "--no-progress", *map(str, images))
        for image, result in zip(images, json.loads(out)["results"]):
            pixels = model.preprocessing.encode(image)  # the user's encoding, from the public spec
            assert result["vector"] == [int(v) for v in classify_reference(model, pixels)]
    finally:
        clouds.stop()
