"""Scaling over Ray nodes: the deployed service with each cloud on a Ray cluster of its own.

For each node count of ``--nodes`` (default 1 and 2), two local clusters are started (one per cloud,
that many ``ray start`` nodes of ``--cpus-per-node`` CPUs each: :func:`he_cnn.ray_workers.local_cluster`),
then S2 and S1 as services (``he-cnn serve s2|s1 --ray-address``), the default ICNN is uploaded, and a
user classifies digits test images over HTTP:

* **online latency**: ``--images`` queries one after another, each after both clouds report their
  offline phase done (pools full, a prepared query), as a user meets a service between bursts;
* **throughput with the offline phase included**: ``--batch`` queries sent by ``--threads`` users at
  once, right after, with nothing prepared: images per hour;

each decrypted vector checked against the integer reference. Prints the table and the speed-up over the
fewest nodes; writes JSON (``--json``) and the section of ``docs/benchmarks.md`` between the ``ray``
markers (``bench/bench.py`` keeps it). ``python bench/bench.py --backend ray ...`` runs this.

    python bench/ray_scaling.py --bits 2048 --nodes 1 2                  # this 2-core machine
    python bench/ray_scaling.py --bits 2048 --nodes 1 2 4 --cpus-per-node 4   # a 16-core machine
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import socket
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.zoo import write_section  # noqa: E402
from he_cnn.crypto.paillier import generate_keypair  # noqa: E402
from he_cnn.graph.reference import classify_reference  # noqa: E402
from he_cnn.images import load_image_file, quantize_image  # noqa: E402
from he_cnn.owner.cli import upload_model  # noqa: E402
from he_cnn.owner.pipeline import TrainSettings, cached_model  # noqa: E402
from he_cnn.ray_workers import local_cluster  # noqa: E402
from he_cnn.servers.launch import CloudProcess, wait_offline  # noqa: E402
from he_cnn.training.data import load_digits_dataset  # noqa: E402
from he_cnn.user.client import Client  # noqa: E402

BEGIN, END = "<!-- ray: begin (bench/ray_scaling.py) -->", "<!-- ray: end -->"


def log(message: str) -> None:
    print(f"[ray-bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(nodes: int, trained, images: list[Path], references: list[list[int]], args, root: Path) -> dict:
    """One node count (0: no Ray, the local process pool of ``--local-workers``): clusters, services,
    upload, latency and throughput."""
    token, owner_token = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    user_key = generate_keypair(args.bits)
    with ExitStack() as stack:
        if nodes:
            backend = {role: ["--ray-address", stack.enter_context(local_cluster(
                nodes, args.cpus_per_node, _free_port(), root / f"{role.lower()}{nodes}"))] for role in ("S1", "S2")}
        else:
            backend = {role: ["--workers", str(args.local_workers)] for role in ("S1", "S2")}
        env = {"PYTHONPATH": str(ROOT)}
        s2 = stack.enter_context(CloudProcess("S2", ["--data-dir", str(root / f"data{nodes}" / "s2"), "--key-bits",
                                                     str(args.bits), "--quiet", *backend["S2"]],
                                              {**env, "HECNN_S2_CLOUD_TOKEN": token}, cwd=ROOT))
        s2_url = s2.wait_ready(timeout=600)
        s1 = stack.enter_context(CloudProcess("S1", ["--data-dir", str(root / f"data{nodes}" / "s1"), "--peer-url",
                                                     s2_url, "--quiet", "--open", *backend["S1"]],
                                              {**env, "HECNN_S1_CLOUD_TOKEN": token,
                                               "HECNN_S1_OWNER_TOKEN": owner_token}, cwd=ROOT))
        s1_url = s1.wait_ready(timeout=600)
        log(f"{nodes} node(s) per cloud: services up; uploading")
        model_id = upload_model(trained, s1_url, owner_token)["model_id"]
        client = Client(s1_url, user_key, model=model_id)
        online, exact = [], 0
        for n, (image, reference) in enumerate(zip(images[:args.ray_images], references), 1):
            wait_offline([s1_url, s2_url], 1800, prepared=True)
            started = time.perf_counter()
            result = client.classify(image)[0]
            online.append(time.perf_counter() - started)
            exact += [int(v) for v in result.vector] == reference
            log(f"{nodes} node(s): query {n}: {online[-1]:.2f} s")
        batch = [images[i % len(images)] for i in range(args.ray_batch)]
        started = time.perf_counter()
        with ThreadPoolExecutor(args.ray_threads) as pool:
            clients = [Client(s1_url, user_key, model=model_id) for _ in range(args.ray_threads)]
            results = list(pool.map(lambda job: clients[job[0] % args.ray_threads].classify(job[1])[0],
                                    enumerate(batch)))
        wall = time.perf_counter() - started
        exact += sum([int(v) for v in r.vector] == references[i % len(images)] for i, r in enumerate(results))
        log(f"{nodes} node(s): {args.ray_batch} queries in {wall:.1f} s")
    return {"nodes": nodes, "cpus_per_node": args.cpus_per_node,
            "cpus_per_cloud": nodes * args.cpus_per_node if nodes else args.local_workers,
            "online_seconds": online, "online_mean": statistics.mean(online),
            "batch": args.ray_batch, "batch_seconds": wall, "images_per_hour": args.ray_batch / wall * 3600,
            "exact": exact, "queries": len(online) + len(results)}


def markdown(out: dict) -> str:
    points = [p for p in out["points"] if p["nodes"]]
    local = [p for p in out["points"] if not p["nodes"]]
    base = points[0]
    lines = [BEGIN, "", "## Scaling over Ray nodes (each cloud on a Ray cluster of its own)", "",
             f"`python bench/bench.py --backend ray --keys {out['bits']} --nodes "
             f"{' '.join(str(p['nodes']) for p in points)} --cpus-per-node {out['cpus_per_node']}"
             f"{' --local-workers ' + str(local[0]['cpus_per_cloud']) if local else ''}` on {out['machine']}, "
             f"one run: for each node count, two local clusters (S1's and S2's, that many `ray start` nodes each), "
             "the services started with `--ray-address`, the default ICNN uploaded, digits test images classified "
             "over HTTP; the speed-ups are over the fewest Ray nodes" + (
                 f", and the first row is the same service without Ray, each cloud on a process pool of "
                 f"{local[0]['cpus_per_cloud']} workers" if local else "") + ". Online = one query after both clouds report their offline phase done; throughput = "
             f"{out['batch']} queries from {out['threads']} users at once with nothing prepared (offline included).", "",
             "| nodes per cloud | CPUs per cloud | online s (mean) | speed-up | images/h (offline incl.) | speed-up | "
             "secure == reference |", "|---|---|---|---|---|---|---|"]
    for p in local + points:
        lines.append(f"| {p['nodes'] or 'no Ray: process pool'} | {p['cpus_per_cloud']} | {p['online_mean']:.2f} | "
                     f"{base['online_mean'] / p['online_mean']:.2f}x | {p['images_per_hour']:.0f} | "
                     f"{p['images_per_hour'] / base['images_per_hour']:.2f}x | {p['exact']}/{p['queries']} |")
    lines += ["", out.get("note", ""), "", END]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(ap)
    ap.add_argument("--bits", type=int, default=2048, help="cloud key size")
    ap.add_argument("--json", metavar="FILE", default=str(ROOT / "bench" / "results-ray.json"))
    ap.add_argument("--markdown", metavar="FILE", default=str(ROOT / "docs" / "benchmarks.md"))
    return ap.parse_args(argv)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The options of the Ray run (also ``bench/bench.py --backend ray``'s)."""
    ap.add_argument("--nodes", type=int, nargs="+", default=[1, 2], help="Ray nodes per cloud, one run each")
    ap.add_argument("--cpus-per-node", type=int, default=1, help="CPUs each ray start node offers")
    ap.add_argument("--local-workers", type=int, default=0,
                    help="also measure the service without Ray, each cloud on a process pool of this many workers "
                         "(the reference row; 0: not measured)")
    ap.add_argument("--ray-images", type=int, default=2, help="online queries per node count")
    ap.add_argument("--ray-batch", type=int, default=4, help="queries in the throughput run")
    ap.add_argument("--ray-threads", type=int, default=2, help="users at once in the throughput run")
    ap.add_argument("--ray-note", default="", help="a sentence for the report (e.g. the machine's load)")


