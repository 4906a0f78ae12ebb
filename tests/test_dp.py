"""Differentially private training (``he_cnn.training.dp``) and the model's privacy card.

DP-SGD runs here on small digits subsets (8x8 or 16x16, a few hundred images) with fixed seeds, the
private randomness included (``noise_seed``), so every number is reproducible; the accountant's ε does
not depend on the noise at all, only on the noise multiplier, the sampling rate and the steps. The card
is checked where a user reads it: S1's ``GET /v1/models/<id>`` through Flask's test client, S2 served by
waitress in a thread (as in ``tests/test_service_errors.py``).
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from he_cnn.errors import BadRequest, UnsupportedLayer
from he_cnn.graph.integer_model import IntegerModel, load_integer_model, save_integer_model
from he_cnn.graph.privacy import TrainingPrivacy
from he_cnn.owner.pipeline import TrainSettings
from he_cnn.parties.compute_cloud import encrypt_model
from he_cnn.parties.key_cloud import KeyCloud
from he_cnn.servers import s2 as s2_app
from he_cnn.servers.config import S2Config
from he_cnn.training.data import Dataset, load_dataset
from he_cnn.training.dp import DPSettings, check_trainable
from he_cnn.training.train import train_architecture
from he_cnn.training.zoo import build_model
from test_service_cli import one_line_error, run
from test_service_errors import AUTH_OWNER, CLOUD_TOKEN, WIRE, make_s1, start_server, tiny_model

CARD = TrainingPrivacy(2.5, 1e-5)


def small_digits(members: int = 400, size: int = 16) -> Dataset:
    full = load_dataset("digits", size=size, seed=0)
    return dataclasses.replace(full, x_train=full.x_train[:members], y_train=full.y_train[:members])


# -- training ------------------------------------------------------------------------------------------

def test_dp_training_reaches_but_never_exceeds_the_target_epsilon():
    """Opacus picks the noise for the target to within its tolerance (0.01); the ε the accountant reports
    after the last step is at most the target (rounded up to 3 decimals, never down) and not far below it."""
    data = small_digits()
    target = 2.0
    first = train_architecture("vgg", data, seed=0, epochs=6, privacy=DPSettings(target, 1e-4, noise_seed=0))
    assert first.privacy.dp and first.privacy.delta == 1e-4
    assert 0.9 * target <= first.privacy.epsilon <= target + 0.001
    again = train_architecture("vgg", data, seed=0, epochs=6, privacy=DPSettings(target, 1e-4, noise_seed=0))
    assert all(torch.equal(a, b) for a, b in zip(first.model.state_dict().values(), again.model.state_dict().values()))
    assert not any(hasattr(p, "grad_sample") for p in first.model.parameters())  # Opacus' traces removed


def test_batchnorm_is_refused_in_one_line_before_training():
    with pytest.raises(UnsupportedLayer) as refused:
        check_trainable(build_model("resnet", (1, 16, 16), 10), "resnet")
    message = str(refused.value)
    assert "\n" not in message and "BatchNorm2d" in message and "stem_bn" in message
    check_trainable(build_model("icnn", (1, 16, 16), 10))
    check_trainable(build_model("vgg", (1, 16, 16), 10))


def test_the_cli_refuses_batchnorm_with_one_line_and_exit_1(tmp_path):
    one_line_error(run("owner", "train", "--arch", "resnet", "--dp-epsilon", "3", "--save-model",
                       str(tmp_path / "m.json")), "resnet cannot be trained with differential privacy", "BatchNorm2d")
    assert not (tmp_path / "m.json").exists()


@pytest.mark.parametrize("bad", [{"epsilon": 0}, {"epsilon": -1}, {"epsilon": float("inf")},
                                 {"epsilon": 1, "delta": 0}, {"epsilon": 1, "delta": 1},
                                 {"epsilon": 1, "max_grad_norm": 0}])
def test_dp_settings_are_checked(bad):
    with pytest.raises(BadRequest):
        DPSettings(**bad)


def test_delta_must_stay_below_one_over_n():
    data = small_digits(members=50, size=8)
    with pytest.raises(BadRequest, match="too large for 50 training images"):
        train_architecture("vgg", data, epochs=1, privacy=DPSettings(1.0, 0.05, noise_seed=0))


def test_dp_settings_are_part_of_the_cache_key():
    plain = TrainSettings(arch="vgg")
    private = TrainSettings(arch="vgg", dp_epsilon=3.0)
    assert len({plain.cache_key(), private.cache_key(), TrainSettings(arch="vgg", dp_epsilon=8.0).cache_key(),
                TrainSettings(arch="vgg", dp_epsilon=3.0, dp_delta=1e-6).cache_key(),
                TrainSettings(arch="vgg", dp_epsilon=3.0, max_grad_norm=2.0).cache_key()}) == 5
    # without DP the DP-only settings mean nothing, and change nothing
    assert TrainSettings(arch="vgg", dp_delta=1e-6).cache_key() == plain.cache_key()
    assert private.resolved().epochs == 30 and plain.resolved().epochs is None
    assert private.privacy() == DPSettings(3.0) and plain.privacy() is None


def test_owner_train_with_dp_prints_and_saves_the_card(tmp_path):
    saved = tmp_path / "vgg-dp.json"
    result = run("owner", "train", "--arch", "vgg", "--size", "8", "--epochs", "2", "--dp-epsilon", "8",
                 "--save-model", str(saved), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output.splitlines()[-1])
    card = TrainingPrivacy.declared(report["privacy"])
    assert card.dp and card.epsilon <= 8 and card.delta == 1e-5
    model = load_integer_model(saved)
    assert model.privacy == card and model.to_spec()["privacy"] == report["privacy"]


# -- the card in the spec ------------------------------------------------------------------------------

def carded(model: IntegerModel, card: TrainingPrivacy = CARD) -> IntegerModel:
    return dataclasses.replace(model, meta={**model.meta, "privacy": card.to_json()})


def test_the_card_survives_spec_and_file_round_trips(tmp_path):
    model = carded(tiny_model())
    spec = model.to_spec()
    assert spec["privacy"] == {"dp": True, "mechanism": "DP-SGD", "epsilon": 2.5, "delta": 1e-5}
    assert IntegerModel.from_spec(spec).privacy == CARD and model.public().privacy == CARD
    save_integer_model(model, tmp_path / "m.json")
    assert load_integer_model(tmp_path / "m.json").privacy == CARD
    assert tiny_model().to_spec()["privacy"] == {"dp": False}
    del spec["privacy"]  # specs stored before the card existed declare no DP
    assert not IntegerModel.from_spec(spec).privacy.dp


@pytest.mark.parametrize("card", [None, [], "dp", {"dp": "yes"}, {"dp": True, "epsilon": 1.0},
                                  {"dp": True, "epsilon": -1.0, "delta": 1e-5},
                                  {"dp": True, "epsilon": 1.0, "delta": 1.5},
                                  {"dp": True, "epsilon": True, "delta": 1e-5},
                                  {"dp": True, "epsilon": 1e9, "delta": 0.0},
                                  {"dp": False, "epsilon": 1.0}, {"dp": True, "epsilon": 1.0, "delta": 0.0, "x": 1},
                                  {"dp": True, "mechanism": "PATE", "epsilon": 1.0, "delta": 0.0}])
def test_a_bad_card_is_refused(card, tmp_path):
    spec = tiny_model().to_spec()
    spec["privacy"] = card
    with pytest.raises(BadRequest):
        IntegerModel.from_spec(spec)
    save_integer_model(carded(tiny_model()), tmp_path / "m.json")
    document = json.loads((tmp_path / "m.json").read_text())
    document["meta"]["privacy"] = "null" if card is None else card
    (tmp_path / "m.json").write_text(json.dumps(document))
    with pytest.raises(BadRequest, match="privacy"):
        load_integer_model(tmp_path / "m.json")


# -- over HTTP -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def s1_client(keys1024, tmp_path_factory):
    """S1's test client, its S2 (an in-process key cloud) served by waitress in a thread."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("HECNN_RANDOMNESS_POOL", "0")  # idle apps must not fill pools on the test's cores
        s2 = s2_app.create_app(S2Config(data_dir=tmp_path_factory.mktemp("s2"), cloud_token=CLOUD_TOKEN,
                                        key_bits=1024), key_cloud=KeyCloud.create(keys1024))
        server = start_server(s2)
        yield make_s1(tmp_path_factory.mktemp("s1"), f"http://127.0.0.1:{server.socket.getsockname()[1]}").test_client()
        server.close()


