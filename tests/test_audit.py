"""The membership-inference audit (``he_cnn.training.audit``, ``he-cnn owner audit``).

What "clearly" means here. An attack that learns nothing has, over ``n1`` members and ``n0``
non-members, an AUC of 0.5 with standard deviation ``sd0 = sqrt((n1 + n0 + 1) / (12 n1 n0))`` (the
Mann-Whitney statistic under the null; :func:`test_the_null_sd_is_what_chance_gives` checks the formula
against 400 simulated chance attacks). The main test audits, on the same 400 members and 400
non-members of the digits (sd0 = 0.020), a deliberately over-fitted VGG and a DP-SGD VGG at ε = 1, and
asks for:

- the over-fitted model's AUC above ``0.5 + 3 sd0`` (it is about 0.70, ten sd0 above chance), and
- the DP model's AUC below the over-fitted one's by more than ``3 sqrt(2) sd0`` (three standard
  deviations of the difference of two independent AUCs, each at most as variable as a chance attack's:
  the AUCs are about 0.70 and 0.56, five such deviations apart).

The over-fitted model is made to memorise: a quarter of the pool's labels (members' and non-members'
alike) are replaced by random ones, which only memorisation can fit, and it trains 60 epochs without
augmentation (train accuracy 97 %, test 59 %). ε = 1 allows an AUC up to 0.73 in theory
(``TPR <= e FPR``); in practice the noise leaves little to find. Every seed is fixed (split, label
noise, weights, batches, DP noise) and training is deterministic on one thread, so the numbers are the
same on every run: the tolerances say the difference is real, the seeds keep the test from flaking.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from he_cnn.errors import BadRequest
from he_cnn.training.audit import (audit, balanced_membership, confidence, evaluate, lira_scores, loss_scores,
                                   null_auc_sd, plot_roc)
from he_cnn.training.data import Dataset, load_dataset
from he_cnn.training.dp import DPSettings
from he_cnn.training.train import float_logits, train_architecture, train_classifier
from he_cnn.training.zoo import build_model
from test_service_cli import run

MEMBERS = 400
LABEL_NOISE = 0.25


# -- the statistics --------------------------------------------------------------------------------

def test_the_null_sd_is_what_chance_gives():
    rng = np.random.default_rng(0)
    truth = np.arange(2 * MEMBERS) < MEMBERS
    aucs = [roc_auc_score(truth, rng.random(2 * MEMBERS)) for _ in range(400)]
    # 400 draws estimate an SD to within ~3.5 % (1/sqrt(2 * 399)); allow four times that
    assert abs(np.std(aucs) / null_auc_sd(MEMBERS, MEMBERS) - 1) < 0.14
    assert abs(np.mean(aucs) - 0.5) < 3 * null_auc_sd(MEMBERS, MEMBERS) / math.sqrt(400)


def test_evaluate_reads_the_roc():
    truth = np.array([True] * 500 + [False] * 1000)
    perfect = evaluate("perfect", truth.astype(float), truth)
    assert perfect.auc == 1.0 and perfect.tpr_at == {0.001: 1.0, 0.01: 1.0}
    blind = evaluate("blind", np.zeros(1500), truth)
    assert blind.auc == 0.5 and blind.tpr_at == {0.001: 0.0, 0.01: 0.0}
    # ten members score above every non-member: found at any FPR
    scores = np.concatenate([np.r_[np.full(10, 9.0), np.zeros(490)], np.linspace(-1, 1, 1000)])
    assert evaluate("ten", scores, truth).tpr_at[0.001] == pytest.approx(10 / 500)
    assert set(perfect.to_json()) == {"attack", "auc", "tpr_at_0.001_fpr", "tpr_at_0.01_fpr"}
    with pytest.raises(BadRequest):
        evaluate("one-sided", np.zeros(3), np.ones(3, dtype=bool))
    with pytest.raises(BadRequest):
        evaluate("nan", np.array([np.nan, 0.0]), np.array([True, False]))


def test_scores_stay_finite_for_confident_logits():
    logits = np.array([[1000.0, 0.0, -1000.0], [0.0, 1000.0, 0.0]])
    labels = np.array([0, 0])
    assert np.isfinite(confidence(logits, labels)).all() and np.isfinite(loss_scores(logits, labels)).all()
    assert confidence(logits, labels)[0] == pytest.approx(1000.0)
    assert loss_scores(logits, labels)[1] == pytest.approx(-1000.0)
    with pytest.raises(BadRequest):
        loss_scores(logits, np.array([0, 3]))


def test_lira_separates_what_its_shadows_separate():
    shadows, n = 8, 1000
    inside = balanced_membership(shadows, n, seed=1)
    assert (inside.sum(axis=0) == shadows // 2).all()
    rng = np.random.default_rng(2)
    hardness = rng.normal(0, 3, n)  # per example: what the calibration removes
    shadow = hardness + 1.0 * inside + rng.normal(0, 0.5, (shadows, n))
    member = rng.random(n) < 0.5
    target = hardness + 1.0 * member + rng.normal(0, 0.5, n)
    assert evaluate("lira", lira_scores(target, shadow, inside), member).auc > 0.85
    assert evaluate("uncalibrated", target, member).auc < 0.7
    with pytest.raises(BadRequest):
        balanced_membership(3, n, seed=0)


# -- over-fitted versus DP ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pool() -> tuple[np.ndarray, np.ndarray, np.ndarray, Dataset]:
    full = load_dataset("digits", size=16, seed=0)
    images = np.concatenate([full.x_train, full.x_test])[: 2 * MEMBERS]
    labels = np.concatenate([full.y_train, full.y_test])[: 2 * MEMBERS].copy()
    rng = np.random.default_rng(0)
    noisy = rng.random(len(labels)) < LABEL_NOISE
    labels[noisy] = rng.integers(0, 10, int(noisy.sum()))
    return images, labels, np.arange(2 * MEMBERS) < MEMBERS, full


def part(pool, mask: np.ndarray) -> Dataset:
    images, labels, _, full = pool
    return Dataset(images[mask], labels[mask], images[~mask], labels[~mask], full.classes, 16, full.preprocessing)


def overfit(pool, mask: np.ndarray, seed: int = 0):
    return train_classifier(build_model("vgg", (1, 16, 16), 10), part(pool, mask), epochs=60, seed=seed, lr=1e-2,
                            shift=False).model


def test_dp_at_epsilon_1_is_clearly_harder_to_attack_than_an_overfitted_model(pool, tmp_path):
    images, labels, member, _ = pool
    sd0 = null_auc_sd(MEMBERS, MEMBERS)
    shadows = iter(range(1, 100))
    leaky = audit(float_logits(overfit(pool, member), images), labels, member,
                  lambda mask: float_logits(overfit(pool, mask, next(shadows)), images), shadows=4)
    private = train_architecture("vgg", part(pool, member), seed=0, privacy=DPSettings(1.0, noise_seed=0))
    assert private.privacy.epsilon <= 1.0
    guarded = audit(float_logits(private.model, images), labels, member)
    loss, lira = leaky.attack("loss").auc, leaky.attack("lira").auc
    assert loss > 0.5 + 3 * sd0, (loss, sd0)
    assert lira > 0.5 + 3 * sd0, (lira, sd0)
    assert guarded.attack("loss").auc < loss - 3 * math.sqrt(2) * sd0, (guarded.attack("loss").auc, loss, sd0)
    plot_roc(leaky, tmp_path / "roc.png")
    assert (tmp_path / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- the command -----------------------------------------------------------------------------------

def test_owner_audit_of_a_saved_dp_model(tmp_path):
    """The audit adopts the model's declared (ε, δ) for its shadows and reports both attacks as JSON."""
    saved, plot = tmp_path / "m.json", tmp_path / "roc.png"
    common = ["--arch", "vgg", "--size", "8", "--epochs", "2"]
    trained = run("owner", "train", *common, "--dp-epsilon", "4", "--save-model", str(saved), "-q")
    assert trained.exit_code == 0, trained.output
    result = run("owner", "audit", "--model", str(saved), *common, "--shadows", "2", "--plot", str(plot), "--json",
                 "-q")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output.splitlines()[-1])
    assert report["privacy"]["dp"] and report["privacy"]["epsilon"] <= 4
    assert [a["attack"] for a in report["attacks"]] == ["loss", "lira"]
    assert report["members"] == 1347 and report["non_members"] == 450 and report["plot"] == str(plot)
    assert all(0 <= a["auc"] <= 1 for a in report["attacks"]) and plot.is_file()
    assert run("owner", "audit", "--help").output.startswith("Usage: ")
    odd = run("owner", "audit", "--model", str(saved), *common, "--shadows", "3")
    assert odd.exit_code == 2 and "even number" in odd.output
