"""Fail fast and speak plainly: the commands find out what is wrong before they do expensive work, and
say it in one line that names the cloud that failed and what to do.

- ``he-cnn owner upload`` asks S1 first: a wrong owner token, a dead S1, or an S2 that S1 cannot reach
  end the command in seconds, before any training or encrypting;
- a transport failure (refused, closed, unknown host, bad URL) is one sentence naming the cloud and its
  URL, never ``('Connection aborted.', RemoteDisconnected(...))``; when S2 fails behind S1, the user
  reads that S1 could not reach its partner cloud, and what to do;
- ``he-cnn serve`` on a busy port is one line and exit status 1, and creates no data directory;
- progress bars are drawn only on a terminal (and never with ``--quiet``).

Real processes for the clouds (``python -m he_cnn serve``) and for the commands whose stderr must not
be a terminal; the tiny model of the trust tests and 1024-bit keys keep the file under a minute.
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from click.testing import CliRunner

from he_cnn.errors import PeerUnavailable
from he_cnn.graph.integer_model import save_integer_model
from he_cnn.servers.cli import main
from he_cnn.servers.launch import CloudProcess
from he_cnn.transport.http_channel import http_request
from he_cnn.user.keys import create_user_key

from trust_support import TINY_SIZE, CloudPair, ready, tiny_model

#: what a tqdm bar leaves in a stream: carriage-return redraws, the bar's blocks, a rate
BAR_MARKS = re.compile(r"\r|█|\|\s*\d+/\d+|\d+(\.\d+)?(it|ct|image)/s")
GOOD_OWNER_TOKEN = "o" * 24
CLOUD_TOKEN = "c" * 24


def he_cnn(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """The ``he-cnn`` command as a process of its own: stdout and stderr are pipes, not a terminal."""
    return subprocess.run([sys.executable, "-m", "he_cnn", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "HECNN_RANDOMNESS_POOL": "0", **(env or {})}, stdin=subprocess.DEVNULL)


def error_line(stderr: str, *fragments: str) -> str:
    """The one ``Error:`` line of a failed command, which contains every fragment."""
    lines = [line for line in stderr.splitlines() if line.startswith("Error: ")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def runner_error(result, *fragments: str) -> str:
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return error_line(result.stderr, *fragments)


# -- the owner asks S1 before it trains ---------------------------------------------------------------

@pytest.fixture(scope="module")
def lone_s1(tmp_path_factory):
    """S1 alone: its S2 is a closed port, so it has no cloud key (it still answers and checks tokens)."""
    s1 = CloudProcess("S1", ["--data-dir", str(tmp_path_factory.mktemp("lone") / "s1"), "--peer-url", closed_port_url(),
                             "--quiet", "--no-precompute", "--open"],
                      {"HECNN_RANDOMNESS_POOL": "0", "HECNN_S1_CLOUD_TOKEN": CLOUD_TOKEN,
                       "HECNN_S1_OWNER_TOKEN": GOOD_OWNER_TOKEN})
    yield ready(s1)
    s1.stop()


def test_a_wrong_owner_token_ends_the_upload_before_any_training(lone_s1):
    started = time.monotonic()
    done = he_cnn("owner", "upload", "--s1", lone_s1.url, env={"HECNN_OWNER_TOKEN": "w" * 24})
    seconds = time.monotonic() - started
    assert done.returncode == 1 and done.stdout == ""
    error_line(done.stderr, "S1 at " + lone_s1.url, "refused the owner token", "wrong owner token", "HECNN_OWNER_TOKEN")
    assert "training" not in done.stderr and "encrypting" not in done.stderr
    assert seconds < 10, f"{seconds:.1f} s: the token is checked first"


def test_an_s2_that_s1_cannot_reach_ends_the_upload_before_any_training(lone_s1):
    done = he_cnn("owner", "upload", "--s1", lone_s1.url, env={"HECNN_OWNER_TOKEN": GOOD_OWNER_TOKEN})
    assert done.returncode == 1 and done.stdout == ""
    line = error_line(done.stderr, "S1 could not reach its partner cloud", "S2 at http://127.0.0.1:",
                      "connection refused", "try again later")
    assert "training" not in done.stderr and "peer_unavailable" not in line


@pytest.mark.parametrize("url, says", [
    (closed_port_url(), "is unreachable: connection refused"),
    ("http://no-such-host.invalid:8601", "unknown host name"),
    ("htp://127.0.0.1:8601", "is not valid"),
])
def test_an_unreachable_s1_is_one_line_naming_s1_and_its_url(url, says):
    result = CliRunner().invoke(main, ["owner", "upload", "--s1", url], env={"HECNN_OWNER_TOKEN": GOOD_OWNER_TOKEN})
    line = runner_error(result, "S1", url, says)
    assert "training" not in result.stderr and "Errno" not in line and "Max retries" not in line


def test_a_user_query_whose_s1_is_unreachable_is_one_sentence(tmp_path):
    key = tmp_path / "me.key"
    create_user_key(key, 1024)
    image = tmp_path / "x.npy"
    np.save(image, np.zeros((TINY_SIZE, TINY_SIZE)))
    url = closed_port_url()
    result = CliRunner().invoke(main, ["user", "query", "--s1", url, "--model", "0" * 16, "--key", str(key),
                                       str(image)])
    line = runner_error(result, f"S1 at {url} is unreachable: connection refused", "is S1 running")
    assert "HTTPConnectionPool" not in line and "Errno" not in line


# -- serve checks its port first ------------------------------------------------------------------

@pytest.mark.parametrize("role", ["s1", "s2"])
def test_serve_on_a_busy_port_is_one_line_and_leaves_no_data_directory(tmp_path, role):
    data_dir = tmp_path / "fresh"
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        extra = ["--peer-url", closed_port_url()] if role == "s1" else ["--key-bits", "1024"]
        result = CliRunner().invoke(main, ["serve", role, "--port", str(port), "--data-dir", str(data_dir),
                                           "--quiet", *extra],
                                    env={f"HECNN_{role.upper()}_CLOUD_TOKEN": CLOUD_TOKEN,
                                         "HECNN_S1_OWNER_TOKEN": GOOD_OWNER_TOKEN})
    runner_error(result, f"{role.upper()} cannot listen on 127.0.0.1:{port}", "in use")
    assert not data_dir.exists()


# -- both clouds: no bars without a terminal, and S2 failing behind S1 ----------------------------

@pytest.fixture(scope="module")
def clouds(tmp_path_factory):
    """S2 and S1 (through a relay, so S2 can stop and come back behind one URL), the tiny model uploaded,
    a user key and an image for it."""
    root = tmp_path_factory.mktemp("clouds")
    pair = CloudPair(root, 1024, s1_args=["--no-precompute"], relay=True)
    try:
        model_path = root / "tiny.json"
        save_integer_model(tiny_model(), model_path)
        model_id = pair.upload(tiny_model())
        key = root / "me.key"
        create_user_key(key, 1024)
        image = root / "digit.npy"
        np.save(image, np.arange(TINY_SIZE * TINY_SIZE).reshape(TINY_SIZE, TINY_SIZE) % 16)
        yield pair, model_path, model_id, key, image
    finally:
        pair.stop()


def test_owner_upload_draws_no_bar_when_stderr_is_not_a_terminal(clouds):
    pair, model_path, _, _, _ = clouds
    env = {"HECNN_OWNER_TOKEN": pair.owner_token}
    done = he_cnn("owner", "upload", "--s1", pair.s1_url, "--model", str(model_path), env=env)
    assert done.returncode == 0, done.stderr
    assert "model id:" in done.stdout and "encrypted in" in done.stderr  # notes still come
    assert not BAR_MARKS.search(done.stderr) and "encrypting weights" not in done.stderr, done.stderr
    quiet = he_cnn("owner", "upload", "--s1", pair.s1_url, "--model", str(model_path), "--quiet", env=env)
    assert quiet.returncode == 0 and "model id:" in quiet.stdout and quiet.stderr == "", quiet.stderr


def test_user_query_draws_a_bar_only_on_a_terminal_or_when_asked(clouds):
    pair, _, model_id, key, image = clouds
    query = ["user", "query", "--s1", pair.s1_url, "--model", model_id, "--key", str(key)]
    plain = he_cnn(*query, str(image))
    assert plain.returncode == 0 and "class " in plain.stdout, plain.stderr
    assert plain.stderr == ""
    asked = he_cnn(*query, "--progress", str(image))  # the detector sees a bar when there is one
    assert asked.returncode == 0 and BAR_MARKS.search(asked.stderr) and "classifying" in asked.stderr
    quiet = he_cnn(*query, "--progress", "--quiet", str(image))
    assert quiet.returncode == 0 and quiet.stderr == ""


def test_s2_failing_behind_s1_is_said_plainly_to_the_user(clouds):
    """S2 stops; the relay then closes S1's connection at once, as a dying S2 does (the issue's
    ``RemoteDisconnected``): the user reads which cloud failed and what to do."""
    pair, _, model_id, key, image = clouds
    pair.s2.stop()
    try:
        done = he_cnn("user", "query", "--s1", pair.s1_url, "--model", model_id, "--key", str(key), str(image))
        assert done.returncode == 1 and done.stdout == ""
        line = error_line(done.stderr, "S1 could not reach its partner cloud", f"S2 at {pair.relay.url}",
                          "closed the connection without answering", "try again later")
        assert "RemoteDisconnected" not in line and "Connection aborted" not in line and "('" not in line
    finally:
        pair.restart_s2()


# -- each way a connection fails, in words --------------------------------------------------------

def _one_shot_server(behaviour: str) -> str:
    """A socket server for one connection that stays silent, closes at once, or answers TLS with plain text."""
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        with server:
            client, _ = server.accept()
            with client:
                client.recv(1 << 16)
                if behaviour == "silent":
                    client.recv(1 << 16)  # until the client gives up
                elif behaviour == "plain text":
                    client.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    threading.Thread(target=serve, daemon=True).start()
    return f"127.0.0.1:{server.getsockname()[1]}"


@pytest.mark.parametrize("behaviour, scheme, says", [
    ("silent", "http", "did not answer within 0.5 s"),
    ("closes", "http", "is unreachable: it closed the connection without answering (did S2 stop or restart?)"),
    ("plain text", "https", "is unreachable: the TLS handshake failed"),
])
def test_each_transport_failure_is_one_plain_sentence(behaviour, scheme, says):
    url = f"{scheme}://{_one_shot_server(behaviour)}"
    with pytest.raises(PeerUnavailable) as failed:
        http_request("GET", url + "/v1/health", "S2", 0.5)
    message = str(failed.value)
    assert message.startswith(f"S2 at {url} ") and says in message, message
    assert "\n" not in message and "HTTPConnectionPool" not in message and "Max retries" not in message
