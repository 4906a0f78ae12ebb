"""Each cloud's heavy work on a Ray cluster of its own: :class:`RayWorkers`, the Ray side of the executor seam.

A cloud started with ``--ray-address`` connects to a Ray cluster (``ray start`` on each of its
machines) and runs the chunks of every protocol step (:mod:`he_cnn.parallel`) on long-lived actors,
one per CPU of the cluster, instead of a local process pool. Nothing else changes: the protocol code
calls the same ``map``, ``map_keyed`` and ``submit``, and the cloud's per-query state (S2's tickets and
model set-ups, S1's offline phase) stays in the cloud's own process, the Ray driver; actors are
stateless apart from S2's key.

Key custody. S2's actors each load S2's secret key once, when they start, from S2's key file
(``key_source``: a path that must exist on every node of S2's cluster: a shared data directory, or
the file provisioned to each node like a TLS key). A task carries the key's id only, never the key,
and actor-creation arguments carry the path only -- the key never crosses the cluster's network, and
Ray's control store (GCS), which keeps actor-creation arguments for restarts, never holds it. Loading
from the file was chosen over sending the key once to each actor because a method argument still
crosses the network in clear unless the operator turned on Ray's TLS, and the file is where S2's
key lives anyway. An actor that dies is restarted by Ray (``max_restarts=-1``) and reloads the key.

Separation. Each cloud claims its cluster by a named actor (``CLAIM_NAME`` in namespace ``NAMESPACE``)
holding its role; a cloud refuses a cluster claimed for the other role, so S1's cluster can never run
S2's keyed work or hold S2's key, and the two clouds never share one.

Failures. A task whose function raised re-raises the same error in the cloud, as with the local pool.
A dead actor, a lost node or a task past ``task_timeout`` ends the request with
:class:`~he_cnn.errors.WorkersUnavailable` (503): the request is abandoned whole, and the next one
runs on the restarted actor.

Ray is an optional dependency (``pip install he-cnn[ray]``); this module imports it only when a
:class:`RayWorkers` is made.
"""
from __future__ import annotations

import itertools
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from he_cnn.errors import BadRequest, WorkersUnavailable
from he_cnn.parallel import WorkerKey, Workers

log = logging.getLogger("he_cnn.ray")

#: the Ray namespace of he-cnn's actors
NAMESPACE = "he-cnn"
#: the named actor by which a cloud claims its cluster
CLAIM_NAME = "he-cnn-cloud"
#: a task should hold at least this much work: an actor call costs ~1 ms on one host, more across hosts
RAY_MIN_TASK_SECONDS = 0.02
#: seconds a request waits for its tasks before it is abandoned with WorkersUnavailable
TASK_TIMEOUT = 600.0

#: (function that loads a key, its argument): how S2's actors obtain the key (module-level function,
#: pickled by reference, so the actor imports it rather than receiving code)
KeyLoader = tuple[Callable[[str], WorkerKey], str]
#: hears every payload sent to the cluster: (what it is, the bytes) -- tests inspect it for key material
Observer = Callable[[str, bytes], None]


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as e:
        raise BadRequest("the Ray backend needs the ray package: pip install 'he-cnn[ray]'") from e
    return ray


def head_address(address: str) -> tuple[str, int] | None:
    """The (host, port) of a cluster's head in ``--ray-address`` (``HOST:PORT``, ``ray://`` allowed), or None
    for "auto" (resolved by Ray itself, from the cluster started on this machine); BadRequest otherwise."""
    if address == "auto":
        return None
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise BadRequest(f"--ray-address must be 'auto' or HOST:PORT of the cluster's head, got {address!r}")
    return host.strip("[]"), int(port)


def _probe(address: str, timeout: float = 5.0) -> None:
    """Fail fast on an address nothing listens at: ``ray.init`` retries an unreachable one for minutes."""
    head = head_address(address)
    if head is None:
        return
    try:
        socket.create_connection(head, timeout=timeout).close()
    except OSError as e:
        raise WorkersUnavailable(f"cannot reach the Ray cluster at {address}: {e.strerror or e}") from e


class _Claim:
    """The named actor that says which cloud a cluster belongs to."""

    def __init__(self, role: str):
        self.role = role

    def get_role(self) -> str:
        return self.role


class _Worker:
    """One long-lived actor: runs pickled chunk functions; S2's also hold S2's key, loaded once here."""

    def __init__(self, key_loader: KeyLoader | None):
        self._key = key_loader[0](key_loader[1]) if key_loader is not None else None

    def ready(self) -> tuple[str | None, int, str]:
        """(id of the key held or None, the process id, the node's address)."""
        import ray

        return (self._key.key_id if self._key is not None else None, os.getpid(),
                ray.get_runtime_context().get_node_id())

    def run(self, payload: bytes) -> Any:
        fn, args = pickle.loads(payload)
        return fn(*args)

    def run_keyed(self, payload: bytes) -> Any:
        fn, key_id, args = pickle.loads(payload)
        if self._key is None or self._key.key_id != key_id:
            held = self._key.key_id if self._key is not None else "no key"
            raise WorkersUnavailable(f"a Ray worker holds {held}, not the key {key_id} this cloud serves")
        return fn(self._key, *args)


