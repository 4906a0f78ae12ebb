"""Every error path of the two Flask apps, through ``app.test_client()``: status, JSON body, and the
server still healthy afterwards. S2 runs under waitress in a thread (S1 reaches it over real HTTP);
the model is a tiny hand-made integer network so a full classification takes about a second.
"""
from __future__ import annotations

import json
import os
import socket
import stat
import threading
from pathlib import Path

import numpy as np
import pytest
from waitress.server import create_server

from he_cnn.errors import BadRequest
from he_cnn.graph.integer_model import IntegerModel, infer_shapes_and_bounds
from he_cnn.graph.layers import Conv, Dense, Flatten, MaxPool, ReLU
from he_cnn.transport.http_channel import HTTPChannel, parse_public_key, public_key_message
from he_cnn.crypto.paillier import generate_keypair
from he_cnn.graph.reference import classify_reference
from he_cnn.parties.key_cloud import KeyCloud
from he_cnn.parties.compute_cloud import encrypt_model
from he_cnn.crypto.tensor import EncryptedTensor
from he_cnn.wire import Message, decode, encode
from he_cnn.servers import s1 as s1_app
from he_cnn.servers import s2 as s2_app
from he_cnn.servers.config import S1Config, S2Config
from he_cnn.servers.storage import DataDirError

# the apps here are never shut down: randomness pools filled in their daemon threads would slow every later test
pytestmark = pytest.mark.usefixtures("no_pool_filling")

CLOUD_TOKEN = "cloud-token-" + "c" * 20
OWNER_TOKEN = "owner-token-" + "o" * 20
AUTH_OWNER = {"Authorization": f"Bearer {OWNER_TOKEN}"}
AUTH_CLOUD = {"Authorization": f"Bearer {CLOUD_TOKEN}"}
WIRE = "application/octet-stream"


def ints(values, shape):
    return np.array([int(v) for v in values], dtype=object).reshape(shape)


def tiny_model() -> IntegerModel:
    """conv 3x3 (2 channels) -> max-pool 2 -> ReLU -> flatten -> dense 3, on a 1x6x6 input in 0..15."""
    rng = np.random.default_rng(3)
    layers = (
        Conv("conv", "input", "conv", ints(rng.integers(-31, 32, 18), (2, 1, 3, 3)), ints([5, -7], (2,)), 1, 1),
        MaxPool("pool", "conv", "pool", 2, 2),
        ReLU("relu", "pool", "relu"),
        Flatten("flat", "relu", "flat"),
        Dense("fc", "flat", "fc", ints(rng.integers(-31, 32, 54), (3, 18)), ints([1, 2, 3], (3,))),
    )
    shapes, bounds = infer_shapes_and_bounds(layers, "input", (1, 6, 6), 15)
    return IntegerModel(layers, (1, 6, 6), 15, "input", "fc", 3, shapes, bounds, {"classes": ["a", "b", "c"]})


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def start_server(app):
    """A waitress server for ``app`` on a free local port, running in a daemon thread."""
    server = create_server(app, host="127.0.0.1", port=0, threads=2)

    def run() -> None:
        try:
            server.run()
        except (OSError, ValueError):  # close() from the test thread pulled the sockets out of its select
            pass

    threading.Thread(target=run, daemon=True).start()
    return server


def serve_in_thread(app) -> str:
    """Serve ``app`` over real HTTP with waitress in a daemon thread; its base URL."""
    return f"http://127.0.0.1:{start_server(app).socket.getsockname()[1]}"


def error_of(response, status: int, code: str | None = None) -> str:
    assert response.status_code == status, response.data[:300]
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert set(body) == {"error", "message"}
    assert "Traceback" not in body["message"] and "\n" not in body["message"]
    if code is not None:
        assert body["error"] == code, body
    return body["message"]


def healthy(client) -> None:
    response = client.get("/v1/health")
    assert response.status_code == 200 and response.get_json()["status"] == "ok"


# -- fixtures -------------------------------------------------------------------------------------



@pytest.fixture(scope="module")
def cloud(keys1024) -> KeyCloud:
    return KeyCloud.create(keys1024)


@pytest.fixture(scope="module")
def s2_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("s2")


@pytest.fixture(scope="module")
def s2_app_(cloud, s2_dir):
    return s2_app.create_app(S2Config(data_dir=s2_dir, cloud_token=CLOUD_TOKEN, key_bits=1024), key_cloud=cloud)


