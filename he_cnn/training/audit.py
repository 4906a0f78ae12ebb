"""Membership-inference audit: how well a model's class vectors tell its training images from others.

The owner runs it in the clear, on the model users will query. Every example of a labelled pool (the
training split: members; the held-out split: non-members) gets a score from each attack, higher meaning
"member"; an attack's ROC over the two groups gives its AUC and its true-positive rate at 0.1 % and 1 %
false positives, the numbers that matter for privacy (an attack that is sure about a few images is a
leak even at an AUC near 0.5). The attacks:

1. **Loss threshold** (Yeom et al., 2018): the score is minus the cross-entropy of the true class.
   Needs nothing but the model; it mixes up "hard image" and "non-member".
2. **LiRA** (Carlini et al., 2022, "Membership inference attacks from first principles"), online, with
   one variance per side: ``shadows`` models are trained with the target's own recipe, each on a random
   half of the pool chosen so that every example is in exactly half of them. Per example, the shadows'
   confidence ``φ = log p_y - log(1 - p_y)`` when it was in their training set (IN) and when it was not
   (OUT) are each fitted by a Gaussian (per-example means; one variance per side, since a handful of
   shadows gives unstable per-example variances); the score is the log-likelihood ratio of the target's
   ``φ`` under IN and OUT. Calibrating per example removes most of the "hard image" confusion.

With ``n1`` members and ``n0`` non-members, an attack that learns nothing has AUC 0.5 with standard
deviation ``sqrt((n1 + n0 + 1) / (12 n1 n0))`` (:func:`null_auc_sd`); a TPR at FPR ``f`` is resolved
only to ``1 / n0`` in FPR, so at 0.1 % it needs 1,000 non-members to mean anything. (ε, δ)-DP bounds
every attack: ``TPR <= e^ε FPR + δ`` at every threshold.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from he_cnn.errors import BadRequest

#: the false-positive rates the report gives TPRs at
FPR_LEVELS = (0.001, 0.01)
#: a variance floor: a shadow set whose confidences all agree must not make the ratio infinite
_MIN_VARIANCE = 1e-6


@dataclass(frozen=True)
class AttackResult:
    """One attack's ROC over members and non-members, its AUC and its TPR at :data:`FPR_LEVELS`."""

    name: str
    auc: float
    tpr_at: dict[float, float]
    fpr: np.ndarray
    tpr: np.ndarray

    def to_json(self) -> dict[str, Any]:
        return {"attack": self.name, "auc": round(self.auc, 4),
                **{f"tpr_at_{level:g}_fpr": round(rate, 4) for level, rate in self.tpr_at.items()}}


@dataclass(frozen=True)
class AuditReport:
    """The attacks on one model, with the sample sizes that say how precise they are."""

    members: int
    non_members: int
    shadows: int
    attacks: tuple[AttackResult, ...]

    @property
    def null_auc_sd(self) -> float:
        return null_auc_sd(self.members, self.non_members)

    def attack(self, name: str) -> AttackResult:
        for result in self.attacks:
            if result.name == name:
                return result
        raise KeyError(name)

    def to_json(self) -> dict[str, Any]:
        return {"members": self.members, "non_members": self.non_members, "shadows": self.shadows,
                "null_auc_sd": round(self.null_auc_sd, 4), "attacks": [a.to_json() for a in self.attacks]}


# -- scores ------------------------------------------------------------------------------------------

def _logsumexp(values: np.ndarray) -> np.ndarray:
    peak = values.max(axis=-1, keepdims=True)
    return (peak + np.log(np.exp(values - peak).sum(axis=-1, keepdims=True)))[..., 0]


