"""``he-cnn owner federate``: K owners train one ICNN through the clouds, simulated here or each on its own machine.

Each owner gets its part of the data (a split of a bundled set, ``--split iid`` or non-IID ``label``, or
its own image folder), trains locally, and its fixed-point weights go to S1 encrypted under the cloud key
with the owner's own session token; the weighted sum comes back only under the consortium's key
(:mod:`he_cnn.training.federated`, :mod:`he_cnn.owner.federating`). Three sub-commands:

* ``simulate`` (also what ``he-cnn owner federate`` with options and no sub-command runs): all K owners
  in this process, the consortium key made in memory; per round the average's test accuracy and the
  costs, the aggregate then published as a model, its float and integer accuracies and, with
  ``--compare``, centralised training on the union of the data with the same epochs.
* ``create``: the coordinator (S1's owner token) creates the session and writes one owner file per owner
  (:mod:`he_cnn.owner.federation_file`: that owner's token, the session's public parameters, the
  consortium key pair), to be handed to each owner privately.
* ``join``: one owner, on its own machine with its own data and only its own token, runs its side of
  every round and reports each round's accuracy on its own held-out images.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import click
import numpy as np

from he_cnn.console import Reporter, run_step
from he_cnn.crypto.paillier import MIN_KEY_BITS, KeyPair, generate_keypair
from he_cnn.errors import BadRequest, KeyMismatch
from he_cnn.training.data import NAMED_DATASETS, load_dataset
from he_cnn.training.federated import (SPLITS, FederatedSettings, RoundReport, run_session, session_shape,
                                       split_dataset, train_rounds)
from he_cnn.graph.integer_model import IntegerModel
from he_cnn.protocols import aggregate
from he_cnn.training.data import Dataset
from he_cnn.training.train import train_icnn
from he_cnn.transport.http_channel import CloudPublicKey

from .federating import HTTPAggregator, create_session
from .federation_file import OwnerFile, prepare_folder, read_owner_file, write_owner_files
from .pipeline import check_owner, fetch_cloud_key, score_integer_model

#: pixels become integers 0..15, the ICNN's input (also what the published model is served with)
INPUT_MAX = 15
ARCH = "icnn"


@dataclass(frozen=True)
class OpenedSession:
    """A session just created at S1: the cloud key, the data set that fixed its shape, the consortium key
    pair, the public layout and S1's answer (with every owner's token)."""

    key: CloudPublicKey
    dataset: Dataset
    consortium: KeyPair
    layout: aggregate.AggregationLayout
    created: dict[str, Any]

    @property
    def session_id(self) -> str:
        return str(self.created["session_id"])


def open_session(s1_url: str, owner_token: str, settings: FederatedSettings, data: str,
                 weights: Sequence[int] | None = None, tls_ca: str | None = None,
                 round_seconds: float | None = None) -> OpenedSession:
    """Create a session at S1 for a model of ``data``'s shape and classes; the owners' weights are
    ``weights`` or the sizes of ``data``'s split K ways. A fresh consortium key pair, as large as the cloud key."""
    key = check_owner(s1_url, owner_token, tls_ca)
    dataset = load_dataset(data, input_max=INPUT_MAX)
    count, split_weights = session_shape(dataset, settings, ARCH)
    weights = split_weights if weights is None else tuple(weights)
    if len(weights) != settings.owners:
        raise BadRequest(f"{len(weights)} weights for {settings.owners} owners")
    consortium = generate_keypair(max(MIN_KEY_BITS, key.paillier.bits))
    created = create_session(s1_url, owner_token, count, settings.value_bits, weights, settings.rounds, consortium,
                             tls_ca, round_seconds)
    layout = aggregate.AggregationLayout(count, settings.value_bits, weights, key.paillier.bits)
    return OpenedSession(key, dataset, consortium, layout, created)


