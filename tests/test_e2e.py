"""End to end over real HTTP, exactly as people use the service: S1 and S2 are separate processes started
with ``python -m he_cnn serve ...`` (the ``he-cnn`` command), the owner uploads with ``he-cnn owner
upload``, the user queries with ``he-cnn user query``; the decrypted class vector must equal the
plaintext integer reference exactly. Then S1 restarts and answers again without a new upload.
One test runs with a 2048-bit cloud key (one image, it takes about two minutes on two cores).
"""
from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from he_cnn.images import load_image_file, quantize_image
from he_cnn.training.data import load_digits_dataset
from he_cnn.graph.integer_model import load_integer_model
from he_cnn.graph.reference import classify_reference
from he_cnn.servers.launch import CloudProcess

pytestmark = pytest.mark.slow



def he_cnn(*args: str, env: dict[str, str] | None = None, timeout: float = 900) -> str:
    """Run the ``he-cnn`` command (as ``python -m he_cnn``); its stdout, or fail with its stderr."""
    done = subprocess.run([sys.executable, "-m", "he_cnn", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    assert done.returncode == 0, f"he-cnn {' '.join(args[:2])} failed:\n{done.stderr[-3000:]}"
    assert "Traceback" not in done.stderr
    return done.stdout


class Clouds:
    """S2 and S1 as processes, with random tokens given through the environment."""

    def __init__(self, root: Path, key_bits: int):
        self.root = root
        self.key_bits = key_bits
        self.cloud_token = secrets.token_urlsafe(24)
        self.owner_token = secrets.token_urlsafe(24)
        self.logs: list[str] = []
        self.s2 = self._start("S2", ["--data-dir", str(root / "s2"), "--key-bits", str(key_bits)],
                              {"HECNN_S2_CLOUD_TOKEN": self.cloud_token})
        self.s2_url = self.s2.wait_ready()
        self.s1 = self.start_s1()

    def _start(self, role: str, args: list[str], env: dict[str, str]) -> CloudProcess:
        return CloudProcess(role, args, env, on_log=self.logs.append)

    def start_s1(self) -> CloudProcess:
        s1 = self._start("S1", ["--data-dir", str(self.root / "s1"), "--peer-url", self.s2_url, "--open"],
                         {"HECNN_S1_CLOUD_TOKEN": self.cloud_token, "HECNN_S1_OWNER_TOKEN": self.owner_token})
        self.s1_url = s1.wait_ready()
        return s1

    def restart_s1(self) -> None:
        assert self.s1.stop() == 0
        self.s1 = self.start_s1()

    def stop(self) -> None:
        for cloud in (self.s1, self.s2):
            assert cloud.stop() == 0, cloud.log_tail
        text = "\n".join(self.logs)
        assert self.cloud_token not in text and self.owner_token not in text  # tokens never logged
        assert "Traceback" not in text, text[-3000:]


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    """The owner's integer model, trained briefly with ``he-cnn owner train`` (accuracy is not under test)."""
    path = tmp_path_factory.mktemp("owner") / "icnn.json"
    report = json.loads(he_cnn("owner", "train", "--epochs", "3", "--save-model", str(path), "--json"))
    assert report["integer_accuracy"] > 0.5 and path.is_file()
    return path


@pytest.fixture(scope="module")
def test_images(tmp_path_factory) -> list[Path]:
    """Two digits from the held-out split: one as a .npy array, one as an 8-bit PNG."""
    folder = tmp_path_factory.mktemp("images")
    data = load_digits_dataset()
    npy, png = folder / "digit-a.npy", folder / "digit-b.png"
    np.save(npy, data.x_test[0][0])
    Image.fromarray(np.uint8(np.rint(data.x_test[1][0] * 255))).save(png)
    return [npy, png]


def upload(clouds: Clouds, model: Path) -> str:
    out = he_cnn("owner", "upload", "--model", str(model), "--s1", clouds.s1_url, "--json",
                 env={"HECNN_OWNER_TOKEN": clouds.owner_token})
    return json.loads(out)["model_id"]


def query_and_check(clouds: Clouds, model_id: str, key: Path, image: Path, model_path: Path) -> dict:
    out = he_cnn("user", "query", "--s1", clouds.s1_url, "--model", model_id, "--key", str(key), "--json",
                 "--no-progress", str(image))
    result = json.loads(out)["results"][0]
    model = load_integer_model(model_path)
    pixels = quantize_image(load_image_file(image, model.input_shape[1]), model.input_max)
    reference = [int(v) for v in classify_reference(model, pixels)]
    assert result["vector"] == reference
    assert result["class_index"] == int(np.argmax(reference))
    return result


def test_e2e_upload_query_restart_1024(tmp_path, saved_model, test_images):
    clouds = Clouds(tmp_path, 1024)
    try:
        model_id = upload(clouds, saved_model)
        key = tmp_path / "user" / "me.key"
        he_cnn("user", "keygen", "--out", str(key), "--bits", "1024")
        assert oct(key.stat().st_mode & 0o777) == "0o600"
        query_and_check(clouds, model_id, key, test_images[0], saved_model)

        clouds.restart_s1()  # models and set-ups come back from S1's data directory
        query_and_check(clouds, model_id, key, test_images[1], saved_model)
    finally:
        clouds.stop()


def test_e2e_2048_bit_cloud_key(tmp_path, saved_model, test_images):
    clouds = Clouds(tmp_path, 2048)
    try:
        assert requests.get(clouds.s2_url + "/v1/health", timeout=10).json()["key_bits"] == 2048
        model_id = upload(clouds, saved_model)
        key = tmp_path / "user" / "me.key"
        he_cnn("user", "keygen", "--out", str(key))  # the default: 2048 bits
        result = query_and_check(clouds, model_id, key, test_images[0], saved_model)
        assert result["server"]["rounds"] > 0
    finally:
        clouds.stop()