def run(args: argparse.Namespace) -> dict:
    trained = cached_model(TrainSettings().resolved(), note=log)
    data = load_digits_dataset()
    root = Path(tempfile.mkdtemp(prefix="hrb", dir="/tmp"))  # short: Ray's socket paths must stay < 108 bytes
    try:
        images = []
        for i in range(max(args.ray_images, 2)):
            path = root / f"digit{i}.npy"
            np.save(path, data.x_test[i][0])
            images.append(path)
        model = trained.model
        references = [[int(v) for v in classify_reference(model, quantize_image(
            load_image_file(p, model.input_shape[1]), model.input_max))] for p in images]
        counts = ([0] if args.local_workers else []) + list(args.nodes)
        points = [measure(n, trained, images, references, args, root) for n in counts]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {"bits": args.bits, "cpus_per_node": args.cpus_per_node, "batch": args.ray_batch, "threads": args.ray_threads,
            "machine": f"{os.cpu_count()} cores", "points": points, "note": args.ray_note}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return report(run(args), args)


def report(out: dict, args: argparse.Namespace) -> int:
    section = markdown(out)
    print(section)
    if getattr(args, "json", None):
        Path(args.json).write_text(json.dumps(out, indent=1))
    if getattr(args, "markdown", None):
        write_section(Path(args.markdown), section, BEGIN, END)
    return 0 if all(p["exact"] == p["queries"] for p in out["points"]) else 1


if __name__ == "__main__":
    sys.exit(main())