def federate(s1_url: str, owner_token: str, settings: FederatedSettings, data: str = "digits", compare: bool = False,
             note: Callable[[str], None] = lambda _: None, tls_ca: str | None = None
             ) -> tuple[dict[str, Any], IntegerModel, Dataset]:
    """A whole session against S1 for K simulated owners, its aggregate then published as a model: the
    report as JSON-ready values, the served integer model (its answers' reference) and the data set."""
    opened = open_session(s1_url, owner_token, settings, data, tls_ca=tls_ca)
    dataset, weights, key = opened.dataset, opened.layout.weights, opened.key
    note(f"session {opened.session_id} at S1: {settings.owners} owners ({settings.split}, {sum(weights)} training "
         f"images), {settings.rounds} rounds of {settings.local_epochs} local epochs, {opened.layout.packs} "
         f"ciphertexts per update")
    aggregator = HTTPAggregator(s1_url, opened.session_id, opened.created["owner_tokens"], key, opened.consortium,
                                tls_ca)
    report = run_session(dataset, settings, aggregator, ARCH)
    note("publishing the aggregate as a model: S1 unpacks it, the owners name its public spec")
    served, published = aggregator.publish(report.model, dataset, opened.layout, settings.fraction_bits)
    result: dict[str, Any] = {**report.to_json(), "session_id": opened.session_id,
                              "key_bits": key.paillier.bits, "float_accuracy": report.rounds[-1].float_accuracy,
                              "integer_accuracy": score_integer_model(served, dataset),
                              "model_id": published["model_id"]}
    if compare:
        note(f"centralised training on all {sum(weights)} images, {settings.total_epochs} epochs, for comparison")
        result["centralised_float_accuracy"] = train_icnn(dataset, epochs=settings.total_epochs,
                                                          seed=settings.seed).float_test_accuracy
    return result, served, dataset


def create_owner_files(s1_url: str, owner_token: str, settings: FederatedSettings, data: str, out: Path,
                       weights: Sequence[int] | None = None, round_seconds: float | None = None,
                       tls_ca: str | None = None) -> tuple[OpenedSession, list[Path]]:
    """The coordinator's step: create the session at S1 and write one owner file per owner into ``out``."""
    prepare_folder(out, settings.owners)
    opened = open_session(s1_url, owner_token, settings, data, weights, tls_ca, round_seconds)
    dataset = opened.dataset
    template = OwnerFile(s1_url, opened.session_id, 0, "", opened.key.key_id, settings, opened.layout.weights, ARCH,
                         tuple(int(v) for v in dataset.x_train.shape[1:]), tuple(dataset.classes), opened.consortium)
    return opened, write_owner_files(out, template, opened.created["owner_tokens"])


def parse_split_of(text: str | None) -> tuple[int, int] | None:
    """``K/IDX`` (part IDX, from 0, of K) or None."""
    if text is None:
        return None
    match = re.fullmatch(r"(\d{1,4})/(\d{1,4})", text.strip())
    if match is None or not 0 <= int(match[2]) < int(match[1]) or int(match[1]) < 1:
        raise BadRequest(f"--split-of expects K/IDX with 0 <= IDX < K (e.g. 3/0), got {text[:40]!r}")
    return int(match[1]), int(match[2])


def owner_data(session: OwnerFile, data: str, split_of: tuple[int, int] | None) -> tuple[Dataset, Dataset]:
    """The owner's data set (its test split is its held-out data) and its training part: ``split_of``'s part,
    by default for a bundled data set the session's split K ways and this owner's index, else the whole
    folder. Refuses data that does not fit the session: another image shape, other classes, or a training
    set of another size than the owner's weight."""
    dataset = load_dataset(data, size=session.input_shape[1], input_max=INPUT_MAX)
    if split_of is None and data in NAMED_DATASETS:
        split_of = (session.settings.owners, session.owner)
    part = dataset if split_of is None else split_dataset(dataset, split_of[0], session.settings.split,
                                                          session.settings.seed)[split_of[1]]
    if tuple(dataset.x_train.shape[1:]) != session.input_shape or tuple(dataset.classes) != session.classes:
        raise BadRequest(f"{data} has images {tuple(dataset.x_train.shape[1:])} of classes "
                         f"{list(dataset.classes)[:20]}; "
                         f"the session's model takes {session.input_shape} of {list(session.classes)[:20]}")
    if len(part.y_train) != session.weights[session.owner]:
        raise BadRequest(f"your training set has {len(part.y_train)} images; the session declares "
                         f"{session.weights[session.owner]} for owner {session.owner} (see --split-of)")
    return dataset, part


