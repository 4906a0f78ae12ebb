"""Starting a cloud as a separate process, the way an operator would, and stopping it cleanly.

:class:`CloudProcess` runs ``python -m he_cnn serve s1|s2 --port 0 ...`` (tokens passed through the
environment, never on the command line), reads its stderr until the ``... listening on http://...``
line (or ``https://``) to learn the URL, and forwards the rest of its log (to a callback, e.g. our stderr).
Over HTTPS the readiness check trusts ``tls_ca`` and, for an S2 that requires client certificates,
presents ``client_cert``. ``stop``
sends SIGTERM and waits, killing only if the process does not exit in time. Used by ``he-cnn demo``
and by the end-to-end tests.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Callable, Sequence

import requests

from he_cnn.errors import HECNNError, PeerUnavailable
from he_cnn.transport.http_channel import tls_options

LISTENING = re.compile(r"^(S1|S2) listening on (https?://\S+)\s*$")
STOP_TIMEOUT = 15.0


class CloudStartError(HECNNError):
    """A cloud process exited or stayed silent instead of listening."""

    code = "cloud_start_error"


class CloudProcess:
    """One cloud (S1 or S2) running as a child process: ``he-cnn serve <role> --port 0 <args>``, or
    ``<launcher> <role> --port 0 <args>`` where a caller runs the same command through a program of
    its own (the tests' recording S2)."""

    def __init__(self, role: str, args: Sequence[str], env: dict[str, str],
                 on_log: Callable[[str], None] | None = None, cwd: Path | None = None,
                 launcher: Sequence[str] = ("-m", "he_cnn", "serve"), tls_ca: str | Path | None = None,
                 client_cert: tuple[str | Path, str | Path] | None = None):
        self.role = role.upper()
        #: requests' keywords for the health check over HTTPS
        self._tls = tls_options(str(tls_ca) if tls_ca else None,
                                (str(client_cert[0]), str(client_cert[1])) if client_cert else None)
        self.url: str | None = None
        self._listening = threading.Event()
        self._tail: deque[str] = deque(maxlen=20)
        self._on_log = on_log
        command = [sys.executable, *launcher, self.role.lower(), "--port", "0", *args]
        self.process = subprocess.Popen(command, env={**os.environ, **env}, cwd=cwd, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, bufsize=1)
        self._reader = threading.Thread(target=self._read_log, name=f"{self.role}-log", daemon=True)
        self._reader.start()

    def _read_log(self) -> None:
        assert self.process.stderr is not None  # stderr=PIPE above
        for line in self.process.stderr:
            line = line.rstrip("\n")
            self._tail.append(line)
            match = LISTENING.match(line)
            if match and not self._listening.is_set():
                self.url = match.group(2)
                self._listening.set()
            elif self._on_log is not None:
                self._on_log(f"[{self.role}] {line}")

    def wait_ready(self, timeout: float = 120.0) -> str:
        """Block until the cloud listens and answers ``/v1/health``; its base URL."""
        deadline = time.monotonic() + timeout
        while not self._listening.wait(0.1):
            if self.process.poll() is not None:
                self._reader.join(timeout=2)
                raise CloudStartError(f"{self.role} exited with status {self.process.returncode} before listening: "
                                      + " | ".join(self._tail))
            if time.monotonic() > deadline:
                raise CloudStartError(f"{self.role} did not start listening within {timeout:g} s")
        assert self.url is not None  # set together with the event
        while True:
            try:
                if requests.get(self.url + "/v1/health", timeout=5, **self._tls).status_code == 200:  # type: ignore[arg-type]
                    return self.url
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise PeerUnavailable(f"{self.role} at {self.url} listens but does not answer /v1/health")
            time.sleep(0.2)

    @property
    def log_tail(self) -> list[str]:
        return list(self._tail)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM, wait, SIGKILL if needed; the exit status."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        self._reader.join(timeout=2)
        return self.process.returncode

    def __enter__(self) -> "CloudProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_offline(urls: Sequence[str], timeout: float, prepared: bool = False, tls_ca: str | None = None,
                 client_cert: tuple[str, str] | None = None) -> tuple[float, bool]:
    """Wait until every cloud at ``urls`` reports full randomness pools (and, with ``prepared``, S1 a
    prepared query): the offline phase a running service does between requests. Returns the seconds
    waited and whether it finished within ``timeout``. Health checks are GETs, which the pool fillers
    do not count as activity, so polling does not hold them back. ``tls_ca`` / ``client_cert`` as for
    :class:`CloudProcess`."""
    started = time.monotonic()
    tls = tls_options(tls_ca, client_cert)
    while True:
        states = [requests.get(f"{u.rstrip('/')}/v1/health", timeout=30, **tls).json()  # type: ignore[arg-type]
                  for u in urls]
        done = all((st.get("pools") or {"full": True})["full"] and (not prepared or st.get("prepared", 1) >= 1)
                   for st in states)
        waited = time.monotonic() - started
        if done or waited >= timeout:
            return waited, done
        time.sleep(0.5)
