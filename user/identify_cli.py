"""``he-cnn user identify`` and ``he-cnn user verify``: who is in this image, among a gallery's identities?

``identify`` prints, per image, the index of the best-matching enrolled template or "no match"
(``--labels`` names it from the owner's labels file); ``verify --claim J`` prints match or no match
for the claimed index J. Neither cloud learns the image, a similarity or the answer; the user learns
no similarity either. ``--json`` prints one JSON object.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from he_cnn.console import run_step
from he_cnn.protocols.identify import read_labels_file

from .identify import GallerySession, Identification
from .keys import is_private_file, load_user_key

_OPTIONS = [
    click.option("--s1", "s1_url", envvar="HECNN_S1_URL", default="http://127.0.0.1:8601", show_default=True,
                 help="Base URL of S1."),
    click.option("--gallery", "gallery_id", required=True, help="Gallery id (he-cnn owner enrol prints it)."),
    click.option("--key", "key_path", type=click.Path(dir_okay=False, path_type=Path), required=True,
                 help="Your secret key file (he-cnn user keygen)."),
    click.option("--api-key", envvar="HECNN_API_KEY", show_envvar=True, default=None,
                 help="Your API key from S1's operator (not needed for an open S1)."),
    click.option("--labels", "labels_path", type=click.Path(exists=True, dir_okay=False), default=None,
                 help="The owner's labels file (index -> label), to name the answers."),
    click.option("--tls-ca", envvar="HECNN_TLS_CA", show_envvar=True, type=click.Path(exists=True, dir_okay=False),
                 default=None, help="CA S1's HTTPS certificate must chain to [default: the system's CAs]."),
    click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text."),
    click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False)),
]


def _options(f: Any) -> Any:
    for option in reversed(_OPTIONS):
        f = option(f)
    return f


def _run(s1_url: str, gallery_id: str, key_path: Path, api_key: str | None, labels_path: str | None,
         tls_ca: str | None, as_json: bool, images: tuple[str, ...], claimed: int | None) -> None:
    keys = run_step(lambda: load_user_key(key_path))
    if not is_private_file(key_path):
        click.echo(f"warning: {key_path} is readable by other users; run: chmod 600 {key_path}", err=True)
    labels: dict[str, Any] = run_step(lambda: read_labels_file(labels_path))["labels"] if labels_path else {}
    session = run_step(lambda: GallerySession(s1_url, gallery_id, keys, api_key, tls_ca))
    records = []
    for path in images:
        answer: Identification = run_step(lambda: session.identify(path) if claimed is None
                                          else session.verify(path, claimed))
        record: dict[str, Any] = {"image": answer.image, "seconds": round(answer.seconds, 3),
                                  "server": {k: answer.server.get(k) for k in ("seconds", "rounds", "bytes_to_s2",
                                                                               "bytes_to_s1")}}
        if claimed is None:
            record.update({"index": answer.index, "label": labels.get(str(answer.index))})
            text = "no match" if answer.index is None else \
                f"index {answer.index}" + (f" ({record['label']})" if record["label"] is not None else "")
        else:
            record.update({"claimed": claimed, "match": answer.index == claimed})
            text = "match" if record["match"] else "no match"
        records.append(record)
        if not as_json:
            click.echo(f"{answer.image}: {text}")
    if as_json:
        click.echo(json.dumps({"gallery_id": gallery_id, "results": records}))


@click.command("identify")
@_options
def identify_command(s1_url: str, gallery_id: str, key_path: Path, api_key: str | None, labels_path: str | None,
                     tls_ca: str | None, as_json: bool, images: tuple[str, ...]) -> None:
    """The best-matching identity of each image among the gallery's, or "no match"."""
    _run(s1_url, gallery_id, key_path, api_key, labels_path, tls_ca, as_json, images, None)


@click.command("verify")
@_options
@click.option("--claim", type=click.IntRange(0), required=True, help="The claimed identity's index.")
def verify_command(s1_url: str, gallery_id: str, key_path: Path, api_key: str | None, labels_path: str | None,
                   tls_ca: str | None, as_json: bool, images: tuple[str, ...], claim: int) -> None:
    """Whether each image matches the claimed identity: match or no match, nothing else."""
    _run(s1_url, gallery_id, key_path, api_key, labels_path, tls_ca, as_json, images, claim)