def sums_digest(sums: Any) -> str:
    """A short fingerprint of a round's weighted sums: owners compare it to see they hold the same average."""
    return hashlib.sha256(",".join(str(int(v)) for v in np.asarray(sums).reshape(-1)).encode()).hexdigest()[:16]


def join(session: OwnerFile, data: str, split_of: tuple[int, int] | None = None, s1_url: str | None = None,
         tls_ca: str | None = None, on_round: Callable[[dict[str, Any]], None] = lambda _: None,
         note: Callable[[str], None] = lambda _: None, wait_seconds: float | None = None) -> dict[str, Any]:
    """One owner's side of every round of ``session``, with only its own token: the report as JSON-ready values."""
    dataset, part = owner_data(session, data, split_of)
    url = s1_url or session.s1_url
    key = fetch_cloud_key(url, tls_ca)
    if key.key_id != session.cloud_key_id:
        raise KeyMismatch(f"S1 at {url} serves cloud key {key.key_id}; the session was created under "
                          f"{session.cloud_key_id}")
    aggregator = HTTPAggregator(url, session.session_id, {session.owner: session.token}, key, session.consortium,
                                tls_ca, **({} if wait_seconds is None else {"wait_seconds": wait_seconds}))
    state = aggregator.status()
    if state.get("round") != 1:
        where = "finished" if state.get("finished") else f"at round {state.get('round')}"
        raise BadRequest(f"session {session.session_id} is {where}; join takes part from round 1 on")
    settings = session.settings
    note(f"owner {session.owner} of {settings.owners} in session {session.session_id}: {len(part.y_train)} training "
         f"images, {settings.rounds} rounds of {settings.local_epochs} local epochs")

    def round_json(report: RoundReport) -> dict[str, Any]:
        return {**report.to_json(), "sum_sha256": sums_digest(report.aggregation.sums)}

    report = train_rounds([part], session.weights, dataset, settings, aggregator, session.arch,
                          on_round=lambda r: on_round(round_json(r)))
    return {"session_id": session.session_id, "owner": session.owner, "samples": len(part.y_train),
            "weights": list(session.weights), "key_bits": key.paillier.bits,
            "rounds": [round_json(r) for r in report.rounds], "float_accuracy": report.rounds[-1].float_accuracy,
            "test_images": int(len(dataset.y_test))}


ROUND_HEADER = (f"{'round':>5} {'accuracy':>9} {'train s':>8} {'encrypt s':>9} {'upload s':>8} {'S1 s':>6} "
                f"{'up kB':>7} {'S1-S2 kB':>8}")


def round_row(r: dict[str, Any]) -> str:
    """One round of a report (:meth:`~he_cnn.training.federated.RoundReport.to_json`) as a row under
    :data:`ROUND_HEADER`, the owners' figures averaged."""
    owners = r["owners"]
    mean = lambda key: sum(o[key] for o in owners) / len(owners)  # noqa: E731
    return (f"{r['round']:>5} {r['float_accuracy']:>9.2%} {mean('train_s'):>8.2f} {mean('encrypt_s'):>9.2f} "
            f"{mean('upload_s'):>8.2f} {r['s1_aggregation_s']:>6.2f} {mean('upload_bytes') / 1e3:>7.0f} "
            f"{r['cloud_bytes'] / 1e3:>8.0f}")


def print_report(result: dict[str, Any]) -> None:
    click.echo(ROUND_HEADER)
    for r in result["rounds"]:
        click.echo(round_row(r))
    click.echo(f"federated model: float {result['float_accuracy']:.2%}, integer {result['integer_accuracy']:.2%}; "
               f"served by S1 as model {result['model_id']}")
    if "centralised_float_accuracy" in result:
        click.echo(f"centralised:     float {result['centralised_float_accuracy']:.2%} (same epochs, all data)")


def _apply(f: Callable[..., Any], options: list[Callable[..., Any]]) -> Callable[..., Any]:
    for option in reversed(options):
        f = option(f)
    return f