@pytest.fixture(scope="module")
def s2_url(s2_app_):
    """S2 served over real HTTP by waitress in a thread, for S1 to talk to."""
    server = start_server(s2_app_)
    yield f"http://127.0.0.1:{server.socket.getsockname()[1]}"
    server.close()


@pytest.fixture(scope="module")
def s1_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("s1")


def make_s1(data_dir: Path, peer_url: str, cloud_token: str = CLOUD_TOKEN, max_body: int = 8 << 20):
    config = S1Config(require_user_keys=False, data_dir=data_dir, peer_url=peer_url, owner_token=OWNER_TOKEN, cloud_token=cloud_token,
                      max_body_bytes=max_body, peer_timeout=10.0)
    return s1_app.create_app(config)


@pytest.fixture(scope="module")
def s1(s1_dir, s2_url):
    return make_s1(s1_dir, s2_url).test_client()


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def model_id(s1, model, keys1024) -> str:
    body = encrypt_model(model, keys1024.public).serialize()
    response = s1.post("/v1/models", data=body, headers=AUTH_OWNER, content_type=WIRE)
    assert response.status_code == 201, response.data
    info = response.get_json()
    assert info["input_shape"] == [1, 6, 6] and info["classes"] == ["a", "b", "c"]
    return info["model_id"]


def query_body(keys, user_keys, pixels=None, shape=(1, 6, 6)) -> bytes:
    pixels = np.zeros(shape, dtype=object) if pixels is None else pixels
    msg = Message()
    msg.arrays["user_n"] = np.array([user_keys.public.n], dtype=object)
    msg.arrays["image"] = EncryptedTensor.encrypt(keys.public, pixels).data
    msg.widths["image"] = keys.public.ciphertext_bytes
    return encode(msg)


# -- S2 -------------------------------------------------------------------------------------------

@pytest.fixture
def s2(s2_app_):
    return s2_app_.test_client()


def test_s2_public_key_round_trips(s2, cloud):
    response = s2.get("/v1/public-key")
    assert response.status_code == 200 and response.mimetype == WIRE
    key = parse_public_key(response.data)
    assert key.paillier == cloud.keys.public and key.dgk.n == cloud.dgk_public.n
    assert key.key_id == cloud.keys.public.key_id


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-token-of-some-length"},
                                     {"Authorization": f"Basic {CLOUD_TOKEN}"}, {"Authorization": "Bearer"}])
def test_s2_rounds_need_the_cloud_token(s2, headers):
    response = s2.post("/v1/rounds/smp", data=b"HECN", headers=headers, content_type=WIRE)
    message = error_of(response, 401, "unauthorized")
    assert CLOUD_TOKEN not in message and response.headers["WWW-Authenticate"] == "Bearer"
    healthy(s2)


@pytest.mark.parametrize("body, code", [(b"", "bad_request"), (b"garbage", "wire_format"),
                                        (b"HECN\x00\x09\x00\x00\x00\x02{}", "wire_format"),
                                        (encode(Message(meta={"x": 1})), "wire_format")])
def test_s2_malformed_round(s2, body, code):
    error_of(s2.post("/v1/rounds/smp", data=body, headers=AUTH_CLOUD, content_type=WIRE), 400, code)
    healthy(s2)


def test_s2_unknown_step_and_route(s2):
    msg = error_of(s2.post("/v1/rounds/no_such_step", data=encode(Message()), headers=AUTH_CLOUD), 400, "bad_request")
    assert "no_such_step" in msg
    error_of(s2.get("/v1/nowhere"), 404, "not_found")
    error_of(s2.get("/v1/rounds/smp"), 405, "method_not_allowed")
    healthy(s2)


def test_s2_unknown_setup_is_named(s2):
    body = encode(Message(meta={"setup_id": "f" * 32, "layer": "conv"}))
    error_of(s2.post("/v1/rounds/linear", data=body, headers=AUTH_CLOUD, content_type=WIRE), 400, "unknown_setup")
    healthy(s2)


def test_s2_oversized_body(cloud, tmp_path):
    same_keys = KeyCloud(cloud.keys, cloud.dgk_public, cloud.dgk_private)
    app = s2_app.create_app(S2Config(data_dir=tmp_path, cloud_token=CLOUD_TOKEN, key_bits=1024,
                                     max_body_bytes=4096), key_cloud=same_keys)
    client = app.test_client()
    error_of(client.post("/v1/rounds/smp", data=b"x" * 5000, headers=AUTH_CLOUD, content_type=WIRE),
             413, "body_too_large")
    healthy(client)


