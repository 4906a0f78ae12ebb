"""Faults, with real processes: a cloud killed at a chosen protocol round, and corrupt data directories.

- S2 is killed (SIGKILL) in the middle of a query, at a given round, by the relay between S1 and S2:
  the user gets a 503 JSON error (and from ``he-cnn user query`` one line and exit status 1), S1
  stays healthy, and once S2 is restarted on the same data directory the next query is exact
  without a new set-up.
- S1 is killed during a model upload: while the body arrives, during the set-up round with S2, and
  at several moments after S2's answer, while S1 stores the model. After each restart S1 lists and
  serves only complete models (each answers exactly), never loses an acknowledged upload, leaves no
  partial upload behind, and the owner can upload again (the owner's upload code path).
- A corrupt file in a data directory (S2's key file or a stored set-up; S1's pinned key, a model, its
  set-up or summary, a stray entry) stops the start: exit status 1, one ``Error:`` line naming the
  file, no traceback.
"""
from __future__ import annotations

import json
import re
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from he_cnn.errors import PeerUnavailable
from he_cnn.crypto.paillier import generate_keypair
from he_cnn.owner.pipeline import encrypt_for_upload, upload
from trust_support import (REPORT, TINY_SIZE, CloudPair, assert_exact, classify, kill, random_image, tiny_model)
from he_cnn.user.keys import create_user_key
from he_cnn.user.query import query_message

pytestmark = pytest.mark.slow


def query_rounds(pair: CloudPair, start: int) -> list[str]:
    return pair.relay.rounds[start:]  # type: ignore[union-attr]


