"""A federated session run by separate owners (owner/federate_cli.py ``create`` and ``join``, owner/federation_file.py).

Slow: S1 and S2 as processes at 1024 bits, ``he-cnn owner federate create`` for K = 2, then two ``he-cnn owner
federate join`` processes at once, one on its split of the digits, one on its own image folder, each with
only its own owner file; both must end with the same average, and every round's sum must equal the
plaintext weighted sum of the two owners' quantised updates (recomputed here from the same data and seeds).
Fast: the owner-file parser against hostile files (one :class:`BadRequest` each, one line from the command),
the file's secrecy (mode, repr), the refusal of data that does not fit the session, and an owner that waits
for the others and uploads again when the round was aborted meanwhile (in-process clouds).
"""
from __future__ import annotations

import dataclasses
import json
import os
import secrets
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from he_cnn.crypto.paillier import generate_keypair
from he_cnn.errors import BadRequest, RoundNotReady
from he_cnn.owner.federating import HTTPAggregator, create_session
from he_cnn.owner import federation_file as ff
from he_cnn.owner.federate_cli import owner_data, parse_split_of, sums_digest
from he_cnn.protocols import aggregate as agg
from he_cnn.protocols.aggregate import plaintext_average
from he_cnn.servers.cli import main
from he_cnn.servers.launch import CloudProcess
from he_cnn.training.data import load_dataset
from he_cnn.training.federated import AggregationRound, FederatedSettings, split_dataset, train_rounds
from he_cnn.transport.http_channel import fetch_public_key
from test_federation_http import BITS, COUNT
from threaded_clouds import ThreadedClouds
from test_service_errors import OWNER_TOKEN

SETTINGS = FederatedSettings(owners=2, rounds=2, local_epochs=1)


@pytest.fixture(scope="module")
def consortium():
    return generate_keypair(1024)


def template(consortium, **changes) -> ff.OwnerFile:
    base = ff.OwnerFile("http://127.0.0.1:8601", "0123456789abcdef", 0, "", "fedcba9876543210", SETTINGS,
                        (674, 673), "icnn", (1, 16, 16), tuple(str(d) for d in range(10)), consortium)
    return dataclasses.replace(base, **changes)


def write(tmp_path: Path, consortium, **changes) -> Path:
    tokens = [secrets.token_urlsafe(24) for _ in range(2)]
    return ff.write_owner_files(tmp_path, template(consortium, **changes), tokens)[0]


def test_owner_files_are_private_hold_one_token_and_read_back(tmp_path, consortium):
    tokens = [secrets.token_urlsafe(24) for _ in range(2)]
    ff.prepare_folder(tmp_path / "out", 2)
    paths = ff.write_owner_files(tmp_path / "out", template(consortium), tokens)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o700
    for k, path in enumerate(paths):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert tokens[1 - k] not in path.read_text()  # an owner's file holds no other owner's token
        read = ff.read_owner_file(path)
        assert read.owner == k and read.token == tokens[k] and read.settings == SETTINGS
        assert read.consortium.public == consortium.public and read.consortium.private.p == consortium.private.p
        assert tokens[k] not in repr(read) and str(int(consortium.private.p)) not in repr(read)
    with pytest.raises(BadRequest, match="already exists"):  # never over another session's files
        ff.prepare_folder(tmp_path / "out", 2)


def hostile(doc: dict) -> list[tuple[str, object]]:
    """(what, the file's content) for files a session never writes."""
    def edit(**fields):
        return {**doc, **fields}

    settings = doc["settings"]
    key = doc["consortium"]
    return [
        ("not JSON", b"{\"format\": "), ("not UTF-8", b"\xff\xfe"), ("too big", b" " * (300 << 10)),
        ("too deep", b"[" * 100 + b"]" * 100), ("a list", []), ("another format", edit(format="he-cnn-user-key")),
        ("another version", edit(version=2)), ("a missing field", {k: v for k, v in doc.items() if k != "token"}),
        ("a short token", edit(token="abc")), ("a token with newlines", edit(token="a" * 20 + "\nX")),
        ("a bad session id", edit(session_id="../../etc")), ("a url without scheme", edit(s1_url="s1.example")),
        ("an owner out of range", edit(owner=2)), ("a bool owner", edit(owner=True)),
        ("weights of another K", edit(weights=[1, 2, 3])), ("a zero weight", edit(weights=[0, 5])),
        ("a float setting", edit(settings={**settings, "rounds": 2.0})),
        ("an extra setting", edit(settings={**settings, "evil": 1})),
        ("a setting out of range", edit(settings={**settings, "owners": 1})),
        ("an unknown architecture", edit(arch="rm -rf")), ("a 2-d shape", edit(input_shape=[16, 16])),
        ("a huge shape", edit(input_shape=[1, 100000, 16])), ("duplicate classes", edit(classes=["a", "a"])),
        ("n not p q", edit(consortium={**key, "n": key["n"] + 2})),
        ("a tiny key", edit(consortium={"n": 15, "p": 3, "q": 5})),
        ("a string prime", edit(consortium={**key, "p": str(key["p"])})),
        ("a huge number", b'{"format": "he-cnn-federation-owner", "version": 1, "owner": ' + b"9" * 5000 + b"}"),
    ]