def test_s2_keys_persist_private_and_reload(tmp_path):
    config = S2Config(data_dir=tmp_path, cloud_token=CLOUD_TOKEN, key_bits=1024)
    first = s2_app.create_app(config).test_client().get("/v1/public-key").data
    key_file = tmp_path / s2_app.KEY_FILE
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(tmp_path.stat().st_mode) & 0o077 == 0
    assert s2_app.create_app(config).test_client().get("/v1/public-key").data == first
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary files left


@pytest.mark.parametrize("content", [b"{not json", b'{"format": "he-cnn-s2-keys", "version": 1}',
                                     b'{"format": "other"}'])
def test_s2_refuses_a_corrupt_key_file(tmp_path, content):
    config = S2Config(data_dir=tmp_path, cloud_token=CLOUD_TOKEN, key_bits=1024)
    s2_app.create_app(config)
    (tmp_path / s2_app.KEY_FILE).write_bytes(content)
    with pytest.raises(DataDirError, match="key file"):
        s2_app.create_app(config)


def test_s2_tampered_key_is_detected(tmp_path):
    config = S2Config(data_dir=tmp_path, cloud_token=CLOUD_TOKEN, key_bits=1024)
    s2_app.create_app(config)
    path = tmp_path / s2_app.KEY_FILE
    doc = json.loads(path.read_text())
    doc["paillier"]["q"] += 2
    path.write_text(json.dumps(doc))
    with pytest.raises(DataDirError, match="corrupt"):
        s2_app.create_app(config)


def test_config_refuses_short_tokens(tmp_path):
    with pytest.raises(BadRequest, match="at least"):
        s2_app.create_app(S2Config(data_dir=tmp_path, cloud_token="short", key_bits=1024))


# -- S1: upload -----------------------------------------------------------------------------------

def test_upload_needs_the_owner_token(s1, model, keys1024):
    body = encode(Message())
    error_of(s1.post("/v1/models", data=body, content_type=WIRE), 401, "unauthorized")
    error_of(s1.post("/v1/models", data=body, headers={"Authorization": "Bearer " + "x" * 32}), 401)
    error_of(s1.post("/v1/models", data=body, headers=AUTH_CLOUD), 401)  # the cloud token is not the owner's
    healthy(s1)


@pytest.mark.parametrize("body, code", [(b"", "bad_request"), (b"\x00" * 100, "wire_format"),
                                        (encode(Message(meta={"key_id": "0" * 16})), "key_mismatch")])
def test_upload_malformed(s1, body, code):
    error_of(s1.post("/v1/models", data=body, headers=AUTH_OWNER, content_type=WIRE), 400, code)
    healthy(s1)


def test_upload_under_another_key(s1, model):
    other = generate_keypair(1024)
    body = encrypt_model(model, other.public).serialize()
    assert "expected" in error_of(s1.post("/v1/models", data=body, headers=AUTH_OWNER), 400, "key_mismatch")
    healthy(s1)


def test_upload_with_a_broken_spec(s1, model, keys1024):
    encrypted = encrypt_model(model, keys1024.public)
    encrypted.spec["shapes"]["fc"] = [4]
    error_of(s1.post("/v1/models", data=encrypted.serialize(), headers=AUTH_OWNER), 400)
    encrypted = encrypt_model(model, keys1024.public)
    encrypted.linear["fc"].weight.data.reshape(-1)[0] = 0  # not a valid ciphertext
    error_of(s1.post("/v1/models", data=encrypted.serialize(), headers=AUTH_OWNER), 400, "invalid_ciphertext")
    healthy(s1)


def test_upload_oversized(s1_dir, s2_url):
    client = make_s1(s1_dir.parent / "small", s2_url, max_body=2048).test_client()
    message = error_of(client.post("/v1/models", data=b"x" * 4096, headers=AUTH_OWNER), 413, "body_too_large")
    assert "2048" in message
    healthy(client)


# -- S1: models and classification ----------------------------------------------------------------

def test_models_are_listed_and_described(s1, model_id):
    listed = s1.get("/v1/models").get_json()["models"]
    assert model_id in [m["model_id"] for m in listed]
    described = s1.get(f"/v1/models/{model_id}").get_json()
    spec = described["spec"]
    assert spec["input_shape"] == [1, 6, 6] and spec["classes"] == ["a", "b", "c"]
    assert all("weight" not in layer and "bias" not in layer for layer in spec["layers"])  # architecture only


