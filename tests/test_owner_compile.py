"""``he-cnn owner compile`` and the zoo from the owner's command line: what a user's own model and the
built-in architectures give, and the one-line refusals (an unsupported operator, images of the wrong
shape), never a traceback."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from he_cnn.graph.integer_model import load_integer_model
from he_cnn.graph.reference import classify_reference


def he_cnn(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "he_cnn", *args], capture_output=True, text=True, timeout=600)


def export(module: nn.Module, path, shape=(1, 8, 8)) -> None:
    torch.manual_seed(0)
    torch.onnx.export(module.eval(), (torch.rand(1, *shape),), str(path), dynamo=True, verbose=False)


def test_compile_reports_and_writes_a_model(tmp_path):
    export(nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 36, 4)), tmp_path / "m.onnx")
    rng = np.random.default_rng(0)
    np.save(tmp_path / "x.npy", rng.integers(0, 256, (30, 8, 8)).astype(np.uint8))  # (n, H, W) 8-bit
    np.save(tmp_path / "y.npy", rng.integers(0, 4, 30))
    done = he_cnn("owner", "compile", str(tmp_path / "m.onnx"), "--calibrate", str(tmp_path / "x.npy"),
                  "--labels", str(tmp_path / "y.npy"), "--out", str(tmp_path / "m.hecnn"), "--json",
                  "--key-bits", "1024")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert [row["kind"] for row in report["layers"]] == ["conv", "relu", "flatten", "dense"]
    assert report["held_out_images"] == 15 and 0 <= report["integer_accuracy"] <= 1
    assert report["predicted"]["bits"] == 1024 and report["predicted"]["compared_bits"] > 0
    model = load_integer_model(tmp_path / "m.hecnn")
    assert model.preprocessing.input_max == 255 and model.input_shape == (1, 8, 8)
    assert len(classify_reference(model, np.zeros((1, 8, 8), dtype=object))) == 4


@pytest.mark.parametrize("problem", ["unsupported op", "wrong image shape", "overflows the key"])
def test_compile_refuses_in_one_line(tmp_path, problem):
    layers = [nn.Conv2d(1, 2, 3), nn.Sigmoid() if problem == "unsupported op" else nn.ReLU(), nn.Flatten(),
              nn.Linear(2 * 36, 3)]
    if problem == "overflows the key":  # 64 dense layers and no ReLU: each adds ~20 bits to the bound
        layers = [nn.Flatten()] + [nn.Linear(64, 64) for _ in range(64)]
    export(nn.Sequential(*layers), tmp_path / "m.onnx")
    shape = (10, 1, 9, 9) if problem == "wrong image shape" else (10, 1, 8, 8)
    np.save(tmp_path / "x.npy", np.random.default_rng(1).random(shape).astype(np.float32))
    wide = ["--bits", "16", "--key-bits", "1024"] if problem == "overflows the key" else []
    done = he_cnn("owner", "compile", str(tmp_path / "m.onnx"), "--calibrate", str(tmp_path / "x.npy"),
                  "--out", str(tmp_path / "m.hecnn"), *wide)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    expected = {"unsupported op": ["Sigmoid", "supported"], "wrong image shape": ["(n, 1, 8, 8)"],
                "overflows the key": ["overflow a 1024-bit key"]}[problem]
    assert all(text in last for text in expected), last
    assert not (tmp_path / "m.hecnn").exists()


@pytest.mark.parametrize("arch", ["vgg", "resnet"])
def test_zoo_architecture_trains_and_compiles(tmp_path, arch):
    done = he_cnn("owner", "train", "--arch", arch, "--data", "digits", "--epochs", "2", "--save-model",
                  str(tmp_path / "m.json"), "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["integer_accuracy"] > 0.5 and report["agreement"] > 0.9
    model = load_integer_model(tmp_path / "m.json")
    assert model.preprocessing.input_max == 255 and model.meta["source"] == "torch"


@pytest.mark.parametrize("content", ["empty", "scalar", "strings", "npz"])
def test_hostile_calibration_files_get_one_line(tmp_path, content):
    export(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 36, 3)), tmp_path / "m.onnx")
    target = tmp_path / "x.npy"
    if content == "empty":
        target.write_bytes(b"")
    elif content == "scalar":
        np.save(target, np.float32(0.5))
    elif content == "strings":
        np.save(target, np.array(["a", "b"]))
    else:
        np.savez(tmp_path / "x.npz", a=np.zeros(3))
        (tmp_path / "x.npz").rename(target)
    done = he_cnn("owner", "compile", str(tmp_path / "m.onnx"), "--calibrate", str(target), "--out",
                  str(tmp_path / "m.hecnn"))
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "x.npy" in done.stderr.strip().splitlines()[-1]
