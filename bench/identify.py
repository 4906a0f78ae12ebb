"""Benchmark of encrypted 1:N identification: the search alone (:mod:`he_cnn.protocols.identify`), in process.

For each gallery size N: random integer templates (N x F, ``--template-bits``) enrolled in chunks, then
per query a random embedding (``--embedding-bits``, as the secure CNN would hand it over) searched after
its offline phase: the similarities (rounds ``identify`` and ``identify_unpack`` with S1's bucket
multi-exponentiations), the comparisons (the argmax tournament and the answer's re-encryption), bytes
each way, rounds, and the lower bound of the same work (:mod:`he_cnn.compiler.cost` primitives timed on
this machine: S1's multiplications of the multi-exponentiations, S2's decryptions and encryptions, and
N comparisons priced as a ReLU pass of the same bit length by ``cost.layer_bound``). Every answer is
checked against ``identify_reference``. Writes ``bench/results-identify.json`` and the section of
``docs/benchmarks.md`` between the ``identify`` markers.

    python -m bench.identify --bits 2048 --sizes 1000 5947 --features 1024 --workers 2
"""
from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.zoo import write_section
from he_cnn.compiler import cost
from he_cnn.crypto.paillier import generate_keypair
from he_cnn.crypto.tensor import EncryptedTensor
from he_cnn.graph.layers import layer_from_spec
from he_cnn.parallel import Workers
from he_cnn.parties.key_cloud import KeyCloud
from he_cnn.protocols import identify as idf
from he_cnn.protocols.common import S1Context, slot_bits, slots_per_pack
from he_cnn.transport.channel import InProcessChannel

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- identify: begin (bench/identify.py) -->", "<!-- identify: end -->"
SIMILARITY_STEPS = ("identify", "identify_unpack")


