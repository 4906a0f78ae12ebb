"""``he-cnn owner``: train and quantise the ICNN, then encrypt and upload it to S1.

Results go to stdout (``--json`` for scripts), progress and notes to stderr. Expected failures (S1
unreachable, wrong token, unreadable image folder) end with one line on stderr and exit status 1.
"""
from __future__ import annotations

import json
import sys
import time
from typing import Any, Callable

import click
from tqdm import tqdm

from he_cnn.graph.integer_model import save_integer_model
from he_cnn.console import run_step

from .pipeline import (TrainedModel, TrainSettings, count_ciphertexts, encrypt_for_upload, fetch_cloud_key,
                       load_model, train_model, upload)


def _settings_options(f: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--images", type=click.Path(exists=True, file_okay=False),
                     help="Train on this folder (one sub-folder of PNG/JPEG images per class) instead of the digits."),
        click.option("--size", type=click.IntRange(8, 64), default=16, show_default=True,
                     help="Images are resized to size x size."),
        click.option("--epochs", type=click.IntRange(1, 1000), default=15, show_default=True),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed of the split and the training."),
        click.option("--input-max", type=click.IntRange(1, 255), default=15, show_default=True,
                     help="Pixels are encoded as integers 0..input-max."),
        click.option("--weight-bits", type=click.IntRange(2, 16), default=6, show_default=True,
                     help="Signed bits per quantised weight."),
        click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _note(message: str) -> None:
    click.echo(message, err=True)


def _obtain(settings: TrainSettings, model_path: str | None) -> TrainedModel:
    if model_path:
        _note(f"loading the integer model from {model_path}")
        return run_step(lambda: load_model(model_path, settings))
    source = settings.images or "the embedded digits"
    _note(f"training the ICNN on {source} ({settings.epochs} epochs) and quantising it")
    return run_step(lambda: train_model(settings))


def _accuracy_report(trained: TrainedModel) -> dict[str, Any]:
    return {"float_accuracy": trained.float_accuracy, "integer_accuracy": trained.integer_accuracy,
            "test_images": int(len(trained.dataset.y_test)), "classes": list(trained.dataset.classes)}


def _print_accuracy(trained: TrainedModel) -> None:
    if trained.float_accuracy is not None:
        click.echo(f"float accuracy:   {trained.float_accuracy:.2%}")
    click.echo(f"integer accuracy: {trained.integer_accuracy:.2%} on {len(trained.dataset.y_test)} test images")


@click.group("owner")
def owner() -> None:
    """The data owner: train, quantise, encrypt and upload the ICNN."""


@owner.command("train")
@_settings_options
@click.option("--save-model", "save_path", type=click.Path(dir_okay=False), required=True,
              help="Where to write the integer model (JSON).")
def train_command(save_path: str, as_json: bool, **settings: Any) -> None:
    """Train and quantise the ICNN and save the integer model (no upload)."""
    trained = _obtain(TrainSettings(**settings), None)
    run_step(lambda: save_integer_model(trained.model, save_path))
    if as_json:
        click.echo(json.dumps({**_accuracy_report(trained), "saved": save_path}))
    else:
        _print_accuracy(trained)
        click.echo(f"saved: {save_path}")


@owner.command("upload")
@_settings_options
@click.option("--s1", "s1_url", envvar="HECNN_S1_URL", default="http://127.0.0.1:8601", show_default=True,
              help="Base URL of S1.")
@click.option("--token", envvar="HECNN_OWNER_TOKEN", required=True, show_envvar=True,
              help="The owner token S1 was started with (prefer the env var).")
@click.option("--model", "model_path", type=click.Path(exists=True, dir_okay=False),
              help="Upload this saved integer model instead of training one.")
@click.option("--save-model", "save_path", type=click.Path(dir_okay=False),
              help="Also save the integer model (JSON) here.")
def upload_command(s1_url: str, token: str, model_path: str | None, save_path: str | None, as_json: bool,
                   **settings: Any) -> None:
    """Train (or load) the ICNN, encrypt it under the clouds' key and upload it to S1; prints the model id."""
    trained = _obtain(TrainSettings(**settings), model_path)
    if save_path:
        run_step(lambda: save_integer_model(trained.model, save_path))
    if not as_json:
        _print_accuracy(trained)
    result = upload_model(trained, s1_url, token)
    if as_json:
        click.echo(json.dumps({**_accuracy_report(trained), **result}))
    else:
        click.echo(f"model id: {result['model_id']}")


def upload_model(trained: TrainedModel, s1_url: str, token: str, show_progress: bool = True) -> dict[str, Any]:
    """Fetch the key from S1, encrypt with a progress bar on stderr, upload; S1's answer plus timings."""
    key = run_step(lambda: fetch_cloud_key(s1_url))
    _note(f"cloud key {key.key_id} ({key.paillier.bits} bits) from {s1_url}")
    started = time.perf_counter()
    with tqdm(total=count_ciphertexts(trained.model), desc="encrypting weights", unit="ct", file=sys.stderr,
              disable=not show_progress, leave=False) as bar:
        body = run_step(lambda: encrypt_for_upload(trained.model, key, bar.update))
    encrypted = time.perf_counter()
    _note(f"encrypted in {encrypted - started:.1f} s ({len(body) / 2**20:.1f} MiB); uploading, S1 and S2 run the set-up")
    result = run_step(lambda: upload(s1_url, token, body))
    return {**result, "key_bits": key.paillier.bits, "encrypt_seconds": round(encrypted - started, 3),
            "upload_seconds": round(time.perf_counter() - encrypted, 3), "upload_bytes": len(body)}