class RayWorkers(Workers):
    """The executor seam on a Ray cluster: ``count`` actors (one per CPU of the cluster at start).

    ``role`` is the cloud ("s1" or "s2"); ``key_loader`` makes the actors load S2's key
    (:func:`he_cnn.servers.s2.load_worker_key`, the key file's path) and ``key_id`` is the key they must
    hold. ``observer`` hears each payload submitted (tests).
    """

    min_task_seconds = RAY_MIN_TASK_SECONDS
    chunks_per_worker = 2  # evens out nodes of unequal speed and an actor that is being restarted

    def __init__(self, address: str, role: str, key_loader: KeyLoader | None = None, key_id: str | None = None,
                 observer: Observer | None = None, task_timeout: float = TASK_TIMEOUT):
        ray = _import_ray()
        self._ray = ray
        self.role = role
        self.observer = observer
        self.task_timeout = task_timeout
        _probe(address)
        try:
            ray.init(address=address, namespace=NAMESPACE, log_to_driver=False, logging_level=logging.WARNING,
                     configure_logging=False)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise WorkersUnavailable(f"cannot connect to the Ray cluster at {address!r}: {e}") from e
        try:
            self._claim(role)
            cpus = int(ray.cluster_resources().get("CPU", 0))
            if cpus < 1:
                raise WorkersUnavailable(f"the Ray cluster at {address!r} offers no CPU")
            self._observe("create", pickle.dumps(key_loader))
            actor = ray.remote(_Worker).options(num_cpus=1, max_restarts=-1, max_task_retries=0)
            self._actors = [actor.remote(key_loader) for _ in range(cpus)]
            held = self._get([a.ready.remote() for a in self._actors], timeout=120.0)
        except BaseException:
            ray.shutdown()
            raise
        if any(h[0] != key_id for h in held):
            ray.shutdown()
            raise WorkersUnavailable(f"the Ray workers hold keys {sorted({str(h[0]) for h in held})}, expected {key_id}")
        super().__init__(cpus)
        self.nodes = len({h[2] for h in held})
        self._next = itertools.count()
        self._closed = False
        log.info("%s runs its workers on %d Ray actors on %d nodes", role.upper(), cpus, self.nodes)

    def __repr__(self) -> str:
        return f"RayWorkers(role={self.role!r}, count={self.count})"

    def _claim(self, role: str) -> None:
        ray = self._ray
        claim = ray.remote(_Claim).options(name=CLAIM_NAME, get_if_exists=True, num_cpus=0).remote(role)
        held = self._get([claim.get_role.remote()], timeout=60.0)[0]
        if held != role:
            raise WorkersUnavailable(f"this Ray cluster already serves {held.upper()}; each cloud needs a Ray "
                                     f"cluster of its own (start another with 'ray start --head')")
        self._claim_actor = claim  # held: the claim lives as long as this driver

    def _observe(self, what: str, payload: bytes) -> None:
        if self.observer is not None:
            self.observer(what, payload)

    def _get(self, refs: list, timeout: float | None = None) -> list:
        ray = self._ray
        try:
            return ray.get(refs, timeout=self.task_timeout if timeout is None else timeout)
        except ray.exceptions.RayTaskError as e:
            cause = getattr(e, "cause", None)
            if isinstance(cause, Exception):  # the function raised: the same error as with the local pool
                raise cause from None
            raise WorkersUnavailable(f"a Ray task failed: {e}") from e
        except ray.exceptions.RayError as e:
            raise WorkersUnavailable(f"a Ray worker was lost during this request ({type(e).__name__}); the "
                                     "request was abandoned: retry") from e

    def _send(self, method: str, payloads: Sequence[bytes]) -> list:
        if self._closed:
            raise RuntimeError("the Ray workers were shut down")
        refs = []
        for payload in payloads:
            self._observe(method, payload)
            actor = self._actors[next(self._next) % len(self._actors)]
            refs.append(getattr(actor, method).remote(payload))
        return refs

    def map(self, fn: Callable[..., Any], calls: Sequence[tuple]) -> list[Any]:
        if len(calls) <= 1 and not self._closed:
            return [fn(*args) for args in calls]  # one chunk: no hop (as the local pool)
        return self._get(self._send("run", [pickle.dumps((fn, tuple(args))) for args in calls]))

    def map_keyed(self, fn: Callable[..., Any], calls: Sequence[tuple], key: WorkerKey) -> list[Any]:
        """fn(key, *args) on actors holding the key themselves: only ``key.key_id`` is sent, even for one call."""
        return self._get(self._send("run_keyed", [pickle.dumps((fn, key.key_id, tuple(args))) for args in calls]))

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        """A future of fn(*args) on an actor; its failure is the error :meth:`map` would raise."""
        ref = self._send("run", [pickle.dumps((fn, args))])[0]
        result: Future = Future()

        def settle(_: Future) -> None:
            try:  # the ref is ready: ray.get returns its value or raises its error at once
                result.set_result(self._get([ref], timeout=10.0)[0])
            except BaseException as e:  # noqa: BLE001 -- handed to the caller through the future
                result.set_exception(e)

        ref.future().add_done_callback(settle)
        return result

    def shutdown(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            for actor in self._actors:
                self._ray.kill(actor)
        finally:
            self._ray.shutdown()


# -- local clusters (tests, the benchmark, a laptop) ------------------------------------------------

def _ray_command() -> list[str]:
    """``ray`` of this interpreter's environment (the nodes must import the same he_cnn)."""
    script = Path(sys.executable).with_name("ray")
    return [str(script)] if script.exists() else [sys.executable, "-m", "ray.scripts.scripts"]


@contextmanager
def local_cluster(nodes: int, cpus_per_node: int, port: int, temp_dir: Path,
                  object_store_bytes: int = 256 << 20) -> Iterator[str]:
    """A Ray cluster of ``nodes`` ``ray start`` processes on this machine (the first the head, on
    ``port``), ``cpus_per_node`` CPUs each; yields its address and stops exactly these processes at exit
    (``ray stop`` would stop every Ray process of the user)."""
    temp_dir.mkdir(parents=True, exist_ok=True)
    address = f"127.0.0.1:{port}"
    common = ["--block", f"--num-cpus={cpus_per_node}", f"--object-store-memory={object_store_bytes}",
              "--disable-usage-stats"]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    started: list[subprocess.Popen] = []
    log_file = open(temp_dir / "ray-start.log", "ab")
    try:
        head = ["--head", f"--port={port}", "--include-dashboard=false", f"--temp-dir={temp_dir}",
                "--node-ip-address=127.0.0.1"]
        started.append(subprocess.Popen(_ray_command() + ["start", *head, *common], stdout=log_file,
                                        stderr=subprocess.STDOUT, env=env, start_new_session=True))
        _wait_for_nodes(address, 1, started)
        for _ in range(nodes - 1):
            started.append(subprocess.Popen(_ray_command() + ["start", f"--address={address}",
                                                              "--node-ip-address=127.0.0.1", *common],
                                            stdout=log_file, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True))
        _wait_for_nodes(address, nodes, started)
        yield address
    finally:
        for process in reversed(started):
            _stop(process)
        _kill_leftovers(temp_dir)
        log_file.close()


def _stop(process: subprocess.Popen) -> None:
    """Stop one ``ray start --block`` and its node: SIGTERM (it stops its node's processes), then SIGKILL
    to its process group if it is slow (a head node can take 30 s to stop gracefully)."""
    for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 30.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            pass
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _kill_leftovers(temp_dir: Path, timeout: float = 10.0) -> None:
    """SIGKILL what is left of a cluster whose ``ray start`` processes are gone: its worker processes run in
    sessions of their own and name the cluster's temp dir on their command line (Linux only)."""
    marker = str(temp_dir).encode()
    deadline = time.monotonic() + timeout
    while True:
        left = []
        for entry in Path("/proc").glob("[0-9]*"):
            try:
                if marker in (entry / "cmdline").read_bytes():
                    left.append(int(entry.name))
            except OSError:
                continue
        if not left:
            return
        if time.monotonic() > deadline:
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            return
        time.sleep(0.5)


def _wait_for_nodes(address: str, count: int, processes: list[subprocess.Popen], timeout: float = 90.0) -> None:
    """Wait until the cluster at ``address`` reports ``count`` live nodes (``ray status`` in a subprocess:
    this process must not connect as a driver)."""
    deadline = time.monotonic() + timeout
    probe = ("import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR', log_to_driver=False); "
             "print(sum(1 for n in ray.nodes() if n['Alive']))")
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in processes):
            raise WorkersUnavailable(f"a 'ray start' process for {address} exited (see its temp dir's ray-start.log)")
        try:
            _probe(address, timeout=1.0)  # the head listens (else ray.init would retry for minutes)
            done = subprocess.run([sys.executable, "-c", probe, address], capture_output=True, text=True, timeout=60)
            if done.returncode == 0 and done.stdout.strip().splitlines()[-1:] == [str(count)]:
                return
        except (WorkersUnavailable, subprocess.TimeoutExpired):
            pass
        time.sleep(0.5)
    raise WorkersUnavailable(f"the Ray cluster at {address} did not reach {count} nodes in {timeout:.0f} s")
