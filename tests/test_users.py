"""Users and quotas: S1's user API keys (stored hashed), 401 without a valid one, 429 beyond a key's
limits, revocation at once, the open mode, and the ``he-cnn admin user`` commands. Fast: Flask test
clients on an S1 whose S2 is a closed port (auth and quotas come before any protocol work)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from he_cnn.errors import HECNNError, ServiceBusy
from he_cnn.graph.reference import classify_reference
from he_cnn.parties.compute_cloud import encrypt_model
from he_cnn.parties.key_cloud import KeyCloud
from he_cnn.servers import s1 as s1_app
from he_cnn.servers import s2 as s2_app
from he_cnn.servers.cli import main
from he_cnn.servers.config import S1Config, S2Config
from he_cnn.servers.users import USERS_FILE, KeyQuotas, User, UserStore
from he_cnn.user.client import Client
from he_cnn.transport.http_channel import WIRE_CONTENT_TYPE
from he_cnn.user.keys import create_user_key
from test_service_errors import start_server
from trust_support import random_image, tiny_model

# the apps here are never shut down: randomness pools filled in their daemon threads would slow every later test
pytestmark = pytest.mark.usefixtures("no_pool_filling")

OWNER_TOKEN = "o" * 24
CLOUD_TOKEN = "c" * 24
OWNER = {"Authorization": f"Bearer {OWNER_TOKEN}"}
DEAD_S2 = "http://127.0.0.1:9"




def make_s1(data_dir, require_user_keys=True, peer_url=DEAD_S2):
    config = S1Config(data_dir=data_dir, peer_url=peer_url, owner_token=OWNER_TOKEN, cloud_token=CLOUD_TOKEN,
                      precompute=False, peer_timeout=1.0, require_user_keys=require_user_keys)
    return s1_app.create_app(config).test_client()


def classify(client, key=None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return client.post("/v1/models/nope/classify", data=b"x", headers=headers, content_type=WIRE_CONTENT_TYPE)


def add_user(client, name, **limits):
    response = client.post("/v1/users", json={"name": name, **limits}, headers=OWNER)
    assert response.status_code == 201, response.data
    return response.get_json()["key"]


@pytest.fixture
def s1(tmp_path):
    return make_s1(tmp_path / "s1")


def test_no_key_and_unknown_key_get_401(s1):
    for key in (None, "hecnn_not-a-key"):
        response = classify(s1, key)
        assert response.status_code == 401
        assert response.get_json()["error"] == "unauthorized"


def test_a_valid_key_passes_auth(s1):
    key = add_user(s1, "alice")
    assert classify(s1, key).status_code == 404  # past auth and quota: the model is unknown


def test_exceeding_the_rate_gets_429_with_retry_after(s1):
    key = add_user(s1, "bob", rate_per_minute=2)
    assert [classify(s1, key).status_code for _ in range(2)] == [404, 404]
    response = classify(s1, key)
    assert response.status_code == 429
    assert response.get_json()["error"] == "service_busy"
    assert 1 <= int(response.headers["Retry-After"]) <= 30
    other = add_user(s1, "carol")
    assert classify(s1, other).status_code == 404  # a key's quota is its own


def test_revocation_holds_at_once_by_endpoint_and_by_data_dir(tmp_path):
    s1 = make_s1(tmp_path / "s1")
    key = add_user(s1, "dave")
    assert classify(s1, key).status_code == 404
    assert s1.delete("/v1/users/dave", headers=OWNER).status_code == 200
    assert classify(s1, key).status_code == 401
    key = add_user(s1, "erin")
    UserStore(tmp_path / "s1").revoke("erin")  # another process, on the data directory
    assert classify(s1, key).status_code == 401
    assert s1.delete("/v1/users/erin", headers=OWNER).status_code == 404


def test_users_endpoints_need_the_owner_token_and_never_show_keys(s1, tmp_path):
    assert s1.get("/v1/users").status_code == 401
    assert s1.post("/v1/users", json={"name": "x"}, headers={"Authorization": "Bearer " + "w" * 24}).status_code == 401
    key = add_user(s1, "frank")
    listing = s1.get("/v1/users", headers=OWNER)
    assert [u["name"] for u in listing.get_json()["users"]] == ["frank"]
    assert key not in listing.get_data(as_text=True)
    assert s1.post("/v1/users", json={"name": "frank"}, headers=OWNER).status_code == 400
    assert s1.post("/v1/users", json={"name": "../x"}, headers=OWNER).status_code == 400
    assert s1.post("/v1/users", data=b"[" * 5000, headers=OWNER).status_code == 400


def test_keys_are_stored_hashed(tmp_path):
    store = UserStore(tmp_path)
    _, key = store.add("grace")
    stored = (tmp_path / USERS_FILE).read_text()
    assert key not in stored and key[6:] not in stored
    assert store.find(key).name == "grace" and store.find(key + "x") is None


def test_open_mode_needs_no_key(tmp_path):
    s1 = make_s1(tmp_path / "s1", require_user_keys=False)
    assert classify(s1).status_code == 404


def test_concurrent_limit():
    user = User("h", "0" * 64, 100, 1, 0.0)
    quotas = KeyQuotas(clock=lambda: 0.0)
    with quotas.admit(user):
        with pytest.raises(ServiceBusy, match="at once"):
            with quotas.admit(user):
                pass
    with quotas.admit(user):
        pass


def test_admin_cli_add_list_revoke(tmp_path):
    runner = CliRunner()
    data = ["--data-dir", str(tmp_path)]
    result = runner.invoke(main, ["admin", "user", "add", "ivan", "--rate", "5/min", "--concurrent", "2", *data])
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ivan: 5/min, 2 at once")
    key = lines[0].rsplit(" ", 1)[1]
    assert UserStore(tmp_path).find(key).rate_per_minute == 5
    result = runner.invoke(main, ["admin", "user", "list", *data])
    assert result.exit_code == 0 and result.stdout.strip().splitlines()[0].startswith("ivan: 5/min")
    result = runner.invoke(main, ["admin", "user", "revoke", "ivan", *data])
    assert (result.exit_code, result.stdout.strip()) == (0, "ivan: key revoked")
    for args in (["revoke", "ivan"], ["add", "bad name"], ["list", "--data-dir", str(tmp_path / "none")]):
        result = runner.invoke(main, ["admin", "user", *args, *data][:len(args) + 2 + 2 * (args[0] != "list")])
        assert result.exit_code == 1 and len(result.stderr.strip().splitlines()) == 1, result.output
    result = runner.invoke(main, ["admin", "user", "add", "x", "--rate", "fast", *data])  # a usage error
    assert result.exit_code == 2 and result.stderr.strip().splitlines()[-1].startswith("Error: Invalid value")
    assert json.loads((tmp_path / USERS_FILE).read_text()) == {"users": {}}


def test_the_client_sends_its_api_key_end_to_end(tmp_path, keys1024, monkeypatch):
    """A real query through S1 (keys required) and S2, both served by waitress in threads, 1024 bits."""
    s2 = start_server(s2_app.create_app(S2Config(data_dir=tmp_path / "s2", cloud_token=CLOUD_TOKEN, key_bits=1024),
                                        key_cloud=KeyCloud.create(keys1024)))
    app = s1_app.create_app(S1Config(data_dir=tmp_path / "s1", peer_url=f"http://127.0.0.1:{s2.socket.getsockname()[1]}",
                                     owner_token=OWNER_TOKEN, cloud_token=CLOUD_TOKEN, precompute=False,
                                     require_user_keys=True))
    s1 = start_server(app)
    try:
        url = f"http://127.0.0.1:{s1.socket.getsockname()[1]}"
        model = tiny_model()
        upload = app.test_client().post("/v1/models", data=encrypt_model(model, keys1024.public).serialize(),
                                        headers=OWNER, content_type=WIRE_CONTENT_TYPE)
        assert upload.status_code == 201, upload.data
        key = add_user(app.test_client(), "judy")
        create_user_key(tmp_path / "me.key", 1024)
        image = tmp_path / "a.npy"
        np.save(image, np.array(random_image(1)[0], dtype=np.int64))
        monkeypatch.delenv("HECNN_API_KEY", raising=False)
        with pytest.raises(HECNNError, match="API key"):
            Client(url, tmp_path / "me.key").classify(image)
        monkeypatch.setenv("HECNN_API_KEY", key)
        result = Client(url, tmp_path / "me.key").classify(image)[0]
        assert result.vector == [int(v) for v in classify_reference(model, result.pixels)]
        runner, env = CliRunner(), {"HECNN_OWNER_TOKEN": OWNER_TOKEN}
        listed = runner.invoke(main, ["admin", "user", "list", "--s1", url], env=env)
        assert listed.exit_code == 0 and listed.stdout.startswith("judy: 30/min") and key not in listed.stdout
        revoked = runner.invoke(main, ["admin", "user", "revoke", "judy", "--s1", url], env=env)
        assert (revoked.exit_code, revoked.stdout.strip()) == (0, "judy: key revoked")
        with pytest.raises(HECNNError, match="revoked"):  # at once, for the running S1
            Client(url, tmp_path / "me.key").classify(image)
        wrong = runner.invoke(main, ["admin", "user", "list", "--s1", url], env={"HECNN_OWNER_TOKEN": "w" * 24})
        assert wrong.exit_code == 1 and len(wrong.stderr.strip().splitlines()) == 1
    finally:
        s1.close()
        s2.close()