def test_hostile_owner_files_are_one_bad_request_and_one_line(tmp_path, consortium):
    good = write(tmp_path, consortium)
    doc = json.loads(good.read_text())
    bad = tmp_path / "bad.json"
    for what, content in hostile(doc):
        bad.write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())
        with pytest.raises(BadRequest) as caught:
            ff.read_owner_file(bad)
        assert "\n" not in str(caught.value) and str(bad) in str(caught.value), what
    for path in (bad, tmp_path / "missing.json", tmp_path):
        result = CliRunner().invoke(main, ["owner", "federate", "join", "--session-file", str(path), "-q"])
        lines = [line for line in result.output.splitlines() if line.startswith("Error: ")]
        assert result.exit_code != 0 and len(lines) == 1 and "Traceback" not in result.output, result.output


def test_data_that_does_not_fit_the_session_is_refused(tmp_path, consortium):
    digits = load_dataset("digits", input_max=15)
    parts = split_dataset(digits, 2, "iid")
    session = template(consortium, weights=(len(parts[0].y_train), len(parts[1].y_train)))
    _, part = owner_data(session, "digits", None)  # the session's K and this owner's index by default
    assert np.array_equal(part.y_train, parts[0].y_train)
    with pytest.raises(BadRequest, match="declares"):
        owner_data(session, "digits", (3, 0))
    folder = tmp_path / "cats"
    for label in ("cat", "dog"):
        (folder / label).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((16, 16), 40 * i, np.uint8)).save(folder / label / f"{i}.png")
    with pytest.raises(BadRequest, match="session's model takes"):
        owner_data(session, str(folder), None)
    for text in ("2/2", "x", "0/0", "2/-1", "99999/1"):
        with pytest.raises(BadRequest):
            parse_split_of(text)
    assert parse_split_of(" 3/2 ") == (3, 2)


def test_an_owner_waits_for_the_others_and_uploads_again_after_an_abort(tmp_path, keys1024, consortium, monkeypatch):
    monkeypatch.setenv("HECNN_RANDOMNESS_POOL", "0")
    clouds = ThreadedClouds(tmp_path, keys1024)
    weights = (3, 5)
    created = create_session(clouds.url, OWNER_TOKEN, COUNT, BITS, weights, 1, consortium)
    key = fetch_public_key(clouds.url, 10.0, peer="S1")[0]
    me, other = (HTTPAggregator(clouds.url, created["session_id"], {k: created["owner_tokens"][k]}, key, consortium,
                                poll_seconds=0.05, wait_seconds=30) for k in (0, 1))
    layout = agg.AggregationLayout(COUNT, BITS, weights, key.paillier.bits)
    rng = np.random.default_rng(7)
    values = [rng.integers(-(1 << BITS) + 1, 1 << BITS, COUNT).astype(object) for _ in weights]
    results = []
    waiting = threading.Thread(target=lambda: results.append(me.aggregate([values[0]], layout)))
    waiting.start()

    def wait_for(uploaded):
        deadline = time.monotonic() + 20
        while other.status()["uploaded"] != uploaded:
            assert time.monotonic() < deadline
            time.sleep(0.02)

    wait_for([0])
    client = clouds.app.test_client()
    client.post(f"/v1/federations/{created['session_id']}/abort", headers={"Authorization": f"Bearer {OWNER_TOKEN}"})
    wait_for([0])  # owner 0 saw its upload discarded and made it again
    other.upload(1, agg.encrypt_update(key.paillier, values[1], layout))
    waiting.join(30)
    (result,) = results
    assert list(result.sums) == list(plaintext_average(values, weights)[0]) and other.status()["aborted"] == 1
    lonely = create_session(clouds.url, OWNER_TOKEN, COUNT, BITS, weights, 1, consortium)
    alone = HTTPAggregator(clouds.url, lonely["session_id"], {0: lonely["owner_tokens"][0]}, key, consortium,
                           poll_seconds=0.05, wait_seconds=0.3)
    with pytest.raises(RoundNotReady, match="did not come within"):  # the other owner never uploads
        alone.aggregate([values[0]], layout)
    clouds.s1_server.close()
    clouds.s2_server.close()


