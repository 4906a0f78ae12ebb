"""``he_cnn.Client``, the Python client, against real S1 and S2 processes (1024-bit keys, the trust tests'
tiny model): its results equal the plaintext integer reference, it finds S1's only model, it refuses
to guess between several, ``he-cnn user query`` prints what it returns, and ``import he_cnn`` stays light.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import he_cnn
from he_cnn.errors import BadRequest, PeerUnavailable
from he_cnn.graph.reference import classify_reference
from he_cnn.servers.cli import main
from he_cnn.user.client import Client, Classification
from he_cnn.user.keys import create_user_key, load_user_key
from test_service_errors import closed_port_url
from trust_support import TINY_CLASSES, CloudPair, random_image, tiny_model


@pytest.fixture(scope="module")
def clouds(tmp_path_factory):
    """S1 and S2 as processes, the tiny model uploaded: (pair, model, model id)."""
    pair = CloudPair(tmp_path_factory.mktemp("clouds"))
    try:
        model = tiny_model()
        yield pair, model, pair.upload(model)
    finally:
        pair.stop()


@pytest.fixture(scope="module")
def key_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("user") / "me.key"
    create_user_key(path, 1024)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    """Two 8x8 pictures: a .npy array of the digits' ink counts and a grey PNG."""
    folder = tmp_path_factory.mktemp("images")
    npy, png = folder / "a.npy", folder / "b.png"
    np.save(npy, np.array(random_image(1)[0], dtype=np.int64))
    Image.fromarray(np.uint8(np.array(random_image(2)[0], dtype=np.int64) * 17)).save(png)
    return [npy, png]


def test_the_client_classifies_exactly(clouds, key_file, images):
    pair, model, model_id = clouds
    client = he_cnn.Client(pair.s1_url, key_file, model=model_id)
    assert isinstance(client, Client) and client.model_id == model_id
    results = client.classify(images)
    assert [r.image for r in results] == [str(p) for p in images]
    for path, result in zip(images, results):
        assert isinstance(result, Classification)
        assert np.array_equal(result.pixels, client.info.preprocessing.encode(path))  # what was encrypted
        reference = [int(v) for v in classify_reference(model, result.pixels)]
        assert result.vector == reference
        assert result.predicted == int(np.argmax(reference)) and result.class_name == TINY_CLASSES[result.predicted]
        assert result.seconds > 0 and result.server["rounds"] > 0 and result.server["model_id"] == model_id

    # a key pair instead of its file, one image instead of a list, and no model id: S1's only model
    keys = load_user_key(key_file)
    only = Client(pair.s1_url, keys)
    assert only.model_id == model_id and [m["model_id"] for m in only.models()] == [model_id]
    again = only.classify(images[0])
    assert len(again) == 1 and again[0].vector == results[0].vector
    assert str(keys.private.p) not in repr(only) and keys.public.key_id in repr(only)


def test_the_cli_prints_what_the_client_returns(clouds, key_file, images):
    pair, model, model_id = clouds
    done = CliRunner().invoke(main, ["user", "query", "--s1", pair.s1_url, "--model", model_id, "--key", str(key_file),
                                     "--json", str(images[1])])
    assert done.exit_code == 0, done.output
    printed = json.loads(done.stdout)["results"][0]
    result = Client(pair.s1_url, key_file, model=model_id).classify(images[1])[0]
    assert printed["vector"] == result.vector == [int(v) for v in classify_reference(model, result.pixels)]
    assert printed["class_index"] == result.predicted and printed["class"] == result.class_name


def test_the_client_does_not_guess_between_models(clouds, key_file, images):
    pair, _, model_id = clouds
    other = pair.upload(tiny_model(seed=1))
    with pytest.raises(BadRequest, match="name the model") as refused:
        Client(pair.s1_url, key_file)
    assert model_id in str(refused.value) and other in str(refused.value)
    client = Client(pair.s1_url, key_file, model=other)
    with pytest.raises(BadRequest, match="file paths"):
        client.classify([images[0], np.zeros((8, 8))])  # type: ignore[list-item]


def test_client_errors_are_ours(tmp_path, key_file):
    with pytest.raises(PeerUnavailable, match="S1 at .* is unreachable"):
        Client(closed_port_url(), key_file, model="0" * 16)
    with pytest.raises(BadRequest, match="does not exist"):  # before any request
        Client(closed_port_url(), tmp_path / "none.key")


def test_import_he_cnn_stays_light_and_client_is_lazy():
    code = ("import sys, he_cnn\n"
            "print('he_cnn.user' in sys.modules, 'requests' in sys.modules)\n"
            "from he_cnn.user.client import Client\n"
            "print(he_cnn.Client is Client, sorted(m for m in ('torch', 'sklearn') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["False False", "True []"]