def lower_bound(n: int, features: int, lx: int, lt: int, bits: int, prims: dict[str, float], cores: int,
                ct_bytes: int) -> dict[str, float]:
    """Least single-core work of the online search (seconds), and the bound on ``cores``."""
    mm, dec = prims["mulmod_nsq"], prims["decrypt_crt"]
    ly, m = idf.similarity_bits(lx, lt, features), idf.code_bits(n)
    k = idf.group_size(bits, lx, lt, features)
    groups = -(-n // k)
    la = lx + 2 + idf.KAPPA
    c = idf.best_window(la, features)
    x_packs = -(-features // slots_per_pack(bits, slot_bits(lx, idf.KAPPA)))
    s1 = (groups * math.ceil(la / c) * (features + (2 << c)) + features * (slot_bits(lx, idf.KAPPA) + 1)
          + 2 * groups + n) * mm
    s2 = (x_packs + groups) * dec + n * 2 * mm
    entry = {"kind": "relu", "name": "argmax", "input": "s", "output": "t", "shift": 0}
    spec = {"shapes": {"s": [n], "t": [n]}, "bits": {"s": ly + m + 1, "t": ly + m + 1}, "layers": [entry]}
    compare = cost.layer_bound(entry, spec, layer_from_spec(entry), bits, prims, cores, ct_bytes, ct_bytes,
                               ct_bytes, mm)
    return {"similarities": (s1 + s2) / cores, "comparisons": compare["bound"],
            "total": (s1 + s2) / cores + compare["bound"], "groups": groups, "group_size": k,
            "compared_bits": ly + m + 1, "bytes_similarities": (x_packs + 2 * groups) * ct_bytes + n * ct_bytes,
            "bytes_comparisons": compare["min_bytes_to_s2"] + compare["min_bytes_to_s1"]}


def fill_pool(ctx: S1Context, count: int, per: int = 512) -> None:
    """Top the cloud key's randomizer pool up to ``count`` on the workers (both parties share the key
    object in process)."""
    pool = ctx.public_key.pool
    missing = count - len(pool)
    if missing > 0:
        pool.fill_on(ctx.workers, pool.recipe(), -(-missing // per), per)


def load_average() -> float:
    """The machine's 1-minute load average (other jobs on these cores make every figure slower)."""
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return float("nan")


def run_size(ctx: S1Context, cloud: KeyCloud, user, n: int, features: int, lx: int, lt: int, queries: int,
             chunk: int, rnd: random.Random) -> dict[str, Any]:
    pk = ctx.public_key
    hi_t, hi_x = (1 << lt) - 1, (1 << lx) - 1
    templates = np.array([[rnd.randint(-hi_t, hi_t) for _ in range(features)] for _ in range(n)], dtype=object)
    gallery = idf.EncryptedGallery(f"bench-{n}", features, lt, lx, idf.encrypt_threshold(pk, 0, lx, lt, features))
    t0 = time.perf_counter()
    bounds = list(range(0, n, chunk)) + [n]
    gallery.chunks += ctx.workers.map(idf.enrol_chunk, [(pk, templates[a:b], lt, lx)
                                                        for a, b in zip(bounds, bounds[1:])])
    enrol_seconds = time.perf_counter() - t0
    idf.setup_gallery(ctx, gallery)
    runs, batch, batches = [], [], []
    for _ in range(queries):
        x = [rnd.randint(-hi_x, hi_x) for _ in range(features)]
        if not batch:  # the offline phase: k_q queries at once
            t0 = time.perf_counter()
            batch = idf.prepare_identify(ctx, gallery)
            batches.append((time.perf_counter() - t0, len(batch)))
        prepared = batch.pop()
        t0 = time.perf_counter()
        fill_pool(ctx, 4 * n + 4096)  # the randomizers a query draws, as a service's pool filler keeps them
        offline = time.perf_counter() - t0 + batches[-1][0] / batches[-1][1]
        embedding = EncryptedTensor.encrypt(pk, x)
        # the primitives of the bound are timed now, just before the query, under the same machine load
        prims = cost.measure_primitives(pk, cloud.keys.private, min_seconds=0.2)
        load = load_average()
        before = ctx.channel.stats.snapshot()
        steps_before = {k: (v.rounds, v.bytes_to_s2 + v.bytes_to_s1) for k, v in ctx.channel.stats.steps.items()}
        t0 = time.perf_counter()
        groups = list(range(sum(c.groups for c in gallery.chunks)))
        leaves, _ = idf.similarity_leaves(ctx, gallery, embedding, prepared, groups)
        t1 = time.perf_counter()
        answer = idf.argmax_for_user(ctx, gallery, leaves, user.public)
        t2 = time.perf_counter()
        after = ctx.channel.stats.snapshot()
        steps = {k: (v.rounds - steps_before.get(k, (0, 0))[0],
                     v.bytes_to_s2 + v.bytes_to_s1 - steps_before.get(k, (0, 0))[1])
                 for k, v in ctx.channel.stats.steps.items()}
        got = idf.read_answer(answer.decrypt(user.private)[0], n)
        if got != idf.identify_reference(templates, x, 0):
            raise AssertionError(f"N = {n}: answer {got}, reference {idf.identify_reference(templates, x, 0)}")
        bound = lower_bound(n, features, lx, lt, pk.bits, prims, ctx.workers.count, pk.ciphertext_bytes)
        runs.append({"load_average": load, "bound_seconds": bound["total"], "offline_seconds": offline,
                     "ratio_to_bound": (t2 - t0) / bound["total"],
                     "similarity_seconds": t1 - t0, "comparison_seconds": t2 - t1,
                     "online_seconds": t2 - t0, "rounds": after[0] - before[0],
                     "bytes_to_s2": after[1] - before[1], "bytes_to_s1": after[2] - before[2],
                     "similarity_bytes": sum(b for k, (_, b) in steps.items() if k in SIMILARITY_STEPS),
                     "comparison_bytes": sum(b for k, (_, b) in steps.items() if k not in SIMILARITY_STEPS)})
    median = {k: float(np.median([r[k] for r in runs])) for k in runs[0]}
    return {"templates": n, "features": features, "embedding_bits": lx, "template_bits": lt, "queries": queries,
            "enrol_seconds": enrol_seconds, **median, "lower_bound": bound, "batch_seconds": batches[0][0],
            "batch_queries": batches[0][1], "ratios": [r["ratio_to_bound"] for r in runs]}


def section(results: list[dict[str, Any]], bits: int, workers: int, comparison: str) -> str:
    lines = [BEGIN, "", "### Identification (1:N), the search alone", "",
             f"`python -m bench.identify --bits {bits} --workers {workers}` on this machine ({workers} workers, "
             f"{comparison} comparisons, in process): random templates and embeddings, the answer checked against "
             "the plaintext reference each time; per size the median of the queries (the ratio: the median of each "
             "query's time over the bound timed just before it). Online = after the offline phase "
             "(`prepare_identify`, one batch of k_q queries: batch s; offline s per query = its share of the batch "
             "and the randomizers the query draws); "
             "similarities = the rounds `identify` and `identify_unpack` with S1's multi-exponentiations; "
             "comparisons = the argmax tournament and the answer's re-encryption. The bound prices the same work "
             "with primitives timed here just before each query (`he_cnn/compiler/cost.py`). This machine's two "
             "cores are shared with other jobs: load is the 1-minute load average when the query started, and "
             "figures vary from run to run with it.",
             "", "| templates x features | bits x / T | similarities s | comparisons s | online s | bound s | ratio | "
             "rounds | MB (sim. / comp.) | offline s per query (batch s / k_q) | enrol s | load |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|---|---:|---:|"]
    for r in results:
        lines.append(f"| {r['templates']:,} x {r['features']:,} | {r['embedding_bits']} / {r['template_bits']} | "
                     f"{r['similarity_seconds']:.1f} | {r['comparison_seconds']:.1f} | {r['online_seconds']:.1f} | "
                     f"{r['bound_seconds']:.1f} | {r['ratio_to_bound']:.2f} | {r['rounds']:.0f} | "
                     f"{r['similarity_bytes'] / 1e6:.1f} / {r['comparison_bytes'] / 1e6:.1f} | "
                     f"{r['offline_seconds']:.1f} ({r['batch_seconds']:.0f} / {r['batch_queries']}) | "
                     f"{r['enrol_seconds']:.1f} | {r['load_average']:.1f} |")
    lines += ["", END]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bits", type=int, default=2048)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 5947])
    ap.add_argument("--features", type=int, default=1024)
    ap.add_argument("--embedding-bits", type=int, default=8)
    ap.add_argument("--template-bits", type=int, default=8)
    ap.add_argument("--queries", type=int, default=3)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--comparison", choices=("ot", "dgk"), default="ot")
    ap.add_argument("--json", default=str(ROOT / "bench" / "results-identify.json"))
    ap.add_argument("--markdown", default=str(ROOT / "docs" / "benchmarks.md"))
    ap.add_argument("--quick", action="store_true", help="no files written")
    args = ap.parse_args(argv)
    keys, user = generate_keypair(args.bits), generate_keypair(1024 if args.bits < 2048 else 2048)
    workers = Workers(args.workers)
    cloud = KeyCloud.create(keys, workers=workers)
    ctx = S1Context(keys.public, cloud.dgk_public, InProcessChannel(cloud.handle), workers=workers,
                    comparison=args.comparison)
    rnd = random.Random(19)
    results = []
    for n in args.sizes:
        result = run_size(ctx, cloud, user, n, args.features, args.embedding_bits, args.template_bits, args.queries,
                          args.chunk, rnd)
        print(json.dumps({k: v for k, v in result.items() if k != "lower_bound"}), flush=True)
        results.append(result)
    if not args.quick:
        Path(args.json).write_text(json.dumps({"bits": args.bits, "workers": args.workers, "results": results},
                                              indent=1))
        write_section(Path(args.markdown), section(results, args.bits, args.workers, args.comparison), BEGIN, END)
    print(section(results, args.bits, args.workers, args.comparison))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