def _checked(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    logits, labels = np.asarray(logits, dtype=np.float64), np.asarray(labels)
    if logits.ndim < 2 or logits.shape[-2] != len(labels) or labels.ndim != 1:
        raise BadRequest(f"expected logits (..., n, classes) for n = {len(labels)} labels, got {logits.shape}")
    if len(labels) and not (0 <= labels.min() and labels.max() < logits.shape[-1]):
        raise BadRequest(f"labels must lie in 0..{logits.shape[-1] - 1}")
    return logits, labels.astype(np.int64)


def loss_scores(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Minus the cross-entropy of each example's true class (higher: more likely a member)."""
    logits, labels = _checked(logits, labels)
    true = np.take_along_axis(logits, labels[:, None], axis=-1)[..., 0]
    return true - _logsumexp(logits)


def confidence(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """LiRA's ``φ = log p_y - log(1 - p_y)`` per example (``logits`` may carry leading model axes), computed
    as the true logit minus the log-sum-exp of the others, which stays finite where ``p_y`` rounds to 1."""
    logits, labels = _checked(logits, labels)
    true = np.take_along_axis(logits, np.broadcast_to(labels[:, None], logits.shape[:-1] + (1,)), axis=-1)[..., 0]
    others = logits.copy()
    np.put_along_axis(others, np.broadcast_to(labels[:, None], logits.shape[:-1] + (1,)), -np.inf, axis=-1)
    return true - _logsumexp(others)


def lira_scores(target: np.ndarray, shadow: np.ndarray, shadow_in: np.ndarray) -> np.ndarray:
    """LiRA's log-likelihood ratio per example: ``target`` (n,) and ``shadow`` (S, n) confidences,
    ``shadow_in`` (S, n) whether each shadow trained on each example. An example no shadow (or every
    shadow) trained on takes the mean over all examples of the side it lacks."""
    shadow_in = np.asarray(shadow_in, dtype=bool)
    if shadow.shape != shadow_in.shape or shadow.shape[1:] != target.shape:
        raise BadRequest(f"shadow confidences {shadow.shape}, membership {shadow_in.shape} and target {target.shape} "
                         "do not match")
    sides = []
    for inside in (shadow_in, ~shadow_in):
        count = inside.sum(axis=0)
        total = np.where(inside, shadow, 0.0).sum(axis=0)
        overall = total.sum() / max(count.sum(), 1)
        mean = np.where(count > 0, total / np.maximum(count, 1), overall)
        residuals = np.where(inside, shadow - mean, 0.0)
        freedom = count.sum() - (count > 0).sum()  # one mean estimated per example
        variance = max(float((residuals ** 2).sum() / max(freedom, 1)), _MIN_VARIANCE)
        sides.append(-0.5 * (target - mean) ** 2 / variance - 0.5 * math.log(variance))
    return sides[0] - sides[1]


def balanced_membership(shadows: int, n: int, seed: int) -> np.ndarray:
    """(shadows, n) booleans: which examples each shadow trains on, each example in exactly half of the
    shadows (LiRA's own construction), each shadow on about half of the examples."""
    if shadows < 2 or shadows % 2:
        raise BadRequest(f"LiRA needs an even number of shadow models, at least 2; got {shadows}")
    order = np.random.default_rng(seed).random((shadows, n)).argsort(axis=0)
    return order < shadows // 2


# -- the ROC -------------------------------------------------------------------------------------------

def null_auc_sd(members: int, non_members: int) -> float:
    """The standard deviation of the AUC of an attack that learns nothing (Mann-Whitney's U under the null)."""
    return math.sqrt((members + non_members + 1) / (12 * members * non_members))


def evaluate(name: str, scores: np.ndarray, is_member: np.ndarray) -> AttackResult:
    """The ROC of ``scores`` (higher: member) against the truth ``is_member``; AUC and TPR at :data:`FPR_LEVELS`."""
    from sklearn.metrics import roc_auc_score, roc_curve

    is_member = np.asarray(is_member, dtype=bool)
    if is_member.all() or not is_member.any():
        raise BadRequest("an audit needs both members and non-members")
    scores = np.asarray(scores, dtype=np.float64)
    if not np.isfinite(scores).all():
        raise BadRequest(f"attack {name!r} gave scores that are not finite")
    fpr, tpr, _ = roc_curve(is_member, scores, drop_intermediate=False)
    tpr_at = {level: float(tpr[fpr <= level].max()) for level in FPR_LEVELS}
    return AttackResult(name, float(roc_auc_score(is_member, scores)), tpr_at, fpr, tpr)


def audit(target_logits: np.ndarray, labels: np.ndarray, is_member: np.ndarray,
          shadow_logits: Callable[[np.ndarray], np.ndarray] | None = None, shadows: int = 0, seed: int = 0,
          progress: Callable[[int], None] = lambda done: None) -> AuditReport:
    """Both attacks on a model whose logits on the pool are ``target_logits`` (n, classes).

    ``shadow_logits(train_mask)`` trains one shadow model with the target's recipe on the pool examples
    where ``train_mask`` is true and returns its logits on the whole pool; it is called ``shadows`` times
    (0: the loss attack only), ``progress`` hearing after each.
    """
    logits, labels = _checked(target_logits, labels)
    is_member = np.asarray(is_member, dtype=bool)
    if is_member.shape != labels.shape:
        raise BadRequest(f"{len(is_member)} membership flags for {len(labels)} examples")
    attacks = [evaluate("loss", loss_scores(logits, labels), is_member)]
    if shadows:
        if shadow_logits is None:
            raise BadRequest("LiRA needs a way to train shadow models")
        shadow_in = balanced_membership(shadows, len(labels), seed)
        shadow_phi = []
        for i, mask in enumerate(shadow_in):
            shadow_phi.append(confidence(shadow_logits(mask), labels))
            progress(i + 1)
        scores = lira_scores(confidence(logits, labels), np.stack(shadow_phi), shadow_in)
        attacks.append(evaluate("lira", scores, is_member))
    return AuditReport(int(is_member.sum()), int((~is_member).sum()), shadows, tuple(attacks))


def plot_roc(report: AuditReport, path: str | Path, title: str = "membership inference") -> None:
    """The attacks' ROC curves on log-log axes (where the low-FPR regime shows), with the chance line."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=(5, 5))
    floor = 1 / (2 * report.non_members)
    for result in report.attacks:
        axes.plot(np.maximum(result.fpr, floor), np.maximum(result.tpr, floor),
                  label=f"{result.name}: AUC {result.auc:.3f}, TPR {result.tpr_at[0.01]:.1%} at 1% FPR")
    axes.plot([floor, 1], [floor, 1], "k:", label="chance")
    axes.set(xscale="log", yscale="log", xlim=(floor, 1), ylim=(floor, 1), xlabel="false-positive rate",
             ylabel="true-positive rate",
             title=f"{title}\n{report.members} members, {report.non_members} non-members, {report.shadows} shadows")
    axes.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
