#!/usr/bin/env python
"""he-cnn benchmark: secure ICNN inference against plaintext, a per-element ``phe`` baseline and the
Paillier lower bound, per key size, in one run.

Usage (from the repository root, with the project's venv; ``python bench/bench.py`` works the same)::

    python -m bench.bench                          # 1024, 2048, 3072-bit keys; writes docs/benchmarks.md
    python -m bench.bench --keys 1024 2048 --json bench/results.json
    python -m bench.bench --quick --keys 1024 --images 1     # smoke run, a few minutes
    python -m bench.bench --quick --keys 1024 --images 1 --no-http --no-baseline --comparison dgk --workers 1 2

What one run measures (everything also goes to ``--json FILE``):

* the default ICNN (the owner's pipeline, :func:`he_cnn.owner.pipeline.cached_model`: trained once
  with seed 0 on the digits and cached in ``$HECNN_CACHE_DIR/models`` or ``~/.cache/he-cnn/models``,
  shared with ``he-cnn demo``) on the first ``--images`` digits test images: plaintext float torch and
  plaintext integer reference, per image;
* secure inference **in-process** (S1 and S2 objects in this process, the largest ``--workers`` count of
  processes): one-time set-up (key generation, model encryption, set-up round), then per image the
  offline phase (``prepare_query`` and the randomness pools filled to exactly what one query consumes)
  and the online latency, with the decrypted class vector checked against the integer reference;
  **for each comparison protocol** of ``--comparison`` (``S1Context.comparison``: ``ot``, ``dgk``; a
  protocol that fails is reported and the others go on); the per-layer figures are the first listed
  protocol's that ran;
* **sustained throughput, offline phase included** (``--batch N``, default 4 images, ``--quick`` 2):
  N images through ``--batch-threads`` concurrent queries with no prepared query and empty pools,
  images per hour, per comparison protocol, at ``--batch-keys`` (default 2048 bits if measured);
* **scaling over cores** (``--workers 1 2 ...``, default 1 and all cores): online latency and throughput
  of the first protocol at each worker count, at the throughput run's key size, and the speed-up
  over the fewest workers;
* **the peer** (``--peer``, default on when ``tenseal`` imports; ``pip install he-cnn[peer]``):
  TenSEAL's encrypted-MNIST design (``peer_tenseal.py``: one convolution, x^2, two dense layers, CKKS
  N = 8192) trained on the same digits, per image client encryption / server evaluation /
  decryption on the same test images, and ``--peer-batch`` images back to back for images per hour;
  the report puts ours and the peer in one table with the ratios ours / peer;
* **over HTTP** (``--http``): S2 as the real service (``python -m he_cnn serve s2``) and S1 here
  (same offline phase), and the **full service** as deployed (S1 and S2 services, upload and one
  classify request as the user sends it, after both services report their offline phase done);
* per layer: seconds, rounds, bytes each way, the engine's operation counters, where the seconds go
  (heard through the parties' tracer hooks, ``instrument.Profiler``), the protocol's least work priced
  with primitive costs measured here (``he_cnn/compiler/cost.py``) and our time / that bound, and the least bytes;
* the per-element ``phe`` baseline of ``baseline.py`` on the first convolution and the first plain (not requantising) ReLU
  (a subset, extrapolated) and our speed-up over it;
* peak memory (VmHWM) of this process, of its worker processes and of each service process.

Defaults keep a quiet 2-core machine under ~20 minutes: 3 images at 1024 and 2048 bits, 1 image above
2048 bits (``--images-large``), 1 image over HTTP per key (``--http-images``), the full service up to
2048 bits (``--service-max-bits``); the throughput run (``--batch``), the scaling run and the peer add a
few minutes.
Writes ``docs/benchmarks.md`` and ``docs/benchmark_layers.png`` unless ``--quick`` (then only if
``--markdown``/``--plot`` are given). matplotlib is an optional, bench-only dependency.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import re
import resource
import secrets
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
if not __package__:  # run as ``python bench/bench.py``: import the bench package from the repository
    sys.path[0] = str(ROOT)  # root, not this folder (where this file would shadow the package)

import gmpy2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from he_cnn.transport.channel import Channel, InProcessChannel  # noqa: E402
from he_cnn.images import quantize_image  # noqa: E402
from he_cnn.crypto.dgk import DGKPublicKey  # noqa: E402
from he_cnn.crypto.paillier import KAPPA, PublicKey, RandomnessPool, generate_keypair  # noqa: E402
from he_cnn.training.icnn import ICNN  # noqa: E402
from he_cnn.parallel import Workers, default_worker_count  # noqa: E402
from he_cnn.protocols.common import S1Context, slot_bits, slots_per_pack  # noqa: E402
from he_cnn.protocols.millionaire import OTLink  # noqa: E402
from he_cnn.protocols.comparison import secure_relu  # noqa: E402
from he_cnn.protocols.linear import precompute_linear, secure_linear  # noqa: E402
from he_cnn.graph.reference import classify_reference, run_reference  # noqa: E402
from he_cnn.owner.pipeline import TrainedModel, TrainSettings, cached_model  # noqa: E402
from he_cnn.parties.key_cloud import KeyCloud  # noqa: E402
from he_cnn.parties.compute_cloud import PreparedQuery, encrypt_model, prepare_query, secure_inference, setup_model  # noqa: E402
from he_cnn.crypto.tensor import EncryptedTensor  # noqa: E402

from bench import baseline, instrument, peer_tenseal, ray_scaling, report  # noqa: E402
from he_cnn.compiler import cost as lowerbound  # noqa: E402

#: the default ICNN of the owner's pipeline (seed 0, 15 epochs, 6-bit weights)
TRAIN_SETTINGS = TrainSettings()
ACCOUNTING_BITS = 512
T_START = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - T_START:7.1f}s] {message}", file=sys.stderr, flush=True)


# -- memory ---------------------------------------------------------------------------------------

def vm_hwm_kb(pid: int | str = "self") -> int | None:
    """Peak resident set size (VmHWM) of a process, in KiB; None if unreadable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def reset_peak(pid: int | str = "self") -> bool:
    """Reset a process's VmHWM to its current RSS (Linux: write 5 to clear_refs)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def worker_pids(workers: Workers) -> list[int]:
    pool = getattr(workers, "_pool", None)
    procs = getattr(pool, "_processes", None) or {}
    return [int(p) for p in procs]


def mib(kb: int | None) -> float | None:
    return None if kb is None else round(kb / 1024, 1)


# -- model ----------------------------------------------------------------------------------------

def obtain_model(cache: str | None) -> tuple[TrainedModel, dict]:
    """The owner's default ICNN (integer and float model, data set), from the owner pipeline's cache or
    trained now, and the facts the report quotes."""
    t0 = time.perf_counter()
    trained = cached_model(TRAIN_SETTINGS, cache, note=lambda message: log(f"model: {message}"))
    info = {"float_test_accuracy": trained.float_accuracy, "integer_test_accuracy": trained.integer_accuracy,
            "settings": dataclasses.asdict(TRAIN_SETTINGS), "cache_key": TRAIN_SETTINGS.cache_key(),
            "obtain_seconds": time.perf_counter() - t0}
    return trained, info


# -- plaintext ------------------------------------------------------------------------------------

def _median_time(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_plaintext(tm: ICNN, im, ds, indices: list[int], reps: int) -> dict:
    """Per-image latency, batch of one. torch runs on one thread: for a network this small, more
    threads only add synchronisation (and wait for the cores the secure run keeps busy)."""
    rows = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _plaintext_rows(tm, im, ds, indices, reps, rows)
    finally:
        torch.set_num_threads(threads)


def _plaintext_rows(tm: ICNN, im, ds, indices: list[int], reps: int, rows: list) -> dict:
    with torch.no_grad():
        for i in indices:
            x = torch.from_numpy(np.ascontiguousarray(ds.x_test[i][None], dtype=np.float32))
            xi = quantize_image(ds.x_test[i], im.input_max)
            tm(x)  # warm-up
            t_float = _median_time(lambda: tm(x), reps)
            t_int = _median_time(lambda: classify_reference(im, xi), max(3, reps // 10))
            rows.append({"index": i, "label": int(ds.y_test[i]), "float_pred": int(tm(x).argmax()),
                         "int_pred": int(np.argmax(classify_reference(im, xi))),
                         "float_seconds": t_float, "int_seconds": t_int})
    return {"images": rows, "torch_threads": torch.get_num_threads(),
            "float_seconds": statistics.mean(r["float_seconds"] for r in rows),
            "int_seconds": statistics.mean(r["int_seconds"] for r in rows)}


# -- pool accounting ------------------------------------------------------------------------------

def packs_for(reveals: list[tuple[int, int]], bits: int) -> int:
    return sum(-(-count // slots_per_pack(bits, slot_bits(l, KAPPA))) for count, l in reveals)


def linear_draws(spec: dict, bits: int) -> tuple[int, int]:
    """Paillier randomizers the linear layers' packed cross terms take at this key size, (S1, S2):
    S1 re-randomises the Z packs (G x C), S2 encrypts the packs of Xt_cols (G x F)."""
    s1 = s2 = 0
    for entry in spec["layers"]:
        if entry["kind"] in ("conv", "dense"):
            _, taps, _, _, _, groups = lowerbound.linear_packing(entry, spec, bits)
            s1, s2 = s1 + groups * int(entry["channels"]), s2 + groups * taps
    return s1, s2


def accounting_run(im, x_int: np.ndarray, workers: Workers, comparison: str = "dgk") -> dict:
    """One query with a small key and empty pools: what a query draws from each randomness pool
    (``comparison``: the comparison protocol, ``S1Context.comparison``; each draws differently).

    DGK draws and Paillier replies do not depend on the key size; the number of packs does, so the
    reveals (count, bits) are recorded and packs recomputed for each key, and so are the linear layers'
    packed cross terms (:func:`linear_draws`).
    """
    prof = instrument.Profiler()  # for its list of reveals
    kp = generate_keypair(ACCOUNTING_BITS, allow_small=True)
    uk = generate_keypair(1024)
    cloud = KeyCloud.create(kp)
    cloud.workers = workers
    ctx = S1Context(kp.public, cloud.dgk_public, InProcessChannel(cloud.handle), workers=workers, tracer=prof,
                    comparison=comparison, ot_link=ot_link(cloud))
    em = encrypt_model(im, kp.public)
    st = setup_model(ctx, em)
    ex = EncryptedTensor.encrypt(kp.public, x_int)
    p0, d0 = kp.public.pool.taken, cloud.dgk_public.pool.taken
    prof.reset()
    t0 = time.perf_counter()
    res = secure_inference(ctx, em, st, ex, uk.public)
    seconds = time.perf_counter() - t0
    reveals = list(prof.reveals)
    ok = [int(v) for v in res.output.decrypt(uk.private)] == [int(v) for v in classify_reference(im, x_int)]
    dgk_bits = sum(s.ops.get("dgk_bit", 0) for s in res.layers)
    paillier = kp.public.pool.taken - p0
    packs = packs_for(reveals, ACCOUNTING_BITS) + sum(linear_draws(em.spec, ACCOUNTING_BITS))
    return {"reveals": reveals, "spec": em.spec, "paillier_taken": paillier,
            "dgk_taken": cloud.dgk_public.pool.taken - d0, "dgk_bits": dgk_bits, "packs": packs, "replies": paillier - packs,
            "outputs": int(im.num_classes), "exact": ok, "seconds": seconds}


def pool_needs(acct: dict, bits: int, http: bool) -> dict[str, int]:
    """Randomizers one query takes from S1's (and, in-process, S2's) pools at this key size."""
    s1_linear, s2_linear = linear_draws(acct["spec"], bits)
    packs = packs_for(acct["reveals"], bits) + s1_linear
    if http:  # only S1's draws come from our pools; S2 is another process
        return {"paillier": packs, "dgk": acct["dgk_bits"], "user": acct["outputs"]}
    return {"paillier": packs + s2_linear + acct["replies"], "dgk": acct["dgk_taken"], "user": acct["outputs"]}


# -- one query ------------------------------------------------------------------------------------

#: one OT link per S2 (in-process cloud object or HTTP channel), shared by every context of this run, as
#: the S1 service shares one: the base OTs are a once-per-link set-up, not per-query work
_OT_LINKS: dict[int, OTLink] = {}


def ot_link(peer: Any) -> OTLink:
    return _OT_LINKS.setdefault(id(peer), OTLink())


def profiled_context(pk: PublicKey, dgk: DGKPublicKey, channel: Channel, workers: Workers,
                     cloud: KeyCloud | None = None, comparison: str = "dgk") -> S1Context:
    """An S1 context (comparison protocol ``comparison``) whose tracer is a fresh
    :class:`instrument.Profiler`, which its channel and, in process, S2 report to as well."""
    prof = instrument.Profiler()
    channel.tracer = prof
    if cloud is not None:
        cloud.tracer = prof
    return S1Context(pk, dgk, channel, workers=workers, tracer=prof, comparison=comparison,
                     ot_link=ot_link(cloud if cloud is not None else channel))


def prepare_timed(ctx: S1Context, em, st) -> tuple[PreparedQuery, dict[str, float], dict[str, int]]:
    """prepare_query, timing each layer and counting its exponentiations."""
    per_layer, ops = {}, {}
    before = [ctx.ops.get("exp_offline", 0)]

    def layer_done(name: str, seconds: float) -> None:
        per_layer[name] = seconds
        ops[name] = ctx.ops.get("exp_offline", 0) - before[0]
        before[0] = ctx.ops.get("exp_offline", 0)

    return prepare_query(ctx, em, st, layer_done), per_layer, ops


def run_query(ctx: S1Context, em, st, pk, dgk, uk, im, x_int: np.ndarray, needs: dict[str, int],
              s2_user: RandomnessPool | None = None) -> dict:
    """Offline phase (prepare + pools) then the timed online inference of one image, checked; where
    the seconds go when ``ctx`` has a :class:`instrument.Profiler` (:func:`profiled_context`).

    ``s2_user`` is S2's pool for the user's key (in-process; the service's filler tops it up between
    queries): filled here with S2's randomizers for the answer, the key's table built on the way."""
    t0 = time.perf_counter()
    ex = EncryptedTensor.encrypt(pk, x_int)
    t_user_encrypt = time.perf_counter() - t0
    prep, prep_layers, prep_ops = prepare_timed(ctx, em, st)
    t0 = time.perf_counter()
    pk.pool.fill(needs["paillier"])
    dgk.pool.fill(needs["dgk"])
    uk.public.pool.fill(needs["user"])
    if s2_user is not None:
        s2_user.fill(needs["user"])
    t_fill = time.perf_counter() - t0
    avail = {"paillier": len(pk.pool), "dgk": len(dgk.pool), "user": len(uk.public.pool)}
    taken0 = {"paillier": pk.pool.taken, "dgk": dgk.pool.taken, "user": uk.public.pool.taken}
    prof = ctx.tracer if isinstance(ctx.tracer, instrument.Profiler) else None
    if prof is not None:
        prof.reset()
    res = secure_inference(ctx, em, st, ex, uk.public, prep)
    taken = {"paillier": pk.pool.taken - taken0["paillier"], "dgk": dgk.pool.taken - taken0["dgk"],
             "user": uk.public.pool.taken - taken0["user"]}
    vector = [int(v) for v in res.output.decrypt(uk.private)]
    reference = [int(v) for v in classify_reference(im, x_int)]
    layers = [{"name": s.name, "kind": s.kind, "seconds": s.seconds, "rounds": s.rounds,
               "bytes_to_s2": s.bytes_to_s2, "bytes_to_s1": s.bytes_to_s1,
               "ops": {**s.ops, **({"exp_offline": prep_ops[s.name]} if s.name in prep_ops else {})}}
              for s in res.layers]
    breakdown = prof.breakdown([s.name for s in res.layers]) if prof is not None else None
    if breakdown is not None:
        for row, b in zip(layers, breakdown):
            row["breakdown"] = b
    return {"online_seconds": res.seconds, "layers": layers, "exact": vector == reference,
            "predicted": int(np.argmax(vector)), "user_encrypt_seconds": t_user_encrypt,
            "prepare_seconds": prep.seconds, "prepare_layers": prep_layers, "pool_fill_seconds": t_fill,
            "pool_filled": avail, "pool_taken": taken,
            "pool_shortfall": {k: max(0, taken[k] - avail[k]) for k in taken},
            "rounds": res.rounds, "bytes_to_s2": sum(s.bytes_to_s2 for s in res.layers),
            "bytes_to_s1": sum(s.bytes_to_s1 for s in res.layers), "breakdown_ok": breakdown is not None}


# -- in-process, per key size ---------------------------------------------------------------------

def run_inprocess(bits: int, im, ds, indices: list[int], accts: dict[str, dict], args) -> dict:
    """One key size in-process: set-up, then the images for each comparison protocol of ``accts`` (its
    accounting run's figures, or ``{"error": ...}``), the phe baseline, the bounds, the throughput runs
    and, at ``args.scaling_bits``, the scaling run."""
    out: dict[str, Any] = {"bits": bits, "workers": args.workers}
    log(f"{bits}: generating the cloud Paillier key")
    t0 = time.perf_counter()
    kp = generate_keypair(bits)
    out["keygen_paillier_seconds"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    cloud = KeyCloud.create(kp)
    out["keygen_dgk_seconds"] = time.perf_counter() - t0
    user_bits = min(bits, 2048)
    uk = generate_keypair(user_bits)
    out["user_key_bits"] = user_bits
    workers = Workers(args.workers)
    workers.map(os.getpid, [()] * workers.count)  # fork the pool now, not inside a timed phase
    cloud.workers = workers
    reset_peak()
    channel = InProcessChannel(cloud.handle)
    pk, dgk = kp.public, cloud.dgk_public
    ctx = profiled_context(pk, dgk, channel, workers, cloud, comparison=args.comparison[0])  # set-up: no comparison
    log(f"{bits}: encrypting the model (owner)")
    t0 = time.perf_counter()
    em = encrypt_model(im, pk)
    out["model_encrypt_seconds"] = time.perf_counter() - t0
    out["model_ciphertexts"] = sum(layer.weight.size + layer.bias.size for layer in em.linear.values())
    out["model_upload_bytes"] = len(em.serialize())
    t0 = time.perf_counter()
    st = setup_model(ctx, em)
    out["setup_seconds"] = time.perf_counter() - t0
    stats = channel.stats
    out["setup_rounds"], out["setup_bytes_to_s2"], out["setup_bytes_to_s1"] = stats.rounds, stats.bytes_to_s2, stats.bytes_to_s1
    log(f"{bits}: measuring primitive costs")
    prims = measure_primitives(kp, cloud, uk, args)
    count = args.images if bits <= 2048 else min(args.images, args.images_large)
    out["protocols"] = {}
    primary = None
    last_needs: dict[str, dict[str, int]] = {}
    for proto, acct in accts.items():
        if "error" in acct:
            out["protocols"][proto] = {"error": f"accounting run failed: {acct['error']}"}
            continue
        try:
            ctx = profiled_context(pk, dgk, channel, workers, cloud, comparison=proto)
            needs = pool_needs(acct, bits, http=False)
            entry: dict[str, Any] = {"pool_needs_first": needs}
            entry["images"], last_needs[proto] = run_images(bits, proto, ctx, em, st, pk, dgk, uk, im, ds,
                                                            indices[:count], needs, cloud)
        except Exception as e:  # noqa: BLE001 - report it, measure the other protocols
            traceback.print_exc()
            out["protocols"][proto] = {"error": f"{type(e).__name__}: {e}"}
            log(f"{bits}: comparison {proto!r} failed: {out['protocols'][proto]['error']}")
            continue
        out["protocols"][proto] = entry
        if primary is None:  # the per-layer figures, bounds and baseline are the first protocol's
            primary = proto
            out["comparison"], out["pool_needs_first"], out["images"] = proto, needs, entry["images"]
    if primary is None:
        workers.shutdown()
        out["error"] = "every comparison protocol failed: " + "; ".join(
            f"{p}: {e['error']}" for p, e in out["protocols"].items())
        return out
    images = out["images"]
    out["memory_mib"] = {"s1_s2_process": mib(vm_hwm_kb()),
                         "workers": [mib(vm_hwm_kb(p)) for p in worker_pids(workers)],
                         "ru_maxrss_lifetime": mib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)}
    if args.baseline:
        out["baseline"] = run_baseline(bits, kp, cloud, em, st, im, ds, indices[0], workers, args, primary)
    log(f"{bits}: measuring primitive costs again (the bound takes the cheaper of the two)")
    again = measure_primitives(kp, cloud, uk, args)
    out["primitive_runs"] = [prims, again]
    prims = out["primitives"] = {k: min(v, again[k]) for k, v in prims.items()}
    spec = em.spec
    entries = {e["name"]: e for e in spec["layers"]}
    out["bounds"] = []
    for layer in _mean_layers(images):
        entry = entries.get(layer.name, {"name": layer.name})
        lb = lowerbound.layer_bound(entry, spec, layer, bits, prims, workers.count, pk.ciphertext_bytes,
                                    dgk.ciphertext_bytes, uk.public.ciphertext_bytes, prims["user_mulmod"],
                                    comparison=primary)
        out["bounds"].append({"name": layer.name, **lb})
    out["ciphertext_bytes"], out["dgk_ciphertext_bytes"] = pk.ciphertext_bytes, dgk.ciphertext_bytes
    if args.batch and bits in args.batch_keys:
        for proto, entry in out["protocols"].items():
            if "images" not in entry:
                continue
            try:
                entry["batch"] = run_batch(bits, kp, cloud, em, st, uk, im, ds, indices, workers, args, proto,
                                           threads=max(args.batch_threads, workers.count // 2))
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                entry["batch"] = {"error": f"{type(e).__name__}: {e}", "comparison": proto}
        out["batch"] = out["protocols"][primary].get("batch")
    if bits == args.scaling_bits and len(args.worker_counts) > 1:
        try:
            out["scaling"] = run_scaling(bits, kp, cloud, channel, em, st, uk, im, ds, indices, primary,
                                         last_needs[primary], out, workers, args)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            out["scaling"] = {"error": f"{type(e).__name__}: {e}"}
    workers.shutdown()
    return out


def run_images(bits: int, proto: str, ctx: S1Context, em, st, pk, dgk, uk, im, ds, indices: list[int],
               needs: dict[str, int], cloud: KeyCloud) -> tuple[list[dict], dict[str, int]]:
    """:func:`run_query` on each image of ``indices`` (offline phase, then timed online); the pools
    are filled to ``needs`` for the first and to what the previous one took for the others. Returns
    the rows and the last image's draws."""
    images = []
    for n, i in enumerate(indices, 1):
        log(f"{bits}: {proto}, {ctx.workers.count} workers: image {n}/{len(indices)} (test #{i}): "
            "offline phase, then online")
        x_int = quantize_image(ds.x_test[i], im.input_max)
        q = run_query(ctx, em, st, pk, dgk, uk, im, x_int, needs, s2_user=cloud.user_key(uk.public.n).pool)
        q["index"] = i
        images.append(q)
        needs = {k: q["pool_taken"][k] for k in needs}  # exact for the next image
        _DRAWS[(id(pk), proto)] = max(needs.values())  # the throughput run's pool watermark
        log(f"{bits}: {proto}, image {n}: online {q['online_seconds']:.2f} s, offline prepare "
            f"{q['prepare_seconds']:.1f} s + pools {q['pool_fill_seconds']:.1f} s, "
            f"{'exact' if q['exact'] else 'WRONG RESULT'}")
    return images, needs


def run_scaling(bits: int, kp, cloud: KeyCloud, channel: Channel, em, st, uk, im, ds, indices: list[int],
                proto: str, needs: dict[str, int], main: dict, workers: Workers, args) -> dict:
    """Online latency (``--scaling-images`` images, offline phase done first) and throughput (the
    ``--batch`` run, offline included) of protocol ``proto`` for each of ``--workers``' counts, on the
    key, model and set-up of the main run; the main run's own count reuses its figures."""
    points = []
    for count in args.worker_counts:
        point: dict[str, Any] = {"workers": count}
        own = count == args.workers
        if own:
            rows = main["protocols"][proto]["images"]
            batch = main["protocols"][proto].get("batch")
        else:
            log(f"{bits}: scaling: {count} workers")
            wk = Workers(count)
            try:
                wk.map(os.getpid, [()] * wk.count)
                cloud.workers = wk
                ctx = profiled_context(kp.public, cloud.dgk_public, channel, wk, cloud, comparison=proto)
                rows, _ = run_images(bits, proto, ctx, em, st, kp.public, cloud.dgk_public, uk, im, ds,
                                     indices[:args.scaling_images], needs, cloud)
                batch = None
                if args.batch:  # enough concurrent queries to keep the cores busy: one per two workers
                    batch = run_batch(bits, kp, cloud, em, st, uk, im, ds, indices, wk, args, proto,
                                      threads=max(args.batch_threads, count // 2))
            finally:
                wk.shutdown()
                cloud.workers = workers
        if own and args.batch and not batch:
            batch = run_batch(bits, kp, cloud, em, st, uk, im, ds, indices, workers, args, proto)
        point["online_seconds"] = [q["online_seconds"] for q in rows]
        point["online_mean"] = statistics.mean(point["online_seconds"]) if rows else None
        point["exact"] = sum(q["exact"] for q in rows)
        point["images_per_hour"] = (batch or {}).get("images_per_hour")
        point["batch"] = batch
        point["reused_main_run"] = own
        points.append(point)
    return {"bits": bits, "comparison": proto, "cores": default_worker_count(), "points": points}


def measure_primitives(kp, cloud, uk, args) -> dict[str, float]:
    """Single-core seconds per primitive operation (lowerbound.measure_primitives), and a multiplication
    under the user's key."""
    prims = lowerbound.measure_primitives(kp.public, kp.private, cloud.dgk_public, cloud.dgk_private, args.prim_seconds)
    prims["user_mulmod"] = lowerbound.per_call(
        lambda a=uk.public.nsq - 3, b=uk.public.nsq - 5, m=uk.public.nsq: a * b % m, args.prim_seconds / 3, 200)
    return prims


class _Layer:
    def __init__(self, name: str, kind: str, ops: dict):
        self.name, self.kind, self.ops = name, kind, ops


def _mean_layers(images: list[dict]) -> list[_Layer]:
    return [_Layer(row["name"], row["kind"], row["ops"]) for row in images[0]["layers"]] if images else []


def run_baseline(bits: int, kp, cloud, em, st, im, ds, index: int, workers: Workers, args,
                 comparison: str = "dgk") -> dict:
    """The phe baseline on a subset of the first convolution and of the first plain ReLU, each paired
    with ours on the whole layer, run alternately ``args.baseline_pairs`` times (speed-up = the median of
    the pairs' ratios: this machine's speed drifts by tens of per cent within minutes, more than the gap
    between two figures measured minutes apart)."""
    x_int = quantize_image(ds.x_test[index], im.input_max)
    ref = run_reference(im, x_int)
    ex = EncryptedTensor.encrypt(kp.public, x_int)
    conv = next(e for e in em.spec["layers"] if e["kind"] == "conv")
    # the first plain ReLU: a requantising one also truncates, which the per-element baseline does not
    relu = next((e for e in em.spec["layers"] if e["kind"] == "relu" and not e.get("shift")),
                next(e for e in em.spec["layers"] if e["kind"] == "relu"))
    x_relu = EncryptedTensor.encrypt(kp.public, ref[relu["input"]])
    ctx = S1Context(kp.public, cloud.dgk_public, InProcessChannel(cloud.handle), workers=workers,
                    comparison=comparison, ot_link=ot_link(cloud))  # ours: the first comparison protocol that ran
    pools = [kp.public.pool, cloud.dgk_public.pool]
    conv_timer, relu_timer = PooledTimer(pools), PooledTimer(pools)

    def ours_conv() -> float:
        pre = precompute_linear(ctx, em.linear[conv["name"]], st.layers[conv["name"]], em.bound_bits(conv["input"]))
        return conv_timer(lambda: secure_linear(ctx, st.setup_id, em.linear[conv["name"]],
                                                             st.layers[conv["name"]], ex, em.bound_bits(conv["input"]), pre))

    def ours_relu() -> float:
        return relu_timer(lambda: secure_relu(ctx, x_relu, em.bound_bits(relu["input"]),
                                                           int(relu.get("shift", 0))))

    def phe_conv() -> dict:
        return baseline.baseline_linear(kp, im, em, conv["name"], ex, ref, block=args.baseline_block)

    def phe_relu() -> dict:
        return baseline.baseline_relu(kp, cloud.dgk_public, cloud.dgk_private, em, relu["name"], x_relu, ref,
                                      elements=args.baseline_elements)

    res: dict[str, Any] = {}
    for part, layer, phe_run, ours_run in (("linear", conv["name"], phe_conv, ours_conv),
                                           ("relu", relu["name"], phe_relu, ours_relu)):
        log(f"{bits}: phe baseline, {layer} (subset), alternating with ours on the whole layer, "
            f"{args.baseline_pairs} pairs")
        ours_run()  # warm-up: learns the pool draws, starts the workers
        phe_runs, ours_seconds = [], []
        for _ in range(args.baseline_pairs):
            phe_runs.append(phe_run())
            ours_seconds.append(ours_run())
        ratios = [r["seconds"] / o for r, o in zip(phe_runs, ours_seconds)]
        mid = sorted(phe_runs, key=lambda r: r["seconds"])[(len(phe_runs) - 1) // 2]  # its parts are reported
        res[part] = {**mid, "exact": all(r["exact"] for r in phe_runs),
                     "paired": {"phe_seconds": [r["seconds"] for r in phe_runs], "ours_seconds": ours_seconds,
                                "ratios": ratios, "speedup": statistics.median(ratios)}}
    return res


class PooledTimer:
    """Seconds of a call with the randomness pools topped up first (offline, untimed) to what the
    previous call drew: the same split as the online figures (the first call draws what is there and
    computes the rest on the spot: a warm-up)."""

    def __init__(self, pools: list[RandomnessPool]):
        self.pools = pools
        self.needs = [0] * len(pools)

    def __call__(self, fn: Callable[[], Any]) -> float:
        for pool, need in zip(self.pools, self.needs):
            pool.fill(need)
        before = [pool.taken for pool in self.pools]
        t0 = time.perf_counter()
        fn()
        seconds = time.perf_counter() - t0
        self.needs = [pool.taken - b for pool, b in zip(self.pools, before)]
        return seconds


def run_batch(bits: int, kp, cloud, em, st, uk, im, ds, indices, workers: Workers, args,
              comparison: str = "dgk", threads: int | None = None) -> dict:
    """Throughput: ``--batch`` images through ``--batch-threads`` concurrent queries (``threads`` if
    given, and then at least two images per thread), offline work inline (no prepared query, empty
    pools: what a service kept busy back to back pays per image)."""
    import threading

    args = argparse.Namespace(**vars(args))
    if threads is not None:
        args.batch_threads, args.batch = threads, max(args.batch, 2 * threads)

    log(f"{bits}: throughput run ({comparison}, {workers.count} workers), {args.batch} images, "
        f"{args.batch_threads} concurrent queries, offline phase included")
    jobs = [indices[i % len(indices)] for i in range(args.batch)]
    lock = threading.Lock()
    results: list[dict] = []
    errors: list[str] = []
    no_pool = {"paillier": 0, "dgk": 0, "user": 0}

    def worker() -> None:
        ctx = S1Context(kp.public, cloud.dgk_public, InProcessChannel(cloud.handle), workers=workers,
                        comparison=comparison, ot_link=ot_link(cloud))
        while True:
            with lock:
                if not jobs:
                    return
                i = jobs.pop()
            try:
                t0 = time.perf_counter()
                q = run_query(ctx, em, st, kp.public, cloud.dgk_public, uk, im,
                              quantize_image(ds.x_test[i], im.input_max), no_pool)
                with lock:
                    results.append({"index": i, "exact": q["exact"], "latency": time.perf_counter() - t0})
            except Exception as e:  # noqa: BLE001
                with lock:
                    errors.append(f"{type(e).__name__}: {e}")

    pools = [kp.public.pool] + ([cloud.dgk_public.pool] if comparison == "dgk" else [])
    t0 = time.perf_counter()
    filler = WorkerFiller(pools, workers, watermark=args.batch_threads * needs_per_query(kp, cloud, comparison))
    threads = [threading.Thread(target=worker) for _ in range(args.batch_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    filler.stop()
    out = {"images": args.batch, "threads": args.batch_threads, "wall_seconds": wall, "comparison": comparison,
           "workers": workers.count, "images_per_hour": 3600 * len(results) / wall if wall and results else None,
           "mean_latency": statistics.mean(r["latency"] for r in results) if results else None,
           "exact": sum(r["exact"] for r in results), "errors": errors}
    log(f"{bits}: throughput ({comparison}, {workers.count} workers): "
        + (f"{out['images_per_hour']:.0f} images/hour offline included" if out["images_per_hour"] else "no image done")
        + (f"; {len(errors)} errors: {errors[0]}" if errors else ""))
    return out


def needs_per_query(kp, cloud, comparison: str) -> int:
    """Randomizers of the largest pool one query drew so far (learned from the main run's queries)."""
    return max(1, _DRAWS.get((id(kp.public), comparison), 1000))


#: pool draws of one query by (key object, protocol), recorded by run_images' queries
_DRAWS: dict[tuple[int, str], int] = {}


class WorkerFiller:
    """The service's pool filling (:class:`he_cnn.servers.pools.PoolFiller`, busy mode) for the in-process
    throughput run: while queries run, a thread keeps each pool above ``watermark`` values by chunks
    computed in the worker processes (:meth:`~he_cnn.crypto.paillier.RandomnessPool.fill_on`), on at most half
    the workers, so the offline randomness is paid inside the measured wall time, where the service
    pays it, and not by the query threads' GIL."""

    CHUNK = 128

    def __init__(self, pools: list[RandomnessPool], workers: Workers, watermark: int):
        import threading

        self.pools = [p for p in pools if p.recipe() is not None]
        self.workers, self.watermark = workers, watermark
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        if self.pools and workers.count > 1:
            self._thread.start()

    def _run(self) -> None:
        tasks = max(1, self.workers.count // 2)
        while not self._stop.is_set():
            low = [p for p in self.pools if len(p) < self.watermark]
            if not low:
                self._stop.wait(0.02)
                continue
            for pool in low:
                pool.fill_on(self.workers, pool.recipe(), tasks, self.CHUNK)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


# -- over HTTP ------------------------------------------------------------------------------------

def run_http(bits: int, im, ds, indices: list[int], acct: dict, args, comparison: str = "dgk") -> dict:
    """S2 as the real service with S1 here (comparison protocol ``comparison``); then the full service
    (S1 service too, with its own default comparison) as a user sees it."""
    try:
        from he_cnn.transport.http_channel import HTTPChannel, fetch_public_key, http_request
        from he_cnn.wire import Message, decode, encode
        from he_cnn.servers.launch import CloudProcess
    except Exception as e:  # noqa: BLE001 - the service may be mid-construction
        return {"bits": bits, "error": f"TODO: HTTP measurement unavailable ({type(e).__name__}: {e})"}
    out: dict[str, Any] = {"bits": bits, "comparison": comparison}
    token, owner_token = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    forward = (lambda line: log(line)) if args.verbose else None
    procs: list[Any] = []
    workers = Workers(args.workers)
    reset_peak()
    try:
        with tempfile.TemporaryDirectory(prefix="he-cnn-bench-") as tmp:
            log(f"{bits}: HTTP: starting the S2 service (it generates its {bits}-bit keys)")
            t0 = time.perf_counter()
            s2 = CloudProcess("S2", ["--data-dir", f"{tmp}/s2", "--key-bits", str(bits), "--quiet"],
                              {"HECNN_S2_CLOUD_TOKEN": token, "PYTHONPATH": str(ROOT)}, on_log=forward, cwd=ROOT)
            procs.append(s2)
            s2_url = s2.wait_ready(timeout=1800)
            out["s2_start_seconds"] = time.perf_counter() - t0
            key, _ = fetch_public_key(s2_url)
            pk, dgk = key.paillier, key.dgk
            uk = generate_keypair(min(bits, 2048))
            workers.map(os.getpid, [()] * workers.count)
            channel = HTTPChannel(s2_url, token, timeout=3600)
            ctx = profiled_context(pk, dgk, channel, workers, comparison=comparison)
            t0 = time.perf_counter()
            em = encrypt_model(im, pk)
            out["model_encrypt_seconds"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            st = setup_model(ctx, em)
            out["setup_seconds"] = time.perf_counter() - t0
            needs = pool_needs(acct, bits, http=True)
            images = []
            for n, i in enumerate(indices[:args.http_images], 1):
                log(f"{bits}: HTTP (S1 here, S2 service): image {n}/{args.http_images}; waiting for S2's pools")
                waited = wait_offline([s2_url], 1800)
                q = run_query(ctx, em, st, pk, dgk, uk, im, quantize_image(ds.x_test[i], im.input_max), needs)
                q["index"] = i
                q["s2_offline_wait"] = waited
                images.append(q)
                needs = {k: q["pool_taken"][k] for k in needs}
                log(f"{bits}: HTTP image {n}: online {q['online_seconds']:.2f} s, "
                    f"{'exact' if q['exact'] else 'WRONG RESULT'}")
            out["images"] = images
            out["memory_mib"] = {"s1_here": mib(vm_hwm_kb()), "s2_service": mib(vm_hwm_kb(s2.process.pid))}
            channel.close()
            if bits <= args.service_max_bits and args.service_images > 0:
                out["service"] = run_service(bits, im, ds, indices, em, pk, uk, s2, s2_url, token, owner_token,
                                             tmp, forward, procs, CloudProcess, http_request, Message, encode,
                                             decode, args)
    except Exception as e:  # noqa: BLE001 - report, do not lose the other results
        out["error"] = f"{type(e).__name__}: {e}"
        log(f"{bits}: HTTP measurement failed: {out['error']}")
        if args.verbose:
            traceback.print_exc()
    finally:
        for proc in reversed(procs):
            try:
                proc.stop()
            except Exception:  # noqa: BLE001
                pass
        workers.shutdown()
    return out


def wait_offline(urls: list[str], timeout: float, prepared: bool = False) -> float:
    """Seconds until the services at ``urls`` report their offline phase done (``servers.launch``)."""
    from he_cnn.servers.launch import wait_offline as wait

    waited, done = wait(urls, timeout, prepared)
    if not done:
        log(f"offline phase not finished after {timeout:.0f} s; timing anyway")
    return waited


def run_service(bits, im, ds, indices, em, pk, uk, s2, s2_url, token, owner_token, tmp, forward, procs,
                CloudProcess, http_request, Message, encode, decode, args) -> dict:
    """The deployed service: owner upload to S1 (S1 runs the set-up with S2), user classify requests."""
    out: dict[str, Any] = {}
    log(f"{bits}: service: starting S1")
    s1 = CloudProcess("S1", ["--data-dir", f"{tmp}/s1", "--peer-url", s2_url, "--quiet", "--open",
                             "--comparison", args.comparison[0]],
                      {"HECNN_S1_CLOUD_TOKEN": token, "HECNN_S1_OWNER_TOKEN": owner_token, "PYTHONPATH": str(ROOT)},
                      on_log=forward, cwd=ROOT)
    procs.append(s1)
    s1_url = s1.wait_ready(timeout=300)
    reset_peak(s2.process.pid)
    body = em.serialize()
    t0 = time.perf_counter()
    info = http_request("POST", f"{s1_url}/v1/models", "S1", 3600, token=owner_token, data=body).json()
    out["upload_and_setup_seconds"] = time.perf_counter() - t0
    out["upload_bytes"] = len(body)
    model_id = info["model_id"]
    rows = []
    for n, i in enumerate(indices[:args.service_images], 1):
        log(f"{bits}: service: classify request {n}/{args.service_images}; waiting for the services' offline phase")
        waited = wait_offline([s1_url, s2_url], 1800, prepared=True)
        x_int = quantize_image(ds.x_test[i], im.input_max)
        t0 = time.perf_counter()
        msg = Message()
        user_n = np.empty(1, dtype=object)
        user_n[0] = gmpy2.mpz(uk.public.n)
        msg.arrays["user_n"] = user_n
        msg.arrays["image"] = EncryptedTensor.encrypt(pk, x_int).data
        msg.widths["image"] = pk.ciphertext_bytes
        reply = http_request("POST", f"{s1_url}/v1/models/{model_id}/classify", "S1", 7200, data=encode(msg))
        answer = decode(reply.content)
        cts = answer.array("class_vector").reshape(-1)
        vector = [int(v) for v in EncryptedTensor.from_ciphertexts(uk.public, cts, (cts.size,)).decrypt(uk.private)]
        wall = time.perf_counter() - t0
        meta = dict(answer.meta)
        rows.append({"index": i, "seconds": wall, "offline_wait": waited, "server_seconds": meta.get("seconds"),
                     "rounds": meta.get("rounds"), "bytes_to_s2": meta.get("bytes_to_s2"),
                     "bytes_to_s1": meta.get("bytes_to_s1"), "layers": meta.get("layers"),
                     "exact": vector == [int(v) for v in classify_reference(im, x_int)]})
        log(f"{bits}: service request {n}: {wall:.1f} s end to end, {'exact' if rows[-1]['exact'] else 'WRONG'}")
    out["images"] = rows
    out["memory_mib"] = {"s1_service": mib(vm_hwm_kb(s1.process.pid)), "s2_service": mib(vm_hwm_kb(s2.process.pid))}
    return out


# -- machine --------------------------------------------------------------------------------------

#: a section another script measures apart and writes between its own markers (bench/zoo.py's "zoo",
#: bench/ray_scaling.py's "ray", ...): kept when this script rewrites the report
KEPT_SECTION = re.compile(r"<!-- ([\w-]+): begin \(bench/[\w.]+\) -->.*?<!-- \1: end -->", re.S)


def kept_sections(text: str) -> str:
    """Every section of a benchmark report that another script wrote between its markers."""
    return "\n\n".join(m.group(0) for m in KEPT_SECTION.finditer(text))


def machine_facts(args) -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load = Path("/proc/loadavg").read_text().split()[:3]
    except OSError:
        load = []
    try:
        mem = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal"))
    except (OSError, StopIteration):
        mem = None
    import phe

    try:
        import matplotlib
        mpl = matplotlib.__version__
    except ImportError:
        mpl = None
    try:
        import tenseal
        tenseal_version = getattr(tenseal, "__version__", "?")
    except ImportError:
        tenseal_version = None
    return {"cpu": cpu, "cores": default_worker_count(), "logical_cpus": os.cpu_count(), "mem_mib": mib(mem),
            "load_average_at_start": load, "python": platform.python_version(), "gmpy2": gmpy2.version(),
            "gmp": gmpy2.mp_version(), "phe": getattr(phe, "__version__", "?"), "numpy": np.__version__,
            "torch": torch.__version__, "matplotlib": mpl, "tenseal": tenseal_version, "platform": platform.platform(),
            "command": ("python -m bench.bench " if __package__ else "python bench/bench.py ") + " ".join(sys.argv[1:])}


# -- main -----------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keys", type=int, nargs="+", default=[1024, 2048, 3072], help="cloud key sizes in bits")
    ap.add_argument("--backend", choices=["local", "ray"], default="local",
                    help="local: everything below, workers in process pools; ray: only the scaling over Ray nodes "
                         "(bench/ray_scaling.py; the first of --keys, its options below)")
    ray_scaling.add_arguments(ap)
    ap.add_argument("--images", type=int, default=None, help="test images per key size in-process (default 3; --quick 1)")
    ap.add_argument("--images-large", type=int, default=1, help="cap on images for keys above 2048 bits (default 1)")
    ap.add_argument("--workers", type=int, nargs="+", default=None,
                    help="process-pool sizes: the largest runs everything, each count gets the scaling run's "
                         "online latency and throughput (default: 1 and all cores; one number: no scaling run)")
    ap.add_argument("--scaling-images", type=int, default=1, help="images per worker count in the scaling run")
    ap.add_argument("--comparison", nargs="+", choices=["ot", "dgk"], default=["ot", "dgk"],
                    help="comparison protocols to measure (S1Context.comparison), each in the same run; the "
                         "first that runs gives the per-layer figures and the scaling run (default: ot dgk)")
    ap.add_argument("--peer", dest="peer", action="store_true", default=None,
                    help="also run the peer, TenSEAL's encrypted-MNIST design (default: on when tenseal imports)")
    ap.add_argument("--no-peer", dest="peer", action="store_false")
    ap.add_argument("--peer-images", type=int, default=None, help="peer: images timed one by one (default --images)")
    ap.add_argument("--peer-batch", type=int, default=None,
                    help="peer: images back to back for images/hour (default 8; --quick 2)")
    ap.add_argument("--http", dest="http", action="store_true", default=True, help="also measure over HTTP (default)")
    ap.add_argument("--no-http", dest="http", action="store_false")
    ap.add_argument("--http-images", type=int, default=1, help="images per key with S1 here and the S2 service")
    ap.add_argument("--service-images", type=int, default=1, help="classify requests to the full service per key")
    ap.add_argument("--service-max-bits", type=int, default=2048, help="largest key for the full-service run")
    ap.add_argument("--baseline", dest="baseline", action="store_true", default=True, help="phe baseline (default)")
    ap.add_argument("--no-baseline", dest="baseline", action="store_false")
    ap.add_argument("--baseline-block", type=int, default=None, help="side of the block of conv outputs (default 2)")
    ap.add_argument("--baseline-elements", type=int, default=None, help="ReLU elements in the baseline (default 16)")
    ap.add_argument("--baseline-pairs", type=int, default=None,
                    help="alternating runs of the baseline and ours per layer (default 3; --quick 1)")
    ap.add_argument("--batch", type=int, default=None,
                    help="throughput run, offline included: N images (default 4; --quick 2; 0 = off)")
    ap.add_argument("--batch-threads", type=int, default=2, help="concurrent queries in the throughput run")
    ap.add_argument("--batch-keys", type=int, nargs="+", default=None,
                    help="key sizes for the throughput run (default: 2048 if measured, else the smallest)")
    ap.add_argument("--json", metavar="FILE", help="write every figure as JSON")
    ap.add_argument("--markdown", metavar="FILE", default=None, help="write the report (default docs/benchmarks.md unless --quick)")
    ap.add_argument("--plot", metavar="FILE", default=None, help="per-layer plot (default docs/benchmark_layers.png unless --quick)")
    ap.add_argument("--cache-dir", default=None,
                    help="where the trained model is cached (default: the owner pipeline's, shared with he-cnn demo)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 image, small baseline subsets, short timings")
    ap.add_argument("--verbose", action="store_true", help="forward the services' logs, print tracebacks")
    ap.add_argument("--from-json", metavar="FILE", help="measure nothing: rebuild the report (text, --markdown, "
                    "--plot) from a previous --json FILE")
    args = ap.parse_args(argv)
    args.worker_counts = sorted(set(args.workers or [1, default_worker_count()]))
    if min(args.worker_counts) < 1:
        ap.error("--workers: counts must be >= 1")
    args.workers = max(args.worker_counts)  # the main run's
    args.comparison = list(dict.fromkeys(args.comparison))
    if args.peer is None:
        args.peer = peer_available()
    args.images = args.images if args.images is not None else (1 if args.quick else 3)
    args.peer_images = args.peer_images if args.peer_images is not None else args.images
    args.peer_batch = args.peer_batch if args.peer_batch is not None else (2 if args.quick else 8)
    args.batch = args.batch if args.batch is not None else (2 if args.quick else 4)
    args.baseline_block = args.baseline_block or (1 if args.quick else 2)
    args.baseline_elements = args.baseline_elements or (4 if args.quick else 16)
    args.baseline_pairs = args.baseline_pairs or (1 if args.quick else 3)
    args.prim_seconds = 0.1 if args.quick else 0.5
    args.plain_reps = 20 if args.quick else 100
    if args.batch_keys is None:
        args.batch_keys = [2048] if 2048 in args.keys else [min(args.keys)]
    args.scaling_bits = args.batch_keys[0] if args.batch_keys[0] in args.keys else min(args.keys)
    if not args.quick:
        args.markdown = args.markdown or str(ROOT / "docs" / "benchmarks.md")
        args.plot = args.plot or str(ROOT / "docs" / "benchmark_layers.png")
    return args


def peer_available() -> bool:
    try:
        import tenseal  # noqa: F401
        return True
    except ImportError:
        return False


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.backend == "ray":  # the deployed service with each cloud on its own Ray cluster, over node counts
        args.bits = args.keys[0]
        args.json = args.json or str(ROOT / "bench" / "results-ray.json")
        args.markdown = args.markdown or str(ROOT / "docs" / "benchmarks.md")
        return ray_scaling.report(ray_scaling.run(args), args)
    if args.from_json:
        results = json.loads(Path(args.from_json).read_text())
        results["summary"] = report.analyse(results)
        print(report.text_report(results))
        write_outputs(results, args)
        return 0
    facts = machine_facts(args)
    log(f"machine: {facts['cpu']}, {facts['cores']} cores; workers {args.worker_counts}; keys {args.keys}; "
        f"comparisons {args.comparison}; peer {'on' if args.peer else 'off'}")
    trained, train_info = obtain_model(args.cache_dir)
    im, tm, ds = trained.model, trained.float_model, trained.dataset
    indices = list(range(max(args.images, args.http_images, args.service_images, 1)))
    results: dict[str, Any] = {"machine": facts, "args": {k: v for k, v in vars(args).items()},
                               "model": {**train_info, "layers": len(im.layers), "input_shape": list(im.input_shape),
                                         "pixels": int(np.prod(im.input_shape))}}
    log("plaintext: float torch and integer reference")
    results["plaintext"] = measure_plaintext(tm, im, ds, indices[:args.images], args.plain_reps)
    if args.peer:
        log("peer: TenSEAL's encrypted-MNIST design on the same digits")
        try:
            results["peer"] = peer_tenseal.run_peer(ds, images=args.peer_images, batch=args.peer_batch,
                                                    threads=args.workers, log=log)
        except Exception as e:  # noqa: BLE001 - report, do not lose the other results
            traceback.print_exc()
            results["peer"] = {"error": f"{type(e).__name__}: {e}"}
        if "error" in results["peer"]:
            log(f"peer: {results['peer']['error']}")
    else:
        results["peer"] = {"error": "not run (--no-peer)" if peer_available() else peer_tenseal.NOT_INSTALLED}
    accts: dict[str, dict] = {}
    results["accounting_by_protocol"] = {}
    acct_workers = Workers(args.workers)
    for proto in args.comparison:
        log(f"accounting run ({proto}, {ACCOUNTING_BITS}-bit toy key): what one query draws from the randomness pools")
        try:
            acct = accounting_run(im, quantize_image(ds.x_test[indices[0]], im.input_max), acct_workers, proto)
        except Exception as e:  # noqa: BLE001 - e.g. a protocol still under construction
            traceback.print_exc()
            accts[proto] = {"error": f"{type(e).__name__}: {e}"}
            results["accounting_by_protocol"][proto] = accts[proto]
            log(f"accounting run ({proto}) failed: {accts[proto]['error']}")
            continue
        accts[proto] = acct
        summary = {k: v for k, v in acct.items() if k not in ("reveals", "spec")} | {"reveal_calls": len(acct["reveals"])}
        results["accounting_by_protocol"][proto] = summary
        results.setdefault("accounting", summary)
        if not acct["exact"]:
            log(f"WARNING: the accounting run's result ({proto}) differs from the reference")
    acct_workers.shutdown()
    primary = next((p for p in args.comparison if "error" not in accts[p]), None)
    results["inprocess"], results["http"] = [], []
    for bits in args.keys:
        try:
            results["inprocess"].append(run_inprocess(bits, im, ds, indices, accts, args))
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            results["inprocess"].append({"bits": bits, "error": f"{type(e).__name__}: {e}"})
        if args.http and primary is not None:
            results["http"].append(run_http(bits, im, ds, indices, accts[primary], args, primary))
    results["wall_seconds"] = time.perf_counter() - T_START
    summary = report.analyse(results)
    results["summary"] = summary
    print(report.text_report(results))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1, default=_json_default))
        log(f"wrote {args.json}")
    write_outputs(results, args)
    log(f"done in {results['wall_seconds'] / 60:.1f} min")
    failures = [r for r in results["inprocess"] if "error" in r or not all(
        q["exact"] for p in (r.get("protocols") or {}).values() for q in p.get("images", []))]
    return 1 if failures else 0


def write_outputs(results: dict, args) -> None:
    """The plot and the Markdown report (each if asked for)."""
    if args.plot:
        problem = report.plot_layers(results, args.plot)
        log(f"plot skipped: {problem}" if problem else f"wrote {args.plot}")
        results["plot"] = None if problem else args.plot
        if not problem:
            base = Path(args.markdown).resolve().parent if args.markdown else Path.cwd()
            results["plot_link"] = os.path.relpath(Path(args.plot).resolve(), base)
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        target = Path(args.markdown)
        kept = kept_sections(target.read_text()) if target.exists() else ""  # measured apart (zoo, ray, ...)
        target.write_text(report.markdown_report(results) + (f"\n{kept}\n" if kept else ""))
        log(f"wrote {args.markdown}")


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, set):
        return sorted(o)
    return str(o)


if __name__ == "__main__":
    sys.exit(main())
