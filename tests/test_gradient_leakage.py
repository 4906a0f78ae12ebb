"""The gradient-leakage audit (he_cnn/training/gradient_leakage.py, owner/gradient_audit.py): DLG/iDLG draw a
recognisable digit from one plaintext ICNN gradient at batch 1, and nothing from what the clouds see of the
same gradient sent as an encrypted federated update (S1's ciphertexts, S2's masked sum), nor from a
DP-noised one."""
from __future__ import annotations

import numpy as np
import torch

from he_cnn.owner.gradient_audit import audit_gradient_leakage
from he_cnn.training import gradient_leakage as leak


def test_a_plaintext_gradient_gives_the_digit_away_and_the_clouds_views_give_nothing(tmp_path):
    report = audit_gradient_leakage(batch_sizes=(1,), png=tmp_path / "leak.png")
    (batch,) = report["batches"]
    views = {a["view"]: a for a in batch["attacks"]}
    plain = views.pop("plaintext")
    assert plain["labels"] == batch["labels"]  # iDLG reads the label exactly
    assert plain["psnr"][0] >= leak.RECOGNISABLE_PSNR and plain["recognisable"]
    assert set(views) == {"S1 ciphertexts", "S2 masked sum", "DP-noised (multiplier 1)"}
    for view in views.values():
        assert view["psnr"][0] < 10.0 and not view["recognisable"]  # noise scores ~6.5 dB, all black ~8 dB
        assert view["ssim"][0] < 0.2 < plain["ssim"][0]
    assert (tmp_path / "leak-batch1.png").stat().st_size > 0


def test_scores_and_label_recovery():
    image = np.random.default_rng(0).random((1, 16, 16))
    assert leak.psnr(image, image) == float("inf") and abs(leak.ssim(image, image) - 1) < 1e-9
    assert abs(leak.psnr(np.zeros((4, 4)), np.full((4, 4), 0.1)) - 20.0) < 1e-9
    bias = torch.tensor([0.2, -0.5, 0.1, -0.25, 0.45])
    assert leak.recover_labels([bias], 1).tolist() == [1]
    assert sorted(leak.recover_labels([bias], 3).tolist()) == [1, 1, 3]