def test_the_model_card_shows_epsilon_and_delta_over_http(s1_client, keys1024):
    ids = {}
    for name, model in (("dp", carded(tiny_model())), ("plain", tiny_model())):
        body = encrypt_model(model, keys1024.public).serialize()
        response = s1_client.post("/v1/models", data=body, headers=AUTH_OWNER, content_type=WIRE)
        assert response.status_code == 201, response.data
        ids[name] = response.get_json()["model_id"]
    card = s1_client.get(f"/v1/models/{ids['dp']}").get_json()["spec"]["privacy"]
    assert card == {"dp": True, "mechanism": "DP-SGD", "epsilon": 2.5, "delta": 1e-5}
    assert s1_client.get(f"/v1/models/{ids['plain']}").get_json()["spec"]["privacy"] == {"dp": False}
    listed = {m["model_id"]: m["privacy"] for m in s1_client.get("/v1/models").get_json()["models"]}
    assert listed[ids["dp"]] == card and listed[ids["plain"]] == {"dp": False}


def test_an_upload_with_a_bad_card_is_refused(s1_client, keys1024):
    model = carded(tiny_model())
    encrypted = encrypt_model(model, keys1024.public)
    encrypted.spec["privacy"] = {"dp": True, "epsilon": -3.0, "delta": 1e-5}
    response = s1_client.post("/v1/models", data=encrypted.serialize(), headers=AUTH_OWNER, content_type=WIRE)
    assert response.status_code == 400 and "epsilon" in response.get_json()["message"]