class Plaintext:
    """The reference aggregator: the plaintext weighted sum of all owners' updates."""

    key_bits = 1024

    def aggregate(self, updates, layout):
        return AggregationRound(plaintext_average(updates, layout.weights)[0], (), (), (), 0.0, 0, 0, 0.0)


def he_cnn(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "he_cnn", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "HECNN_RANDOMNESS_POOL": "0"})


def finish(process: subprocess.Popen, timeout: float = 120) -> str:
    out, err = process.communicate(timeout=timeout)
    assert process.returncode == 0 and "Traceback" not in err, err[-3000:]
    return out


@pytest.mark.slow
def test_two_owners_on_their_own_data_train_one_model_through_real_clouds(tmp_path):
    started = time.monotonic()
    cloud_token, owner_token = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    env = {"HECNN_RANDOMNESS_POOL": "0"}
    # owner 1's own image folder: its split of the digits as PNGs, one sub-folder per class
    digits = load_dataset("digits", input_max=15)
    folder = tmp_path / "owner-1-images"
    for i, (x, y) in enumerate(zip(*(lambda p: (p.x_train, p.y_train))(split_dataset(digits, 2, "iid")[1]))):
        (folder / str(y)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.rint(x[0] * 255).astype(np.uint8)).save(folder / str(y) / f"{i}.png")
    own = load_dataset(str(folder), input_max=15)
    parts = [split_dataset(digits, 2, "iid")[0], own]
    weights = f"{len(parts[0].y_train)},{len(own.y_train)}"
    with CloudProcess("S2", ["--data-dir", str(tmp_path / "s2"), "--key-bits", "1024", "--quiet"],
                      {**env, "HECNN_S2_CLOUD_TOKEN": cloud_token}) as s2:
        s2_url = s2.wait_ready()
        with CloudProcess("S1", ["--data-dir", str(tmp_path / "s1"), "--peer-url", s2_url, "--quiet", "--open"],
                          {**env, "HECNN_S1_CLOUD_TOKEN": cloud_token, "HECNN_S1_OWNER_TOKEN": owner_token}) as s1:
            s1_url = s1.wait_ready()
            created = json.loads(finish(he_cnn("owner", "federate", "create", "--s1", s1_url, "--token", owner_token,
                                               "--owners", "2", "--rounds", "2", "--local-epochs", "1", "--weights",
                                               weights, "--out", str(tmp_path / "files"), "--json", "-q")))
            files = [Path(p) for p in created["owner_files"]]
            assert created["weights"] == [len(p.y_train) for p in parts] and len(files) == 2
            assert owner_token not in files[0].read_text() + files[1].read_text()
            joins = [he_cnn("owner", "federate", "join", "--session-file", str(files[0]), "--data", "digits", "--json"),
                     he_cnn("owner", "federate", "join", "--session-file", str(files[1]), "--data", str(folder),
                            "--json")]
            reports = [json.loads(finish(p).strip().splitlines()[-1]) for p in joins]
    assert [r["owner"] for r in reports] == [0, 1] and [r["samples"] for r in reports] == created["weights"]
    mine = [[r["sum_sha256"] for r in report["rounds"]] for report in reports]
    assert len(mine[0]) == 2 and mine[0] == mine[1]  # the same sums each round, so the same final average
    # the plaintext reference: the same local training on the same data, summed in the clear
    reference = []
    train_rounds(parts, tuple(created["weights"]), digits, SETTINGS, Plaintext(),
                 on_round=lambda r: reference.append(sums_digest(r.aggregation.sums)))
    assert mine[0] == reference
    assert all(0.0 <= r["float_accuracy"] <= 1.0 for r in reports) and reports[1]["test_images"] == len(own.y_test)
    assert time.monotonic() - started < 90