@pytest.mark.parametrize("path", ["/v1/models/0123456789abcdef", "/v1/models/../../etc", "/v1/models/x" * 3])
def test_unknown_model(s1, path, keys1024, user_keys):
    error_of(s1.get(path), 404)
    error_of(s1.post(path + "/classify", data=query_body(keys1024, user_keys), content_type=WIRE), 404)
    healthy(s1)


def test_classify_matches_the_reference(s1, model_id, model, keys1024, user_keys):
    pixels = ints(np.random.default_rng(5).integers(0, 16, 36), (1, 6, 6))
    response = s1.post(f"/v1/models/{model_id}/classify", data=query_body(keys1024, user_keys, pixels),
                       content_type=WIRE)
    assert response.status_code == 200 and response.mimetype == WIRE
    reply = decode(response.data)
    vector = EncryptedTensor.from_ciphertexts(user_keys.public, reply.array("class_vector"), (3,))
    assert list(vector.decrypt(user_keys.private)) == list(classify_reference(model, pixels))
    assert reply.meta["model_id"] == model_id and reply.meta["rounds"] > 0
    assert {layer["name"] for layer in reply.meta["layers"]} >= {"conv", "pool", "relu", "fc"}


def test_classify_malformed(s1, model_id):
    url = f"/v1/models/{model_id}/classify"
    error_of(s1.post(url, data=b"", content_type=WIRE), 400, "bad_request")
    error_of(s1.post(url, data=b"HECN" + b"\xff" * 20, content_type=WIRE), 400, "wire_format")
    error_of(s1.post(url, data=encode(Message()), content_type=WIRE), 400, "wire_format")
    healthy(s1)


def test_classify_wrong_image_size(s1, model_id, keys1024, user_keys):
    body = query_body(keys1024, user_keys, shape=(1, 5, 5))
    assert "(1, 6, 6)" in error_of(s1.post(f"/v1/models/{model_id}/classify", data=body), 400, "shape_error")
    healthy(s1)


@pytest.mark.parametrize("bad", ["zero", "too_big", "not_unit", "signed"])
def test_classify_invalid_ciphertext(s1, model_id, keys1024, user_keys, bad):
    msg = decode(query_body(keys1024, user_keys))
    image = msg.arrays["image"].reshape(-1)
    if bad == "zero":
        image[3] = 0
    elif bad == "too_big":
        image[3] = keys1024.public.nsq + 1
        msg.widths["image"] += 1
    elif bad == "not_unit":
        image[3] = keys1024.public.n
    else:  # plaintext pixels sent as signed integers, not ciphertexts
        msg.arrays["image"] = np.zeros((1, 6, 6), dtype=object)
        del msg.widths["image"]
    code = "bad_request" if bad == "signed" else "invalid_ciphertext"
    error_of(s1.post(f"/v1/models/{model_id}/classify", data=encode(msg)), 400, code)
    healthy(s1)


def test_classify_bad_user_key(s1, model_id, keys1024):
    small = generate_keypair(512, allow_small=True)
    assert "512 bits" in error_of(s1.post(f"/v1/models/{model_id}/classify", data=query_body(keys1024, small)),
                                  400, "bad_request")
    error_of(s1.post(f"/v1/models/{model_id}/classify", data=query_body(keys1024, keys1024)), 400, "key_mismatch")
    healthy(s1)


def test_classify_oversized(s1_dir, s2_url, model_id, keys1024, user_keys):
    client = make_s1(s1_dir, s2_url, max_body=4096).test_client()  # same data dir: the model is loaded
    error_of(client.post(f"/v1/models/{model_id}/classify", data=query_body(keys1024, user_keys)), 413)
    healthy(client)


# -- S1 without S2 ----------------------------------------------------------------------------------

def test_s2_unreachable_before_the_key_is_known(tmp_path):
    client = make_s1(tmp_path, closed_port_url()).test_client()
    health = client.get("/v1/health").get_json()
    assert health["status"] == "ok" and health["s2"]["reachable"] is False
    assert "unreachable" in error_of(client.get("/v1/public-key"), 503, "peer_unavailable")
    error_of(client.post("/v1/models", data=encode(Message()), headers=AUTH_OWNER), 503, "peer_unavailable")
    healthy(client)