OUTPUT_OPTIONS = [click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text."),
                  click.option("-q", "--quiet", is_flag=True, help="No notes on stderr.")]
S1_OPTION = click.option("--s1", "s1_url", envvar="HECNN_S1_URL", default="http://127.0.0.1:8601", show_default=True,
                         help="Base URL of S1.")
TLS_CA_OPTION = click.option("--tls-ca", envvar="HECNN_TLS_CA", show_envvar=True,
                             type=click.Path(exists=True, dir_okay=False), default=None,
                             help="CA (or self-signed certificate) S1's HTTPS certificate must chain to "
                                  "[default: the system's CAs].")
TOKEN_OPTION = click.option("--token", envvar="HECNN_OWNER_TOKEN", required=True, show_envvar=True,
                            help="S1's owner token: creates the session (each owner then uploads with its own "
                                 "session token).")


def session_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """What a session fixes for every owner: K, R, the local epochs, the split of a bundled data set, the seed."""
    return _apply(f, [
        click.option("--owners", type=click.IntRange(2, 64), default=3, show_default=True, help="K, the data owners."),
        click.option("--rounds", type=click.IntRange(1, 100), default=6, show_default=True, help="R, averaging rounds."),
        click.option("--local-epochs", type=click.IntRange(1, 100), default=5, show_default=True,
                     help="Epochs each owner trains per round."),
        click.option("--split", type=click.Choice(SPLITS), default="iid", show_default=True,
                     help="iid: an even random deal; label: non-IID, two label-sorted shards per owner."),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed of the split and the training."),
    ])


def federation_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """A simulated session's options (``simulate`` and ``he-cnn federate-demo``)."""
    return session_options(_apply(f, [
        click.option("--compare", is_flag=True, help="Also train centrally on all the data with the same epochs."),
        *OUTPUT_OPTIONS]))


def output_options(f: Callable[..., Any]) -> Callable[..., Any]:
    return _apply(f, OUTPUT_OPTIONS)


