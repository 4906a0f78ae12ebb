"""Each cloud on a Ray cluster of its own (:mod:`he_cnn.ray_workers`), on real local clusters.

Two clusters are started for the module, one per cloud, each of two ``ray start`` nodes with one CPU
(four Ray nodes on this machine, each cloud's work spread over two). In process, the protocols run
exactly with either cloud's work on its cluster, and what is submitted to Ray is inspected: S2's
tasks carry the key's id, never the key, and S1's cluster never sees S2's key. Over HTTP, S1 and S2
are started with ``he-cnn serve ... --ray-address``: an exact 1024-bit query, S2's actors killed during
a query (a clean 503, then an exact answer), a cloud refused on the other cloud's cluster, and one
exact query at 2048 bits.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import pytest
import requests

from he_cnn.errors import WorkersUnavailable
from he_cnn.graph.integer_model import load_integer_model
from he_cnn.graph.reference import classify_reference
from he_cnn.images import load_image_file, quantize_image
from he_cnn.parties.key_cloud import KeyCloud
from he_cnn.protocols.common import COMPARISONS, S1Context
from he_cnn.servers.s2 import KEY_FILE, load_or_create_key_cloud, load_worker_key
from he_cnn.transport.channel import InProcessChannel

from test_e2e import Clouds, query_and_check, saved_model, test_images, upload  # noqa: F401 (fixtures)
from test_protocols import exercise_protocols

ray = pytest.importorskip("ray")
from he_cnn.ray_workers import RayWorkers, local_cluster  # noqa: E402 (after the skip)

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def clusters():
    """{"S1": address, "S2": address}: two local Ray clusters of two one-CPU nodes each. Their temp dirs
    are short (Ray's Unix socket paths must stay under 108 bytes)."""
    root = Path(tempfile.mkdtemp(prefix="hcr", dir="/tmp"))
    try:
        with ExitStack() as stack:
            addresses = {role: stack.enter_context(local_cluster(2, 1, _free_port(), root / role.lower()))
                         for role in ("S1", "S2")}
            yield addresses
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _key_material(cloud: KeyCloud) -> list[bytes]:
    """S2's secrets as they could appear in a payload: big- and little-endian bytes and decimal text."""
    secrets = [cloud.keys.private.p, cloud.keys.private.q, cloud.dgk_private.p, cloud.dgk_private.v_p]
    out = []
    for value in map(int, secrets):
        size = (value.bit_length() + 7) // 8
        out += [value.to_bytes(size, "big"), value.to_bytes(size, "little"), str(value).encode()]
    return out


def _assert_no_key(payloads: list[tuple[str, bytes]], cloud: KeyCloud) -> None:
    material = _key_material(cloud)
    for what, payload in payloads:
        assert not any(m in payload for m in material), f"S2 key material in a {what} payload"


def test_s2_key_is_loaded_by_its_actors_and_never_sent(clusters, tmp_path, keys1024):
    """S2's keyed work (decryptions, zero tests) runs on S2's actors, exactly; every payload submitted
    to Ray -- the actor creation and each task -- is free of S2's primes in any encoding."""
    cloud = load_or_create_key_cloud(tmp_path / "s2", 1024)
    payloads: list[tuple[str, bytes]] = []
    workers = RayWorkers(clusters["S2"], "s2", key_loader=(load_worker_key, str(tmp_path / "s2" / KEY_FILE)),
                         key_id=cloud.keys.public.key_id, observer=lambda what, p: payloads.append((what, p)))
    try:
        assert workers.count == 2 and workers.nodes == 2
        cloud.workers = workers
        for comparison in COMPARISONS:
            ctx = S1Context(cloud.keys.public, cloud.dgk_public, InProcessChannel(cloud.handle), comparison=comparison)
            exercise_protocols(ctx, cloud.keys.private)
    finally:
        workers.shutdown()
    kinds = {what for what, _ in payloads}
    assert {"create", "run_keyed"} <= kinds, kinds  # the keyed work did go to the cluster
    assert str(tmp_path / "s2" / KEY_FILE).encode() in payloads[0][1]  # the actors got the path ...
    _assert_no_key(payloads, cloud)  # ... and never the key


def test_s1_cluster_never_sees_s2_key(clusters, keys1024):
    """S1's work on S1's cluster gives the same exact results; its actors hold no key, and nothing S1
    submits carries S2's secrets. A keyed call on S1's workers is refused."""
    cloud = KeyCloud.create(keys1024)  # S2 in process, inline
    payloads: list[tuple[str, bytes]] = []
    workers = RayWorkers(clusters["S1"], "s1", observer=lambda what, p: payloads.append((what, p)))
    try:
        for comparison in COMPARISONS:
            ctx = S1Context(keys1024.public, cloud.dgk_public, InProcessChannel(cloud.handle), workers=workers,
                            comparison=comparison)
            exercise_protocols(ctx, keys1024.private)
        with pytest.raises(WorkersUnavailable, match="holds no key"):
            workers.map_keyed(pow, [(2,), (3,)], cloud.worker_key)
    finally:
        workers.shutdown()
    assert "run" in {what for what, _ in payloads}
    _assert_no_key(payloads, cloud)


class RayClouds(Clouds):
    """S2 and S1 as ``he-cnn serve`` processes, each with ``--ray-address`` of its own cluster."""

    def __init__(self, root: Path, key_bits: int, clusters: dict[str, str]):
        self.clusters = clusters
        super().__init__(root, key_bits)

    def _start(self, role, args, env):
        return super()._start(role, [*args, "--ray-address", self.clusters[role]], env)


def _s2_actor_pids(address: str) -> list[int]:
    """The processes of the ``_Worker`` actors on the cluster at ``address``: children of its raylets."""
    gcs = b"--gcs-address="
    port = address.rsplit(":", 1)[1].encode()
    raylets, children = set(), {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (entry / "cmdline").read_bytes()
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if b"/raylet\0" in cmdline.split(b"--", 1)[0] + b"\0" and any(
                part.startswith(gcs) and part.endswith(b":" + port) for part in cmdline.split(b"\0")):
            raylets.add(int(entry.name))
        if cmdline.startswith(b"ray::_Worker"):
            children[int(entry.name)] = ppid
    return [pid for pid, parent in children.items() if parent in raylets]


def _reference(model_path: Path, image: Path) -> list[int]:
    model = load_integer_model(model_path)
    pixels = quantize_image(load_image_file(image, model.input_shape[1]), model.input_max)
    return [int(v) for v in classify_reference(model, pixels)]


def _user_query(clouds: Clouds, model_id: str, key: Path, image: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "he_cnn", "user", "query", "--s1", clouds.s1_url, "--model",
                           model_id, "--key", str(key), "--json", "--no-progress", str(image)],
                          capture_output=True, text=True, timeout=600)


def test_each_cloud_on_its_cluster_exact_and_survives_dead_actors(clusters, tmp_path, saved_model, test_images):
    clouds = RayClouds(tmp_path, 1024, clusters)
    try:
        health = requests.get(clouds.s2_url + "/v1/health", timeout=10).json()
        assert health["status"] == "ok"
        model_id = upload(clouds, saved_model)
        key = tmp_path / "user" / "me.key"
        subprocess.run([sys.executable, "-m", "he_cnn", "user", "keygen", "--out", str(key), "--bits", "1024"],
                       check=True, capture_output=True)
        query_and_check(clouds, model_id, key, test_images[0], saved_model)

        # S2's actors killed again and again while a query runs: that query fails cleanly (or, if no task was
        # in flight at a kill, is answered exactly after the restart) -- never a wrong vector
        actors = _s2_actor_pids(clusters["S2"])
        assert len(actors) == 2, actors
        done: dict = {}
        query = threading.Thread(target=lambda: done.update(r=_user_query(clouds, model_id, key, test_images[1])))
        query.start()
        deadline = time.monotonic() + 120
        killed = 0
        while query.is_alive() and time.monotonic() < deadline:
            for pid in _s2_actor_pids(clusters["S2"]):
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed += 1
                except ProcessLookupError:
                    pass
            time.sleep(0.3)
        query.join(timeout=600)
        result = done["r"]
        assert killed >= 2 and "Traceback" not in result.stderr
        if result.returncode != 0:
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1 and "worker" in lines[0] and "retry" in lines[0], result.stderr
        else:
            assert json.loads(result.stdout)["results"][0]["vector"] == _reference(saved_model, test_images[1])
        # Ray restarts the actors (each reloads the key from S2's data directory); the next query is exact
        query_and_check(clouds, model_id, key, test_images[1], saved_model)

        # a cloud is refused on the other cloud's cluster (S1 holds its claim now)
        refused = subprocess.run([sys.executable, "-m", "he_cnn", "serve", "s2", "--port", "0", "--data-dir",
                                  str(tmp_path / "s2-wrong"), "--key-bits", "1024", "--ray-address", clusters["S1"],
                                  "--quiet"],
                                 capture_output=True, text=True, timeout=180,
                                 env={**os.environ, "HECNN_S2_CLOUD_TOKEN": "x" * 24})
        assert refused.returncode != 0 and "Traceback" not in refused.stderr
        assert "already serves S1" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    finally:
        clouds.stop()


def test_ray_backend_exact_at_2048_bits(clusters, tmp_path, saved_model, test_images):
    clouds = RayClouds(tmp_path, 2048, clusters)
    try:
        model_id = upload(clouds, saved_model)
        key = tmp_path / "user" / "me.key"
        subprocess.run([sys.executable, "-m", "he_cnn", "user", "keygen", "--out", str(key)], check=True,
                       capture_output=True)
        query_and_check(clouds, model_id, key, test_images[0], saved_model)
    finally:
        clouds.stop()
