"""What the trust tests (``tests/test_trust_*.py``) share: a tiny model, real cloud processes, a relay
that can kill a cloud at a chosen protocol round, queries through the user's code path checked
against the plaintext reference, and S2's secrets with every form they could take in bytes.

The tiny model (8x8 input, one 3x3 convolution to 2 channels, ReLU, 2x2 max-pool, dense to 3
classes) makes a query over HTTP with 1024-bit keys take about a second, so fault, load and leakage
tests can run many of them. Cloud processes start with ``python -m he_cnn serve ...`` (the
``he-cnn`` command), tokens in the environment, and ``HECNN_RANDOMNESS_POOL=0`` so that idle clouds
do not fill randomness pools on the cores the tests need; an S2 that records every plaintext it obtains
starts with ``python tests/recording_s2.py`` (the same command with a recording key cloud).
"""
from __future__ import annotations

import json
import os
import re
import secrets
import signal
import socket
import threading
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from he_cnn.graph.integer_model import IntegerModel, infer_shapes_and_bounds
from he_cnn.graph.layers import Conv, Dense, Flatten, MaxPool, ReLU
from he_cnn.transport.http_channel import CloudPublicKey, fetch_public_key, http_request
from he_cnn.crypto.paillier import KeyPair
from he_cnn.graph.reference import classify_reference
from he_cnn.owner.pipeline import encrypt_for_upload, upload
from he_cnn.servers.launch import CloudProcess
from he_cnn.user.query import fetch_model_info, query_message, read_answer

#: ``he-cnn serve s2`` with every plaintext S2 obtains appended to a file (tests only)
RECORDING_S2 = Path(__file__).resolve().with_name("recording_s2.py")
TINY_SIZE = 8
TINY_CLASSES = ["a", "b", "c"]
#: what the trust tests measured, printed at the end of the run (tests/conftest.py)
REPORT: Counter[str] = Counter()


# -- the tiny model --------------------------------------------------------------------------------

def ints(values: Iterable[int], shape: Sequence[int]) -> np.ndarray:
    return np.array([int(v) for v in values], dtype=object).reshape(shape)