def test_s2_unreachable_during_a_query(s1_dir, model_id, keys1024, user_keys):
    client = make_s1(s1_dir, closed_port_url()).test_client()  # models and the pinned key come from disk
    assert client.get("/v1/public-key").status_code == 200
    message = error_of(client.post(f"/v1/models/{model_id}/classify", data=query_body(keys1024, user_keys)),
                       503, "peer_unavailable")
    assert "S2 at http://127.0.0.1:" in message and "unreachable" in message
    healthy(client)


def test_s2_refusing_is_a_bad_gateway(s1_dir, s2_url, model_id, keys1024, user_keys):
    client = make_s1(s1_dir, s2_url, cloud_token="wrong-cloud-token-" + "w" * 10).test_client()
    message = error_of(client.post(f"/v1/models/{model_id}/classify", data=query_body(keys1024, user_keys)),
                       502, "peer_error")
    assert "S2" in message and "wrong-cloud-token" not in message
    healthy(client)


# -- persistence -------------------------------------------------------------------------------------

def test_restart_of_s1_reloads_models(s1_dir, s2_url, model_id, model, keys1024, user_keys):
    client = make_s1(s1_dir, s2_url).test_client()
    assert model_id in [m["model_id"] for m in client.get("/v1/models").get_json()["models"]]
    pixels = ints(range(36), (1, 6, 6)) % 16
    reply = decode(client.post(f"/v1/models/{model_id}/classify", data=query_body(keys1024, user_keys, pixels)).data)
    vector = EncryptedTensor.from_ciphertexts(user_keys.public, reply.array("class_vector"), (3,))
    assert list(vector.decrypt(user_keys.private)) == list(classify_reference(model, pixels))


def test_s2_losing_its_setups_is_repaired(s1, s2_dir, cloud, model_id, model, keys1024, user_keys):
    cloud.setups.clear()
    for path in (s2_dir / s2_app.SETUP_DIR).iterdir():
        path.unlink()
    pixels = ints(np.full(36, 7), (1, 6, 6))
    response = s1.post(f"/v1/models/{model_id}/classify", data=query_body(keys1024, user_keys, pixels))
    assert response.status_code == 200, response.data
    vector = EncryptedTensor.from_ciphertexts(user_keys.public, decode(response.data).array("class_vector"), (3,))
    assert list(vector.decrypt(user_keys.private)) == list(classify_reference(model, pixels))
    assert len(list((s2_dir / s2_app.SETUP_DIR).iterdir())) == 1  # the new set-up is persisted again


def test_restart_of_s2_reloads_setups(s1_dir, s2_dir, model_id, model, cloud, keys1024, user_keys):
    fresh = KeyCloud(cloud.keys, cloud.dgk_public, cloud.dgk_private)
    restarted = s2_app.create_app(S2Config(data_dir=s2_dir, cloud_token=CLOUD_TOKEN, key_bits=1024), key_cloud=fresh)
    assert set(fresh.setups) == set(cloud.setups) and fresh.setups
    client = make_s1(s1_dir, serve_in_thread(restarted)).test_client()
    pixels = ints(np.full(36, 3), (1, 6, 6))
    response = client.post(f"/v1/models/{model_id}/classify", data=query_body(keys1024, user_keys, pixels))
    vector = EncryptedTensor.from_ciphertexts(user_keys.public, decode(response.data).array("class_vector"), (3,))
    assert list(vector.decrypt(user_keys.private)) == list(classify_reference(model, pixels))
    assert len(fresh.setups) == len(cloud.setups)  # the stored set-up was used, not run again


def test_interrupted_upload_is_never_served(s1_dir, s2_url, model_id):
    partial = s1_dir / "models" / ".upload-0000000000000000"
    partial.mkdir()
    (partial / "model.hecn").write_bytes(b"half")
    client = make_s1(s1_dir, s2_url).test_client()
    assert [m["model_id"] for m in client.get("/v1/models").get_json()["models"]] == [model_id]
    assert not partial.exists()


def test_corrupt_stored_model_stops_the_start(tmp_path, s1_dir, s2_url, model_id):
    import shutil

    copy = tmp_path / "s1"
    shutil.copytree(s1_dir, copy)
    (copy / "models" / model_id / "setup.hecn").write_bytes(b"HECN broken")
    with pytest.raises(DataDirError, match=model_id):
        make_s1(copy, s2_url)


