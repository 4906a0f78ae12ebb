"""``he-cnn user``: make your own key pair, classify images, read the answer only you can decrypt.

Results go to stdout (one line per image, or one JSON object with ``--json``); progress to stderr (a
bar only on a terminal; ``--quiet`` for none). Expected failures end with one line on stderr and exit
status 1, never a traceback: an unreachable S1, or S2 failing behind it, is said in one sentence.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click
from tqdm import tqdm

from he_cnn.crypto.paillier import DEFAULT_KEY_BITS, MIN_KEY_BITS
from he_cnn.console import Reporter, run_step

from .keys import create_user_key, is_private_file, load_user_key, public_path
from .client import Classification, Client
from .identify_cli import identify_command, verify_command


@click.group("user")
def user() -> None:
    """The user: own key pair, encrypted queries, decrypted answers."""


user.add_command(identify_command)  # he-cnn user identify|verify: a gallery's best match (identify_cli)
user.add_command(verify_command)


@user.command("keygen")
@click.option("--out", "out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Secret key file to create (mode 0600); the public part goes to <out>.pub.")
@click.option("--bits", type=click.IntRange(MIN_KEY_BITS, 8192), default=DEFAULT_KEY_BITS, show_default=True)
@click.option("--force", is_flag=True, help="Replace an existing key file.")
def keygen(out: Path, bits: int, force: bool) -> None:
    """Create your own Paillier key pair: only you can decrypt your results."""
    keys = run_step(lambda: create_user_key(out, bits, overwrite=force))
    click.echo(f"key {keys.public.key_id} ({bits} bits): secret key {out} (mode 0600), public key {public_path(out)}")


def _line(result: Classification) -> str:
    return f"{result.image}: class {result.class_name} vector [{', '.join(str(v) for v in result.vector)}]"


def _record(result: Classification) -> dict[str, Any]:
    server = result.server
    return {"image": result.image, "class": result.class_name, "class_index": result.predicted,
            "vector": result.vector, "seconds": round(result.seconds, 3),
            "server": {k: server.get(k) for k in ("seconds", "rounds", "bytes_to_s2", "bytes_to_s1")}}


@user.command("query")
@click.option("--s1", "s1_url", envvar="HECNN_S1_URL", default="http://127.0.0.1:8601", show_default=True,
              help="Base URL of S1.")
@click.option("--model", "model_id", required=True, help="Model id (he-cnn owner upload prints it).")
@click.option("--key", "key_path", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Your secret key file (he-cnn user keygen).")
@click.option("--api-key", envvar="HECNN_API_KEY", show_envvar=True, default=None,
              help="Your API key from S1's operator (prefer the env var; not needed for an open S1).")
@click.option("--tls-ca", envvar="HECNN_TLS_CA", show_envvar=True, type=click.Path(exists=True, dir_okay=False),
              default=None, help="CA (or self-signed certificate) S1's HTTPS certificate must chain to "
                                 "[default: the system's CAs].")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
@click.option("--progress/--no-progress", default=None, show_default="when stderr is a terminal",
              help="Progress bar on stderr.")
@click.option("-q", "--quiet", is_flag=True,
              help="No progress bar on stderr (results, warnings and errors still show).")
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
def query(s1_url: str, model_id: str, key_path: Path, api_key: str | None, tls_ca: str | None, as_json: bool,
          progress: bool | None, quiet: bool, images: tuple[str, ...]) -> None:
    """Classify IMAGES (PNG, JPEG or .npy; grey or colour, converted to the model's channels and resized
    to its input as the model's preprocessing says) without revealing them."""
    keys = run_step(lambda: load_user_key(key_path))
    if not is_private_file(key_path):
        click.echo(f"warning: {key_path} is readable by other users; run: chmod 600 {key_path}", err=True)
    client = run_step(lambda: Client(s1_url, keys, model=model_id, api_key=api_key, tls_ca=tls_ca))
    results = []
    with Reporter(quiet, progress).bar(len(images), "classifying", "image") as bar:
        for path in images:
            bar.set_postfix_str(Path(path).name)
            result = run_step(lambda: client.classify(path)[0])
            bar.update(1)
            results.append(result)
            if not as_json:
                tqdm.write(_line(result), file=sys.stdout)
    if as_json:
        click.echo(json.dumps({"model_id": model_id, "key_id": keys.public.key_id,
                               "results": [_record(r) for r in results]}))