class SimulateByDefault(click.Group):
    """``he-cnn owner federate`` followed by options, no sub-command, runs ``simulate`` (as it did before
    the per-owner sub-commands existed)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = ["simulate", *args]
        return super().parse_args(ctx, args)


@click.group("federate", cls=SimulateByDefault)
def federate_command() -> None:
    """Several owners train one ICNN: local training, encrypted averaging through S1 and S2.

    Simulated (K owners in this process): he-cnn owner federate [simulate] --token T ...  Each owner on its
    own machine: the coordinator runs `create` and hands each owner its file; each owner runs `join`.
    """


@federate_command.command("simulate")
@S1_OPTION
@TOKEN_OPTION
@click.option("--data", default="digits", show_default=True, help="digits, mnist or an image folder.")
@TLS_CA_OPTION
@federation_options
def simulate_command(s1_url: str, token: str, data: str, tls_ca: str | None, owners: int, rounds: int,
                     local_epochs: int, split: str, seed: int, compare: bool, as_json: bool, quiet: bool) -> None:
    """K simulated owners in this process, each with its split of the data and its own session token."""
    report = Reporter(quiet)
    settings = run_step(lambda: FederatedSettings(owners, rounds, local_epochs, split, seed))
    result = run_step(lambda: federate(s1_url, token, settings, data, compare, report.note, tls_ca))[0]
    click.echo(json.dumps(result) if as_json else "", nl=as_json)
    if not as_json:
        print_report(result)


def parse_weights(text: str | None) -> tuple[int, ...] | None:
    """``--weights 120,80,95`` as integers, or None."""
    if text is None:
        return None
    try:
        weights = tuple(int(w) for w in text.split(",", 64))
    except ValueError:
        raise BadRequest(f"--weights expects comma-separated training-set sizes, got {text[:60]!r}") from None
    if any(w < 1 for w in weights):
        raise BadRequest("--weights: every training-set size must be at least 1")
    return weights


@federate_command.command("create")
@S1_OPTION
@TOKEN_OPTION
@click.option("--data", default="digits", show_default=True,
              help="digits, mnist or an image folder: fixes the model's input shape and classes (and, without "
                   "--weights, the owners' weights: the sizes of its split K ways).")
@click.option("--weights", default=None, help="The owners' training-set sizes, comma-separated (owners with "
                                              "their own image folders tell the coordinator theirs).")
@click.option("--round-seconds", type=click.FloatRange(1, 7 * 86400), default=None,
              help="A round with owners missing this long after its first upload is aborted [default: S1's, 1 h].")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder for the owner files owner-<k>.json (0700; each file 0600, a secret of its owner).")
@TLS_CA_OPTION
@session_options
@output_options
def create_command(s1_url: str, token: str, data: str, weights: str | None, round_seconds: float | None, out: Path,
                   tls_ca: str | None, owners: int, rounds: int, local_epochs: int, split: str, seed: int, as_json: bool,
                   quiet: bool) -> None:
    """The coordinator: create a session at S1 and write one owner file per owner (its token and the consortium key)."""
    report = Reporter(quiet)
    settings = run_step(lambda: FederatedSettings(owners, rounds, local_epochs, split, seed))
    opened, paths = run_step(lambda: create_owner_files(s1_url, token, settings, data, out, parse_weights(weights),
                                                        round_seconds, tls_ca))
    report.note("give each owner its own file over a private channel: it holds that owner's token and the "
                "consortium's secret key; then each owner runs: he-cnn owner federate join --session-file FILE")
    result = {"session_id": opened.session_id, "owners": owners, "rounds": rounds,
              "weights": list(opened.layout.weights),
              "packs": opened.layout.packs, "owner_files": [str(p) for p in paths]}
    if as_json:
        click.echo(json.dumps(result))
    else:
        click.echo(f"session {opened.session_id} at S1: {owners} owners "
                   f"(weights {', '.join(map(str, result['weights']))}), "
                   f"{rounds} rounds of {local_epochs} local epochs, {opened.layout.packs} ciphertexts per update")
        for path in paths:
            click.echo(f"owner file: {path}")


@federate_command.command("join")
@click.option("--session-file", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="This owner's file from `he-cnn owner federate create`.")
@click.option("--data", default="digits", show_default=True,
              help="digits, mnist (this owner's part of the bundled set) or this owner's image folder.")
@click.option("--split-of", default=None,
              help="K/IDX: train on part IDX (from 0) of the data split K ways [default for digits and mnist: the "
                   "session's K and this owner's index; for a folder: all of it].")
@click.option("--s1", "s1_url", envvar="HECNN_S1_URL", default=None, help="S1's URL [default: the session file's].")
@click.option("--wait", "wait_seconds", type=click.FloatRange(1, 7 * 86400), default=None,
              help="Longest wait for the other owners in a round, in seconds [default: 3600].")
@TLS_CA_OPTION
@output_options
def join_command(session_file: Path, data: str, split_of: str | None, s1_url: str | None, wait_seconds: float | None,
                 tls_ca: str | None, as_json: bool, quiet: bool) -> None:
    """One owner: train on its own data each round, upload its encrypted update, wait for the sum, average, go on."""
    report = Reporter(quiet)
    session = run_step(lambda: read_owner_file(session_file))
    part = run_step(lambda: parse_split_of(split_of))

    def on_round(r: dict[str, Any]) -> None:
        if not as_json:
            click.echo(f"{ROUND_HEADER}  {'sum':<16}" if r["round"] == 1 else "", nl=r["round"] == 1)
            click.echo(f"{round_row(r)}  {r['sum_sha256']}")
        else:
            report.note(f"round {r['round']}: accuracy {r['float_accuracy']:.2%}, sum {r['sum_sha256']}")

    result = run_step(lambda: join(session, data, part, s1_url, tls_ca, on_round=on_round, note=report.note,
                                   wait_seconds=wait_seconds))
    if as_json:
        click.echo(json.dumps(result))
    else:
        click.echo(f"owner {result['owner']}: float accuracy {result['float_accuracy']:.2%} on its "
                   f"{result['test_images']} held-out images after {len(result['rounds'])} rounds")
