"""``he-cnn federate-demo``: a whole federated session on this machine in one command.

Starts S2 and S1 as real processes (temporary data directory, random tokens), then runs ``he-cnn owner
federate``'s session (:func:`~he_cnn.owner.federate_cli.federate`) with K simulated owners over HTTP:
each owner trains on its split of the digits, uploads its encrypted update with its own session token,
and decrypts only the weighted sum under the consortium's key; after the last round S1 publishes the
aggregate as a model. Then a user classifies ``--images`` test images with it, and each decrypted
class vector is compared with the served model's integer reference. Prints the per-round accuracy and
costs, the final model's float and integer accuracies, the queries and, with ``--compare``, centralised
training; then stops both clouds (also on Ctrl-C or an error).
"""
from __future__ import annotations

import json
import secrets
import tempfile
from pathlib import Path

import click
import numpy as np

from he_cnn.console import run_step
from he_cnn.crypto.paillier import MIN_KEY_BITS
from he_cnn.graph.reference import classify_reference
from he_cnn.user.keys import create_user_key
from he_cnn.user.query import Session
from he_cnn.owner.federate_cli import federate, federation_options, print_report
from he_cnn.training.federated import FederatedSettings

from .launch import CloudProcess


@click.command("federate-demo")
@click.option("--key-bits", type=click.IntRange(1024, 4096), default=2048, show_default=True,
              help="Size of the cloud key S2 generates.")
@click.option("--images", type=click.IntRange(0, 100), default=2, show_default=True,
              help="Test images a user then classifies with the published model.")
@federation_options
def federate_demo(key_bits: int, images: int, owners: int, rounds: int, local_epochs: int, split: str, seed: int,
                  compare: bool, as_json: bool, quiet: bool) -> None:
    """K simulated owners train one ICNN through S1 and S2 started here."""
    def note(message: str) -> None:
        if not quiet:
            click.echo(message, err=True)

    settings = run_step(lambda: FederatedSettings(owners, rounds, local_epochs, split, seed))
    with tempfile.TemporaryDirectory(prefix="he-cnn-federate-") as tmp:
        work = Path(tmp)
        cloud_token, owner_token = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
        note(f"S2: starting; generating a {key_bits}-bit cloud key pair")
        with CloudProcess("S2", ["--data-dir", str(work / "s2"), "--key-bits", str(key_bits), "--quiet"],
                          {"HECNN_S2_CLOUD_TOKEN": cloud_token}) as s2:
            s2_url = s2.wait_ready()
            with CloudProcess("S1", ["--data-dir", str(work / "s1"), "--peer-url", s2_url, "--quiet", "--open"],
                              {"HECNN_S1_CLOUD_TOKEN": cloud_token, "HECNN_S1_OWNER_TOKEN": owner_token}) as s1:
                s1_url = s1.wait_ready()
                note(f"S1 on {s1_url}, S2 on {s2_url}")
                result, served, dataset = run_step(lambda: federate(s1_url, owner_token, settings, compare=compare,
                                                                    note=note))
                user = Session(s1_url, result["model_id"], create_user_key(work / "user.key", max(MIN_KEY_BITS, key_bits)))
                result["queries"] = []
                for index in range(images):
                    path = work / f"test-{index}.npy"
                    np.save(path, dataset.x_test[index][0])
                    answer = run_step(lambda: user.classify(path))
                    reference = [int(v) for v in classify_reference(served, answer.pixels)]
                    result["queries"].append({"label": int(dataset.y_test[index]), "predicted": answer.predicted,
                                              "equals_reference": answer.vector == reference,
                                              "seconds": round(answer.seconds, 3)})
                    note(f"user: test image {index} (a {dataset.y_test[index]}) -> {answer.predicted} in "
                         f"{answer.seconds:.1f} s, {'equals' if answer.vector == reference else 'DIFFERS FROM'} "
                         "the served model's integer reference")
    if as_json:
        click.echo(json.dumps(result))
    else:
        print_report(result)
