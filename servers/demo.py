"""``he-cnn demo``: the whole service on this machine in one command.

1. start S2 and S1 as real processes on free localhost ports, with a temporary data directory and
   random tokens (passed through the environment);
2. train the owner's ICNN on the digits, or load it from the cache (keyed by a hash of the training
   settings and of the training code), and upload it through the owner's code path over HTTP;
3. as the user: create a key pair, and classify ``--images`` test images through the user's code path;
4. print per image the true label, the prediction, whether the decrypted vector equals the plaintext
   integer reference exactly, and the time; then a summary; then stop both clouds (also on Ctrl-C or
   an error). ``--json`` prints the same as one JSON object.
"""
from __future__ import annotations

import itertools
import json
import secrets
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import click
import numpy as np

from he_cnn.crypto.paillier import DEFAULT_KEY_BITS, MIN_KEY_BITS
from he_cnn.graph.reference import classify_reference
from he_cnn.owner.cli import upload_model
from he_cnn.owner.pipeline import TrainedModel, TrainSettings, cached_model, train_model
from he_cnn.user.keys import create_user_key
from he_cnn.user.query import Session

from he_cnn.console import run_step
from .config import COMPARISONS, DEFAULT_COMPARISON
from .launch import CloudProcess, wait_offline

#: longest wait for the clouds' offline phase before a query (a 2048-bit query's randomness takes ~30 s)
OFFLINE_WAIT_SECONDS = 300.0


def trained_model(settings: TrainSettings, use_cache: bool, note: Callable[[str], None]) -> TrainedModel:
    """Train, or load the model trained with the same settings and code from the owner's cache
    (:func:`~he_cnn.owner.pipeline.cached_model`, shared with the benchmark)."""
    if use_cache:
        return cached_model(settings, note=lambda message: note(f"owner: {message}"))
    note(f"owner: training the ICNN ({settings.epochs} epochs, seed {settings.seed})")
    return train_model(settings)


def pick_test_images(trained: TrainedModel, count: int) -> list[int]:
    """Indices of ``count`` test images taking the classes in turn, so the demo shows different digits."""
    labels = trained.dataset.y_test
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    order = [i for group in itertools.zip_longest(*by_class) for i in group if i is not None]
    return [int(i) for i in order[:count]]


def run_demo(images: int, key_bits: int, epochs: int, use_cache: bool, verbose: bool, warm: bool = True,
             comparison: str = DEFAULT_COMPARISON) -> dict[str, Any]:
    def note(message: str) -> None:
        click.echo(message, err=True)

    forward = note if verbose else None
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="he-cnn-demo-") as tmp:
        work = Path(tmp)
        cloud_token, owner_token = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
        note(f"S2: starting; generating a {key_bits}-bit cloud key pair and a DGK key pair")
        s2 = CloudProcess("S2", ["--data-dir", str(work / "s2"), "--key-bits", str(key_bits), "--quiet"],
                          {"HECNN_S2_CLOUD_TOKEN": cloud_token}, on_log=forward)
        s1: CloudProcess | None = None
        try:
            trained = trained_model(TrainSettings(epochs=epochs), use_cache, note)
            note(f"owner: float accuracy {trained.float_accuracy:.2%}, integer accuracy "
                 f"{trained.integer_accuracy:.2%} on {len(trained.dataset.y_test)} test images")
            s2_url = s2.wait_ready()
            note(f"S2: listening on {s2_url}")
            s1 = CloudProcess("S1", ["--data-dir", str(work / "s1"), "--peer-url", s2_url, "--comparison", comparison,
                                     "--quiet", "--open"],
                              {"HECNN_S1_CLOUD_TOKEN": cloud_token, "HECNN_S1_OWNER_TOKEN": owner_token},
                              on_log=forward)
            s1_url = s1.wait_ready()
            note(f"S1: listening on {s1_url}")

            uploaded = upload_model(trained, s1_url, owner_token)
            note(f"owner: uploaded model {uploaded['model_id']} ({uploaded['upload_bytes'] / 2**20:.1f} MiB; "
                 f"encrypt {uploaded['encrypt_seconds']:.1f} s, upload and set-up {uploaded['upload_seconds']:.1f} s)")

            key_path = work / "user" / "user.key"
            user_keys = create_user_key(key_path, max(MIN_KEY_BITS, key_bits))
            session = Session(s1_url, uploaded["model_id"], user_keys)
            rows = []
            indices = pick_test_images(trained, images)
            for n, index in enumerate(indices, 1):
                path = work / "user" / f"test-{index}.npy"
                np.save(path, trained.dataset.x_test[index][0])
                waited = 0.0
                if warm:
                    note(f"user: image {n}/{len(indices)}: waiting for the clouds' offline phase (query masks and "
                         "randomness, computed while idle) ...")
                    waited, _ = wait_offline([s1_url, s2_url], OFFLINE_WAIT_SECONDS, prepared=True)
                note(f"user: image {n}/{len(indices)} (test image #{index}): encrypting and querying S1 ...")
                result = session.classify(path)
                reference = [int(v) for v in classify_reference(trained.model, result.pixels)]
                row = {"index": index, "label": int(trained.dataset.y_test[index]), "predicted": result.predicted,
                       "equals_reference": result.vector == reference, "seconds": round(result.seconds, 3),
                       "offline_wait_seconds": round(waited, 3),
                       "rounds": result.server.get("rounds"), "bytes_to_s2": result.server.get("bytes_to_s2"),
                       "bytes_to_s1": result.server.get("bytes_to_s1")}
                note(f"user: image {n}/{len(indices)}: class {result.class_name} in {result.seconds:.1f} s; "
                     f"{'equals' if row['equals_reference'] else 'DIFFERS FROM'} the integer reference")
                rows.append(row)
        finally:
            for cloud in (s1, s2):
                if cloud is not None:
                    status = cloud.stop()
                    note(f"{cloud.role}: stopped (exit status {status})")
    total = sum(r["seconds"] for r in rows)
    return {
        "key_bits": key_bits,
        "comparison": comparison,
        "model_id": uploaded["model_id"],
        "float_accuracy": trained.float_accuracy,
        "integer_accuracy": trained.integer_accuracy,
        "upload": {k: uploaded[k] for k in ("upload_bytes", "encrypt_seconds", "upload_seconds")},
        "images": rows,
        "totals": {
            "images": len(rows),
            "correct": sum(r["label"] == r["predicted"] for r in rows),
            "equal_reference": sum(r["equals_reference"] for r in rows),
            "query_seconds": round(total, 3),
            "mean_seconds": round(total / len(rows), 3) if rows else None,
            "wall_seconds": round(time.perf_counter() - started, 3),
        },
    }