def one_line_error(stderr: str) -> str:
    """The one ``Error:`` line of a command that failed as expected (log lines may precede it)."""
    lines = [line for line in stderr.splitlines() if line.startswith("Error: ")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


# -- S2 killed in the middle of a query ------------------------------------------------------------

def test_s2_killed_mid_query(tmp_path):
    pair = CloudPair(tmp_path, relay=True)
    try:
        model = tiny_model()
        model_id = pair.upload(model)
        cloud_key, user = pair.cloud_key(), generate_keypair(1024)
        relay = pair.relay

        # 1. over HTTP: S2 dies when the 4th round of the query (a comparison) reaches it
        start = len(relay.rounds)
        relay.on_request = lambda step, index: kill(pair.s2) if index == start + 3 else None
        body = query_message(random_image(1), cloud_key, user)
        began = time.monotonic()
        reply = requests.post(f"{pair.s1_url}/v1/models/{model_id}/classify", data=body, timeout=60)
        assert time.monotonic() - began < 10
        assert len(query_rounds(pair, start)) == 4  # cut in the middle: a query has 11 rounds
        assert reply.status_code == 503 and reply.headers["Content-Type"] == "application/json"
        error = reply.json()
        assert set(error) == {"error", "message"} and error["error"] == "peer_unavailable"
        assert "S2" in error["message"] and "\n" not in error["message"] and "Traceback" not in reply.text
        health = requests.get(f"{pair.s1_url}/v1/health", timeout=10)
        assert health.status_code == 200 and health.json()["s2"]["reachable"] is False  # S1 stays healthy
        relay.on_request = None

        # 2. S2 back on the same data directory: the next query is exact, with no new set-up
        pair.restart_s2()
        assert requests.get(pair.s2_url + "/v1/health", timeout=10).json()["setups"] == 1
        start = len(relay.rounds)
        pixels = random_image(2)
        vector, _, _ = classify(pair.s1_url, model_id, cloud_key, user, pixels)
        assert_exact(model, pixels, vector)
        assert "linear_setup" not in query_rounds(pair, start)

        # 3. the same with the user's command: S2 dies at the 7th round; one line, exit status 1
        key = tmp_path / "me.key"
        create_user_key(key, 1024)
        image = tmp_path / "digit.npy"
        np.save(image, np.arange(TINY_SIZE * TINY_SIZE).reshape(TINY_SIZE, TINY_SIZE) % 16)
        start = len(relay.rounds)
        relay.on_request = lambda step, index: kill(pair.s2) if index == start + 6 else None
        done = subprocess.run([sys.executable, "-m", "he_cnn", "user", "query", "--s1", pair.s1_url, "--model", model_id,
                               "--key", str(key), "--no-progress", str(image)], capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 1 and done.stdout == ""
        assert "S2" in one_line_error(done.stderr) and "unreachable" in done.stderr
        assert len(query_rounds(pair, start)) == 7
        relay.on_request = None
        pair.restart_s2()
        pixels = random_image(3)
        vector, _, _ = classify(pair.s1_url, model_id, cloud_key, user, pixels)
        assert_exact(model, pixels, vector)
        REPORT["faults: S2 killed mid-query (SIGKILL)"] += 2
        REPORT["faults: queries lost after a restart"] += 0
    finally:
        pair.stop()


# -- S1 killed during an upload --------------------------------------------------------------------

def listed_models(pair: CloudPair) -> list[str]:
    return [m["model_id"] for m in requests.get(pair.s1_url + "/v1/models", timeout=10).json()["models"]]


def check_store(pair: CloudPair, model, user, cloud_key, checked: set[str]) -> list[str]:
    """After a restart: no partial upload on disk; every listed model complete, and each one not seen
    before answers a query exactly (``checked`` collects those)."""
    models_dir = pair.s1_dir / "models"
    leftovers = [p.name for p in models_dir.iterdir() if p.name.startswith(".")]
    assert not leftovers, leftovers
    listed = listed_models(pair)
    assert sorted(listed) == sorted(p.name for p in models_dir.iterdir())
    for model_id in listed:
        assert {p.name for p in (models_dir / model_id).iterdir()} == {"model.hecn", "setup.hecn", "model.json"}
        if model_id not in checked:
            pixels = random_image(len(checked))
            vector, _, _ = classify(pair.s1_url, model_id, cloud_key, user, pixels)
            assert_exact(model, pixels, vector)
            checked.add(model_id)
    return listed


def upload_in_thread(pair: CloudPair, body: bytes) -> tuple[threading.Thread, list]:
    outcome: list = []

    def run() -> None:
        try:
            outcome.append(upload(pair.s1_url, pair.owner_token, body))
        except PeerUnavailable as e:
            outcome.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def test_s1_killed_during_uploads(tmp_path):
    pair = CloudPair(tmp_path, relay=True)
    try:
        model = tiny_model()
        cloud_key, user = pair.cloud_key(), generate_keypair(1024)
        body = encrypt_for_upload(model, cloud_key)
        kills, checked = 0, set()

        # 1. while the body arrives: half of it sent, then S1 dies
        host, port = pair.s1_url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as conn:
            conn.sendall(f"POST /v1/models HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {pair.owner_token}\r\n"
                         f"Content-Type: application/octet-stream\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                         + body[:len(body) // 2])
            time.sleep(0.3)
            kill(pair.s1)
        kills += 1
        pair.restart_s1()
        assert check_store(pair, model, user, cloud_key, checked) == []

        # 2. during the set-up round (S2 still completes it: its set-up is orphaned, never used)
        pair.relay.on_request = lambda step, index: kill(pair.s1) if step == "linear_setup" else None
        thread, outcome = upload_in_thread(pair, body)
        thread.join(60)
        assert isinstance(outcome[0], PeerUnavailable) and "S1" in str(outcome[0])  # the owner is told
        kills += 1
        pair.relay.on_request = None
        pair.restart_s1()
        assert check_store(pair, model, user, cloud_key, checked) == []

        # 3. after S2's answer, while S1 writes the model: at several moments
        stored = 0
        for delay in (0.0, 0.003, 0.01, 0.05):
            def late_kill(step: str, index: int, delay: float = delay) -> None:
                if step == "linear_setup":
                    threading.Timer(delay, lambda: pair.s1.process.send_signal(signal.SIGKILL)).start()

            pair.relay.on_response = late_kill
            thread, outcome = upload_in_thread(pair, body)
            thread.join(60)
            pair.s1.process.wait(10)
            kills += 1
            pair.relay.on_response = None
            pair.restart_s1()
            listed = check_store(pair, model, user, cloud_key, checked)
            answered = outcome and isinstance(outcome[0], dict)
            assert not answered or outcome[0]["model_id"] in listed  # an acknowledged upload is never lost
            stored = len(listed)

        # 4. the owner uploads again (the owner's code path, as ``he-cnn owner upload`` runs it), and it is served
        model_id = upload(pair.s1_url, pair.owner_token, body)["model_id"]
        assert model_id in check_store(pair, model, user, cloud_key, checked)
        REPORT["faults: S1 killed during an upload (SIGKILL)"] += kills
        REPORT["faults: uploads interrupted while storing that were complete after restart"] += stored
    finally:
        pair.stop()


# -- corrupt data directories ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def good_dirs(tmp_path_factory):
    """S2's and S1's data directories after an upload, and the ids in them."""
    root = tmp_path_factory.mktemp("good")
    pair = CloudPair(root)
    try:
        model_id = pair.upload(tiny_model())
    finally:
        pair.stop()
    other = tmp_path_factory.mktemp("other")  # a second S2: another cloud key
    CloudPair(other).stop()
    return root, model_id, other


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def edit_json(path: Path, change) -> None:
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc))


def infinite_kernel(path: Path) -> None:
    """A wire file whose header says kernel: Infinity (json.loads accepts it)."""
    data = path.read_bytes()
    header_len = int.from_bytes(data[6:10], "big")
    header = re.sub(rb'"kernel":\[\d+,', b'"kernel":[Infinity,', data[10:10 + header_len], count=1)
    assert header != data[10:10 + header_len]
    path.write_bytes(data[:6] + len(header).to_bytes(4, "big") + header + data[10 + header_len:])


def first(folder: Path) -> Path:
    return sorted(folder.iterdir())[0]


CORRUPTIONS = {
    # S2
    "S2 key file truncated": ("s2", lambda d, ids: truncate(d / "keys.json"), "keys.json"),
    "S2 key file not JSON": ("s2", lambda d, ids: (d / "keys.json").write_bytes(os.urandom(300)), "keys.json"),
    "S2 key file with a wrong prime": ("s2", lambda d, ids: edit_json(
        d / "keys.json", lambda doc: doc["paillier"].__setitem__("q", doc["paillier"]["q"] + 2)), "keys.json"),
    "S2 key file of another version": ("s2", lambda d, ids: edit_json(
        d / "keys.json", lambda doc: doc.__setitem__("version", 99)), "keys.json"),
    "S2 key file without the DGK key": ("s2", lambda d, ids: edit_json(
        d / "keys.json", lambda doc: doc.pop("dgk")), "keys.json"),
    "S2 set-up truncated": ("s2", lambda d, ids: truncate(first(d / "setups")), "setups"),
    "S2 set-up with an infinite kernel": ("s2", lambda d, ids: infinite_kernel(first(d / "setups")), "setups"),
    # S1
    "S1 pinned key truncated": ("s1", lambda d, ids: truncate(d / "cloud-key.hecn"), "cloud-key.hecn"),
    "S1 pinned key of another cloud": ("s1", lambda d, ids: shutil.copy(ids[1] / "s1" / "cloud-key.hecn",
                                                                        d / "cloud-key.hecn"), "{model}"),
    "S1 model truncated": ("s1", lambda d, ids: truncate(d / "models" / ids[0] / "model.hecn"), "{model}"),
    "S1 model with an infinite kernel": ("s1", lambda d, ids: infinite_kernel(d / "models" / ids[0] / "model.hecn"),
                                         "{model}"),
    "S1 set-up garbage": ("s1", lambda d, ids: (d / "models" / ids[0] / "setup.hecn").write_bytes(b"HECN" + os.urandom(60)),
                          "{model}"),
    "S1 summary not JSON": ("s1", lambda d, ids: (d / "models" / ids[0] / "model.json").write_text("{"), "{model}"),
    "S1 stray entry": ("s1", lambda d, ids: (d / "models" / "notes.txt").write_text("x"), "notes.txt"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_a_corrupt_data_dir_stops_the_start(good_dirs, tmp_path, case):
    root, model_id, other = good_dirs
    role, corrupt, named = CORRUPTIONS[case]
    data_dir = tmp_path / role
    shutil.copytree(root / role, data_dir)
    corrupt(data_dir, (model_id, other))
    with socket.socket() as s:  # a port nothing listens on: S1 must not need S2 to notice
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    args = ["--data-dir", str(data_dir), "--port", "0", "--quiet"] + (["--peer-url", closed] if role == "s1" else
                                                                       ["--key-bits", "1024"])
    env = {**os.environ, "HECNN_RANDOMNESS_POOL": "0",
           f"HECNN_{role.upper()}_CLOUD_TOKEN": "t" * 20, "HECNN_S1_OWNER_TOKEN": "o" * 20}
    done = subprocess.run([sys.executable, "-m", "he_cnn", "serve", role, *args], capture_output=True, text=True,
                          timeout=60, env=env)
    assert done.returncode == 1, done.stderr[-2000:]
    line = one_line_error(done.stderr)
    assert f"{role.upper()} cannot start" in line and named.format(model=model_id) in line, line
    assert "listening" not in done.stderr
    REPORT["faults: corrupt data-dir files refused at start"] += 1