def tiny_model(seed: int = 0) -> IntegerModel:
    """conv 3x3 pad 1 (1 -> 2 channels) -> ReLU -> max-pool 2 -> flatten -> dense 3, on 1x8x8 in 0..15."""
    rng = np.random.default_rng(seed)
    flat = 2 * (TINY_SIZE // 2) ** 2
    layers = (
        Conv("conv", "input", "conv", ints(rng.integers(-7, 8, 18), (2, 1, 3, 3)), ints(rng.integers(-7, 8, 2), (2,)), 1, 1),
        ReLU("relu", "conv", "relu"),
        MaxPool("pool", "relu", "pool", 2, 2),
        Flatten("flat", "pool", "flat"),
        Dense("fc", "flat", "fc", ints(rng.integers(-7, 8, 3 * flat), (3, flat)), ints(rng.integers(-7, 8, 3), (3,))),
    )
    shape = (1, TINY_SIZE, TINY_SIZE)
    shapes, bounds = infer_shapes_and_bounds(layers, "input", shape, 15)
    return IntegerModel(layers, shape, 15, "input", "fc", 3, shapes, bounds, {"classes": list(TINY_CLASSES)})


def random_image(seed: int) -> np.ndarray:
    return ints(np.random.default_rng(seed).integers(0, 16, TINY_SIZE * TINY_SIZE), (1, TINY_SIZE, TINY_SIZE))


# -- cloud processes -------------------------------------------------------------------------------

class CloudPair:
    """S2 and S1 as processes on free ports, with fresh random tokens; logs collected for inspection.

    ``relay=True`` puts a :class:`RoundRelay` between S1 and S2 (S1's ``--peer-url`` is the relay), so a
    test can act at a chosen protocol round and restart S2 behind an unchanged URL. ``s2_record`` names a
    file to which S2 appends every plaintext it obtains (:func:`recording_s2`).
    """

    def __init__(self, root: Path, key_bits: int = 1024, s1_args: Sequence[str] = (), s2_args: Sequence[str] = (),
                 s2_env: dict[str, str] | None = None, relay: bool = False, s2_record: Path | None = None):
        self.root = root
        self.key_bits = key_bits
        self.s1_args = list(s1_args)
        self.s2_args = list(s2_args)
        self.s2_env = dict(s2_env or {})
        self.s2_record = s2_record
        self.cloud_token = secrets.token_urlsafe(24)
        self.owner_token = secrets.token_urlsafe(24)
        self.logs: list[str] = []
        self.s1: CloudProcess | None = None
        self.relay: RoundRelay | None = None
        try:
            self.s2 = self.start_s2()
            if relay:
                self.relay = RoundRelay(self.s2_url)
            self.s1 = self.start_s1()
        except BaseException:
            self.stop(check=False)
            raise

    @property
    def s2_url(self) -> str:
        return self.s2.url  # type: ignore[return-value]

    @property
    def s1_url(self) -> str:
        return self.s1.url  # type: ignore[union-attr,return-value]

    @property
    def s1_dir(self) -> Path:
        return self.root / "s1"

    @property
    def s2_dir(self) -> Path:
        return self.root / "s2"

    def env(self, **extra: str) -> dict[str, str]:
        return {"HECNN_RANDOMNESS_POOL": "0", **extra}

    def start_s2(self) -> CloudProcess:
        args = ["--data-dir", str(self.s2_dir), "--key-bits", str(self.key_bits), "--quiet", *self.s2_args]
        env = self.env(HECNN_S2_CLOUD_TOKEN=self.cloud_token, **self.s2_env)
        if self.s2_record is not None:
            s2: CloudProcess = recording_s2(self.s2_record, args, env, on_log=self.logs.append)
        else:
            s2 = CloudProcess("S2", args, env, on_log=self.logs.append)
        ready(s2)
        if self.relay is not None:
            self.relay.upstream = s2.url  # type: ignore[assignment]
        return s2

    def start_s1(self) -> CloudProcess:
        peer = self.relay.url if self.relay is not None else self.s2_url
        s1 = CloudProcess("S1", ["--data-dir", str(self.s1_dir), "--peer-url", peer, "--quiet", "--open", *self.s1_args],
                          self.env(HECNN_S1_CLOUD_TOKEN=self.cloud_token, HECNN_S1_OWNER_TOKEN=self.owner_token),
                          on_log=self.logs.append)
        return ready(s1)

    def restart_s2(self) -> None:
        self.s2.stop()
        self.s2 = self.start_s2()

    def restart_s1(self) -> None:
        if self.s1 is not None:
            self.s1.stop()
        self.s1 = self.start_s1()

    def cloud_key(self) -> CloudPublicKey:
        return fetch_public_key(self.s1_url, 10, peer="S1")[0]

    def upload(self, model: IntegerModel) -> str:
        """The owner's code path (encrypt under the key S1 relays, POST with the owner token); the model id."""
        body = encrypt_for_upload(model, self.cloud_key())
        return upload(self.s1_url, self.owner_token, body)["model_id"]

    def stop(self, check: bool = True) -> None:
        for cloud in (self.s1, self.s2 if hasattr(self, "s2") else None):
            if cloud is not None:
                cloud.stop()
        if self.relay is not None:
            self.relay.close()
        if check:
            text = "\n".join(self.logs)
            assert self.cloud_token not in text and self.owner_token not in text  # tokens are never logged
            assert "Traceback" not in text, text[-3000:]


def recording_s2(record: Path, args: Sequence[str], env: dict[str, str],
                 on_log: Callable[[str], None] | None = None) -> CloudProcess:
    """S2 started by ``tests/recording_s2.py``: ``he-cnn serve s2`` with the same ``args``, its key cloud
    appending every plaintext it obtains to ``record``."""
    return CloudProcess("S2", args, env, on_log=on_log, launcher=(str(RECORDING_S2), str(record)))


def ready(cloud: CloudProcess) -> CloudProcess:
    """Wait until ``cloud`` answers; stop it if it never does (no process outlives a failed test)."""
    try:
        cloud.wait_ready(60)
    except BaseException:
        cloud.stop()
        raise
    return cloud


def kill(process: CloudProcess, sig: int = signal.SIGKILL) -> None:
    """Send ``sig`` to a cloud process; for SIGKILL, wait until it is gone."""
    os.kill(process.process.pid, sig)
    if sig == signal.SIGKILL:
        process.process.wait(10)


# -- a relay that sees each protocol round --------------------------------------------------------

ROUND = re.compile(rb"POST /v1/rounds/([a-z_]+) HTTP/1\.[01]\r\n")


class RoundRelay:
    """A TCP relay in front of S2 that names each protocol round as it passes.

    ``on_request(step, index)`` runs before a round's request is passed on (index counts rounds from
    0 over the relay's life), ``on_response(step, index)`` when the first bytes of its answer pass
    back. A hook may kill either cloud: the relay then simply closes both connections, exactly what
    S1 would see if S2 died. ``upstream`` may change (S2 restarted on another port).
    """

    def __init__(self, upstream: str):
        self.upstream = upstream
        self.rounds: list[str] = []
        self.on_request: Callable[[str, int], None] | None = None
        self.on_response: Callable[[str, int], None] | None = None
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._server.getsockname()[1]}"
        self._closed = False
        threading.Thread(target=self._accept, name="relay-accept", daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        host, port = self.upstream.removeprefix("http://").split(":")
        try:
            upstream = socket.create_connection((host, int(port)), timeout=30)
        except OSError:
            client.close()
            return
        pending: list[tuple[str, int]] = []  # rounds sent on this connection whose answer has not started

        def forward_requests() -> None:
            tail = b""
            try:
                while data := client.recv(1 << 16):
                    seen = tail + data
                    for match in ROUND.finditer(seen):
                        if match.end() > len(tail):  # not counted with the previous chunk
                            step = match.group(1).decode()
                            with self._lock:
                                index = len(self.rounds)
                                self.rounds.append(step)
                            pending.append((step, index))
                            if self.on_request is not None:
                                self.on_request(step, index)
                    tail = seen[-64:]
                    upstream.sendall(data)
            except OSError:
                pass
            finally:
                _close(client, upstream)

        def forward_answers() -> None:
            try:
                while data := upstream.recv(1 << 16):
                    if pending and self.on_response is not None:
                        self.on_response(*pending.pop(0))
                    elif pending:
                        pending.pop(0)
                    client.sendall(data)
            except OSError:
                pass
            finally:
                _close(client, upstream)

        threading.Thread(target=forward_answers, daemon=True).start()
        forward_requests()

    def close(self) -> None:
        self._closed = True
        self._server.close()


def _close(*sockets: socket.socket) -> None:
    for s in sockets:
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        s.close()


# -- queries as the user makes them ----------------------------------------------------------------

def classify(s1_url: str, model_id: str, cloud_key: CloudPublicKey, user: KeyPair, pixels: np.ndarray,
             timeout: float = 120) -> tuple[list[int], dict, bytes]:
    """One query through the user's code path: the decrypted vector, S1's statistics, and the raw reply."""
    body = query_message(pixels, cloud_key, user)
    response = http_request("POST", f"{s1_url}/v1/models/{model_id}/classify", "S1", timeout, data=body)
    vector, meta = read_answer(response.content, fetch_model_info(s1_url, model_id), user)
    return vector, meta, response.content


def assert_exact(model: IntegerModel, pixels: np.ndarray, vector: list[int]) -> None:
    assert vector == [int(v) for v in classify_reference(model, pixels)]


# -- S2's secrets and where they must never appear ----------------------------------------------------

def s2_secrets(s2_dir: Path) -> dict[str, int]:
    """The secret numbers in S2's key file: Paillier p, q; DGK p, q and v_p."""
    doc = json.loads((s2_dir / "keys.json").read_text())
    dgk_n, dgk_p = int(doc["dgk"]["n"]), int(doc["dgk"]["p"])
    return {"paillier p": int(doc["paillier"]["p"]), "paillier q": int(doc["paillier"]["q"]),
            "dgk p": dgk_p, "dgk q": dgk_n // dgk_p, "dgk v_p": int(doc["dgk"]["v_p"])}


def byte_forms(value: int) -> dict[str, bytes]:
    """Every way a process could hold ``value``: decimal and hex text, big- and little-endian bytes (GMP
    keeps 64-bit limbs least significant first), and CPython's 30-bit digits in 32-bit words."""
    size = (value.bit_length() + 7) // 8
    digits, v = [], value
    while v:
        digits.append(v & (2**30 - 1))
        v >>= 30
    return {"decimal": str(value).encode(), "hex": format(value, "x").encode(), "HEX": format(value, "X").encode(),
            "big-endian": value.to_bytes(size, "big"), "little-endian": value.to_bytes(size, "little"),
            "cpython digits": b"".join(d.to_bytes(4, "little") for d in digits)}


class SecretScanner:
    """Finds any of S2's secrets, in any of their byte forms, in a buffer (one regex pass over 16-byte
    prefixes, then a full comparison at each hit: memory scans stay at a few hundred MB/s)."""

    def __init__(self, secrets_: dict[str, int]):
        self.patterns = {f"{name} ({form})": pattern for name, value in secrets_.items()
                         for form, pattern in byte_forms(value).items()}
        self._prefixes = re.compile(b"|".join(re.escape(p[:16]) for p in set(self.patterns.values())))

    def find(self, data: bytes) -> set[str]:
        found = set()
        for match in self._prefixes.finditer(data):
            found.update(name for name, pattern in self.patterns.items()
                         if data.startswith(pattern, match.start()))
        return found


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (S1's worker processes)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    tree, stack = [], [pid]
    while stack:
        p = stack.pop()
        tree.append(p)
        stack.extend(children.get(p, []))
    return tree


def process_memory(pid: int) -> Iterable[bytes]:
    """Every readable, writable region of a process's memory (heap, stacks, anonymous maps): where
    data it computed or received lives; read-only file maps (library code) are skipped."""
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            fields = line.split()
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if not fields[1].startswith("rw"):
                continue
            try:
                mem.seek(start)
                yield mem.read(end - start)
            except (OSError, OverflowError, ValueError):
                continue