def print_report(report: dict[str, Any]) -> None:
    click.echo(f"{'image':>6} {'label':>6} {'predicted':>10}  {'equals reference':<17} {'seconds':>8} "
               f"{'offline wait':>13}")
    for n, row in enumerate(report["images"], 1):
        click.echo(f"{n:>6} {row['label']:>6} {row['predicted']:>10}  {'yes' if row['equals_reference'] else 'NO':<17} "
                   f"{row['seconds']:>8.1f} {row['offline_wait_seconds']:>12.1f}s")
    t = report["totals"]
    click.echo(f"summary: {t['equal_reference']}/{t['images']} equal the plaintext integer reference exactly, "
               f"{t['correct']}/{t['images']} correct, {t['mean_seconds']:.1f} s per image "
               f"({report['key_bits']}-bit keys; integer model accuracy {report['integer_accuracy']:.2%})")


@click.command("demo")
@click.option("--images", type=click.IntRange(1, 100), default=5, show_default=True, help="Test images to classify.")
@click.option("--key-bits", type=click.IntRange(MIN_KEY_BITS, 4096), default=DEFAULT_KEY_BITS, show_default=True,
              help="Cloud key size (1024 is about three times faster, for a quick look only).")
@click.option("--epochs", type=click.IntRange(1, 1000), default=15, show_default=True, help="Training epochs.")
@click.option("--cache/--no-cache", default=True, show_default=True,
              help="Reuse a model trained with the same settings (in $HECNN_CACHE_DIR or ~/.cache/he-cnn).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the table.")
@click.option("--verbose", is_flag=True, help="Also show the clouds' logs.")
@click.option("--warm/--cold", default=True, show_default=True,
              help="Before each query, wait until both clouds have done their offline phase (prepared query, "
                   "full randomness pools), as an idle service has; --cold queries at once.")
@click.option("--comparison", type=click.Choice(COMPARISONS), default=DEFAULT_COMPARISON, show_default=True,
              help="S1's comparison protocol (he-cnn serve s1 --comparison).")
def demo(images: int, key_bits: int, epochs: int, cache: bool, as_json: bool, verbose: bool, warm: bool,
         comparison: str) -> None:
    """Run S1 and S2 on localhost, upload the owner's model, classify test images as the user, compare
    each answer with the plaintext integer reference, and stop the clouds."""
    report = run_step(lambda: run_demo(images, key_bits, epochs, cache, verbose, warm, comparison))
    if as_json:
        click.echo(json.dumps(report))
    else:
        print_report(report)
    if report["totals"]["equal_reference"] != report["totals"]["images"]:
        raise click.ClickException("some decrypted class vectors differ from the plaintext integer reference")
    sys.stdout.flush()