def test_http_channel_maps_s2_errors(s2_url):
    channel = HTTPChannel(s2_url, CLOUD_TOKEN, timeout=5)
    with pytest.raises(Exception) as info:
        channel.request("linear", Message(meta={"setup_id": "e" * 32, "layer": "x"}))
    assert info.value.code == "unknown_setup" and info.value.peer_code == "unknown_setup"
    assert info.value.peer_status == 400
    assert "HTTPChannel" in repr(channel) and CLOUD_TOKEN not in repr(channel)


def test_public_key_message_checks_its_id(cloud):
    data = public_key_message(cloud.keys.public, cloud.dgk_public)
    msg = decode(data)
    msg.meta["key_id"] = "0" * 16
    with pytest.raises(Exception, match="claims id"):
        parse_public_key(encode(msg))


def test_no_secret_in_s1_data_dir(s1_dir, keys1024):
    secret = [str(keys1024.private.p), str(keys1024.private.q)]
    for path in s1_dir.rglob("*"):
        if path.is_file():
            text = path.read_bytes()
            assert not any(s.encode() in text for s in secret)
            for p in (keys1024.private.p, keys1024.private.q):
                assert int(p).to_bytes((int(p).bit_length() + 7) // 8, "big") not in text
    assert os.name != "posix" or stat.S_IMODE((s1_dir / "models").stat().st_mode) == 0o700


def test_out_of_range_pixels_are_unprocessable(s1, model_id, keys1024, user_keys):
    pixels = np.zeros((1, 6, 6), dtype=object)
    # 4-bit input bound: x + M lies in [2^46, 2^47), so the guard bit of its 47-bit slot is set at the first reveal
    pixels[0, 2, 2] = 2**46
    response = s1.post(f"/v1/models/{model_id}/classify", data=query_body(keys1024, user_keys, pixels))
    assert "bound" in error_of(response, 422, "bound_exceeded")
    healthy(s1)


def test_s2_with_another_key_is_named(tmp_path, s1_dir, model_id, keys1024, user_keys):
    import shutil

    other_s2 = serve_in_thread(s2_app.create_app(S2Config(data_dir=tmp_path / "s2", cloud_token=CLOUD_TOKEN,
                                                          key_bits=1024)))
    shutil.copytree(s1_dir, tmp_path / "s1")
    client = make_s1(tmp_path / "s1", other_s2).test_client()
    assert client.get("/v1/health").get_json()["s2"]["key_matches"] is False
    response = client.post(f"/v1/models/{model_id}/classify", data=query_body(keys1024, user_keys))
    assert "S2 now holds key" in error_of(response, 502, "peer_key_changed")
    healthy(client)


def test_prepared_offline_phase_gives_the_same_answer(s1, model_id, model, keys1024, user_keys):
    """S1 prepares each model's next query in the background and says so in its health; a query that
    uses it is still exact."""
    import time

    deadline = time.monotonic() + 60
    while (health := s1.get("/v1/health").get_json())["prepared"] < 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert health["prepared"] == 1 and health["pools"] == {"full": True, "levels": []}  # pools off in this module
    pixels = ints(np.random.default_rng(9).integers(0, 16, 36), (1, 6, 6))
    reply = decode(s1.post(f"/v1/models/{model_id}/classify", data=query_body(keys1024, user_keys, pixels)).data)
    vector = EncryptedTensor.from_ciphertexts(user_keys.public, reply.array("class_vector"), (3,))
    assert list(vector.decrypt(user_keys.private)) == list(classify_reference(model, pixels))
    assert reply.meta["offline_seconds"] is not None, "the query did not use its prepared offline phase"


def test_unexpected_errors_are_a_bare_json_500(cloud, tmp_path):
    same_keys = KeyCloud(cloud.keys, cloud.dgk_public, cloud.dgk_private)
    app = s2_app.create_app(S2Config(data_dir=tmp_path, cloud_token=CLOUD_TOKEN, key_bits=1024), key_cloud=same_keys)

    def broken(step: str, payload: bytes) -> bytes:
        raise RuntimeError("secret detail /etc/passwd")

    same_keys.handle = broken  # type: ignore[method-assign]
    client = app.test_client()
    message = error_of(client.post("/v1/rounds/smp", data=b"x", headers=AUTH_CLOUD), 500, "internal_error")
    assert "secret detail" not in message
    healthy(client)