def test_without_a_noise_seed_the_private_randomness_is_secret():
    """Without ``noise_seed`` the private randomness comes from a secret seed: two runs differ."""
    data = small_digits(members=600, size=8)
    runs = [train_architecture("vgg", data, seed=0, epochs=1, privacy=DPSettings(8.0, 1e-3)) for _ in range(2)]
    weights = [np.concatenate([p.detach().numpy().ravel() for p in r.model.parameters()]) for r in runs]
    assert not np.array_equal(*weights)


# -- end to end ----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_dp_model_through_real_clouds_shows_its_card_and_answers_exactly(tmp_path):
    """The owner trains the ICNN with DP-SGD and uploads it with the CLI to S1 and S2 running as
    processes (1024-bit key); the card reaches users over real HTTP, and a user's decrypted vector equals
    the integer reference (DP changes the weights, not the secure protocol)."""
    import requests

    from test_e2e import Clouds, he_cnn, query_and_check, upload

    saved = tmp_path / "icnn-dp.json"
    report = json.loads(he_cnn("owner", "train", "--epochs", "2", "--dp-epsilon", "8", "--save-model", str(saved),
                               "--json"))
    card = TrainingPrivacy.declared(report["privacy"])
    assert card.dp and 0 < card.epsilon <= 8
    image = tmp_path / "digit.npy"
    np.save(image, load_dataset("digits", size=16, seed=0).x_test[0][0])
    clouds = Clouds(tmp_path / "clouds", 1024)
    try:
        model_id = upload(clouds, saved)
        shown = requests.get(f"{clouds.s1_url}/v1/models/{model_id}", timeout=10).json()
        assert TrainingPrivacy.declared(shown["spec"]["privacy"]) == card
        key = tmp_path / "me.key"
        he_cnn("user", "keygen", "--out", str(key), "--bits", "1024")
        query_and_check(clouds, model_id, key, image, saved)
    finally:
        clouds.stop()
