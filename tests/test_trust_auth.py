"""Authentication and limits: tokens where the service needs them, a body limit on every POST route,
no secret in any answer, and no way to read another user's result.

Tokens (README, HTTP API): the owner token on ``POST /v1/models`` at S1, the cloud token on every
``POST /v1/rounds/<step>`` at S2; everything else is open (health, public key, model list and
description, classify). The clouds run in this process (test clients; S1 reaches S2 over HTTP).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import requests

from he_cnn.errors import KeyMismatch
from he_cnn.crypto.paillier import generate_keypair
from he_cnn.parties.key_cloud import HANDLERS, KeyCloud
from he_cnn.parties.compute_cloud import encrypt_model
from he_cnn.crypto.tensor import EncryptedTensor
from he_cnn.wire import decode
from he_cnn.servers import s1 as s1_app
from he_cnn.servers import s2 as s2_app
from he_cnn.servers.config import S1Config, S2Config
from he_cnn.servers.http import shutdown_app
from test_service_errors import serve_in_thread
from trust_support import REPORT, SecretScanner, assert_exact, random_image, tiny_model

CLOUD_TOKEN = "auth-cloud-token-" + "c" * 16
OWNER_TOKEN = "auth-owner-token-" + "o" * 16
S1_LIMIT = 256 << 10
S2_LIMIT = 1 << 20
WIRE = {"Content-Type": "application/octet-stream"}


class Clouds:
    def __init__(self, tmp_path_factory):
        self.cloud = KeyCloud.create(generate_keypair(1024))
        self.pk = self.cloud.keys.public
        self.s2_app = s2_app.create_app(S2Config(data_dir=tmp_path_factory.mktemp("s2"), cloud_token=CLOUD_TOKEN,
                                                 key_bits=1024, max_body_bytes=S2_LIMIT), key_cloud=self.cloud)
        self.s2_url = serve_in_thread(self.s2_app)
        self.s1_dir = tmp_path_factory.mktemp("s1")
        self.s1_app = s1_app.create_app(S1Config(require_user_keys=False, data_dir=self.s1_dir, peer_url=self.s2_url, owner_token=OWNER_TOKEN,
                                                 cloud_token=CLOUD_TOKEN, max_body_bytes=S1_LIMIT, peer_timeout=30))
        self.s1_url = serve_in_thread(self.s1_app)
        self.s1, self.s2 = self.s1_app.test_client(), self.s2_app.test_client()
        self.model = tiny_model()
        reply = self.s1.post("/v1/models", data=encrypt_model(self.model, self.pk).serialize(),
                             headers={"Authorization": f"Bearer {OWNER_TOKEN}", **WIRE})
        assert reply.status_code == 201, reply.data
        self.model_id = reply.get_json()["model_id"]

    def query(self, user, pixels) -> bytes:
        from he_cnn.wire import Message, encode

        msg = Message()
        msg.arrays["user_n"] = np.array([user.public.n], dtype=object)
        msg.arrays["image"] = EncryptedTensor.encrypt(self.pk, pixels).data
        msg.widths["image"] = self.pk.ciphertext_bytes
        return encode(msg)


@pytest.fixture(scope="module")
def clouds(tmp_path_factory):
    with pytest.MonkeyPatch.context() as env:
        env.setenv("HECNN_RANDOMNESS_POOL", "0")
        c = Clouds(tmp_path_factory)
    yield c
    for app in (c.s1_app, c.s2_app):
        shutdown_app(app)


def json_error(reply, status: int, code: str) -> str:
    assert reply.status_code == status, reply.data[:300]
    assert reply.mimetype == "application/json"
    body = reply.get_json()
    assert set(body) == {"error", "message"} and body["error"] == code, body
    return body["message"]


PROTECTED = [("S1", "/v1/models", OWNER_TOKEN, CLOUD_TOKEN)] + \
            [("S2", f"/v1/rounds/{step}", CLOUD_TOKEN, OWNER_TOKEN) for step in sorted(HANDLERS)]
TOKEN_VARIANTS = {
    "missing": lambda right, other: None,
    "empty": lambda right, other: "Bearer ",
    "scheme only": lambda right, other: "Bearer",
    "another scheme": lambda right, other: f"Basic {right}",
    "no scheme": lambda right, other: right,
    "wrong, same length": lambda right, other: "Bearer " + "x" * len(right),
    "a prefix": lambda right, other: "Bearer " + right[:-1],
    "an extension": lambda right, other: "Bearer " + right + "x",
    "the other token": lambda right, other: "Bearer " + other,
}


@pytest.mark.parametrize("variant", list(TOKEN_VARIANTS))
@pytest.mark.parametrize("cloud, path, right, other", PROTECTED, ids=[p[1] for p in PROTECTED])
def test_protected_routes_refuse_a_missing_or_wrong_token(clouds, cloud, path, right, other, variant):
    header = TOKEN_VARIANTS[variant](right, other)
    client = clouds.s1 if cloud == "S1" else clouds.s2
    reply = client.post(path, data=b"HECN", headers={**WIRE, **({"Authorization": header} if header else {})})
    message = json_error(reply, 401, "unauthorized")
    assert reply.headers["WWW-Authenticate"] == "Bearer"
    assert right not in reply.get_data(as_text=True) and other not in reply.get_data(as_text=True)
    assert "token" in message
    REPORT["auth: wrong or missing tokens refused (401)"] += 1


def test_open_routes_need_no_token(clouds):
    for client, path in [(clouds.s1, "/v1/health"), (clouds.s1, "/v1/public-key"), (clouds.s1, "/v1/models"),
                         (clouds.s1, f"/v1/models/{clouds.model_id}"), (clouds.s2, "/v1/health"),
                         (clouds.s2, "/v1/public-key")]:
        assert client.get(path).status_code == 200, path
    user = generate_keypair(1024)
    reply = clouds.s1.post(f"/v1/models/{clouds.model_id}/classify", data=clouds.query(user, random_image(0)),
                           headers=WIRE)
    assert reply.status_code == 200


POSTS = [("S1", "/v1/models", OWNER_TOKEN, S1_LIMIT), ("S1", "/v1/models/{model_id}/classify", None, S1_LIMIT)] + \
        [("S2", f"/v1/rounds/{step}", CLOUD_TOKEN, S2_LIMIT) for step in [*sorted(HANDLERS), "no_such_step"]]


@pytest.mark.parametrize("cloud, path, token, limit", POSTS, ids=[p[1] for p in POSTS])
def test_every_post_route_has_a_body_limit(clouds, cloud, path, token, limit):
    client = clouds.s1 if cloud == "S1" else clouds.s2
    path = path.format(model_id=clouds.model_id)
    headers = {**WIRE, **({"Authorization": f"Bearer {token}"} if token else {})}
    assert str(limit) in json_error(client.post(path, data=b"\0" * (limit + 1), headers=headers), 413, "body_too_large")
    at_limit = client.post(path, data=b"\0" * limit, headers=headers)
    assert at_limit.status_code == 400 and at_limit.get_json()["error"] in ("wire_format", "bad_request")  # read, refused
    if token:  # without the token, the body is never read
        json_error(client.post(path, data=b"\0" * (limit + 1), headers=WIRE), 401, "unauthorized")
    REPORT["auth: POST routes with a 413 body limit"] += 1


@pytest.mark.parametrize("cloud", ["S1", "S2"])
def test_a_chunked_body_over_the_limit_is_refused_over_http(clouds, cloud):
    """Without a Content-Length (chunked transfer), over real HTTP: still 413."""
    url, path, limit, token = ((clouds.s1_url, f"/v1/models/{clouds.model_id}/classify", S1_LIMIT, None) if cloud == "S1"
                               else (clouds.s2_url, "/v1/rounds/smp", S2_LIMIT, CLOUD_TOKEN))

    def chunks():
        for _ in range(limit // 4096 + 2):
            yield b"\0" * 4096

    headers = {**WIRE, **({"Authorization": f"Bearer {token}"} if token else {})}
    reply = requests.post(url + path, data=chunks(), headers=headers, timeout=30)
    assert reply.status_code == 413 and reply.json()["error"] == "body_too_large"


def every_answer(clouds, user) -> list[bytes]:
    """The bodies of every GET route of both clouds, of error answers, and of a classify reply."""
    gets = [(clouds.s1, p) for p in ("/v1/health", "/v1/public-key", "/v1/models", f"/v1/models/{clouds.model_id}",
                                     "/v1/models/0123456789abcdef", "/v1/nowhere")] + \
           [(clouds.s2, p) for p in ("/v1/health", "/v1/public-key", "/v1/nowhere", "/v1/rounds/smp")]
    bodies = [client.get(path).data for client, path in gets]
    posts = [(clouds.s2, "/v1/rounds/smp", b"garbage", {"Authorization": f"Bearer {CLOUD_TOKEN}"}),
             (clouds.s2, "/v1/rounds/linear", b"HECN" + b"\0" * 40, {"Authorization": f"Bearer {CLOUD_TOKEN}"}),
             (clouds.s1, "/v1/models", b"garbage", {"Authorization": f"Bearer {OWNER_TOKEN}"}),
             (clouds.s1, f"/v1/models/{clouds.model_id}/classify", clouds.query(user, random_image(1)), {})]
    bodies += [client.post(path, data=body, headers={**WIRE, **headers}).data for client, path, body, headers in posts]
    return bodies


def test_no_answer_carries_a_secret(clouds):
    """S2's primes and DGK secret, and both tokens, in none of the answers either cloud gives."""
    private, dgk = clouds.cloud.keys.private, clouds.cloud.dgk_private
    scanner = SecretScanner({"paillier p": int(private.p), "paillier q": int(private.q), "dgk p": int(dgk.p),
                             "dgk q": int(clouds.cloud.dgk_public.n // dgk.p), "dgk v_p": int(dgk.v_p)})
    bodies = every_answer(clouds, generate_keypair(1024))
    for body in bodies:
        assert not scanner.find(body)
        assert CLOUD_TOKEN.encode() not in body and OWNER_TOKEN.encode() not in body
    REPORT["auth: answers scanned for secrets and tokens"] += len(bodies)


def test_no_one_reads_another_users_result(clouds):
    """A result is encrypted under the key of the request that asked for it and kept nowhere: another
    user cannot decrypt it, and no route returns it again."""
    alice, bob = generate_keypair(1024), generate_keypair(1024)
    files_before = sorted(p.relative_to(clouds.s1_dir) for p in clouds.s1_dir.rglob("*"))
    pixels = random_image(3)
    reply = clouds.s1.post(f"/v1/models/{clouds.model_id}/classify", data=clouds.query(alice, pixels), headers=WIRE)
    result = decode(reply.data).array("class_vector").reshape(-1)
    vector = [int(v) for v in EncryptedTensor.from_ciphertexts(alice.public, result, (3,)).decrypt(alice.private)]
    assert_exact(clouds.model, pixels, vector)
    with pytest.raises(KeyMismatch):  # refused as under another key...
        EncryptedTensor(alice.public, result).decrypt(bob.private)
    for c in result:  # ...and decrypting it anyway gives noise
        if 0 < c < bob.public.nsq:
            assert abs(bob.private.decrypt(c)) > 2**900
    assert sorted(p.relative_to(clouds.s1_dir) for p in clouds.s1_dir.rglob("*")) == files_before  # nothing stored
    later = b"".join(every_answer(clouds, bob))
    widths = alice.public.ciphertext_bytes
    assert not any(int(c).to_bytes(widths, "big") in later for c in result)  # no route hands it out again
    assert json.loads(clouds.s1.get("/v1/models").data)["models"][0].keys() >= {"model_id"}


def test_both_clouds_keep_a_users_key_for_the_next_query(clouds):
    """The user's key object (its randomizer table, its pool that the fillers top up) outlives a query
    at both clouds, so that a second query does not build the table again."""
    carol = generate_keypair(1024)
    kept = []
    for _ in range(2):
        reply = clouds.s1.post(f"/v1/models/{clouds.model_id}/classify", data=clouds.query(carol, random_image(3)),
                               headers=WIRE)
        assert reply.status_code == 200
        kept.append((clouds.s1_app.extensions["he_cnn.s1.user_keys"].get(carol.public.n),
                     clouds.cloud.user_keys.get(carol.public.n)))
    assert kept[0][0] is kept[1][0] and kept[0][1] is kept[1][1]
    assert kept[0][0] == kept[0][1] == carol.public
    # both queries drew their randomizers (one per class at each cloud) through the same key object
    assert kept[0][0].pool.taken == kept[0][1].pool.taken == 2 * 3
