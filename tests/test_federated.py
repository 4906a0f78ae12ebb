"""Federated training (he_cnn/training/federated.py): K = 3 owners on the digits through both clouds in-process
at 1024 bits, against centralised training with the same epochs; the splits and the fixed-point updates."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from he_cnn.crypto.paillier import generate_keypair
from he_cnn.errors import BadRequest, EncodingOverflow
from he_cnn.protocols.aggregate import plaintext_average
from he_cnn.protocols.common import S1Context
from he_cnn.training import federated as fed
from he_cnn.training.data import load_digits_dataset
from he_cnn.training.train import train_icnn
from he_cnn.training.zoo import build_model
from he_cnn.transport.channel import InProcessChannel


class CheckingAggregator(fed.InProcessAggregator):
    """The in-process aggregator, checking every round's decrypted sums against the plaintext reference."""

    def aggregate(self, updates, layout):
        result = super().aggregate(updates, layout)
        assert list(result.sums) == list(plaintext_average(updates, layout.weights)[0])
        self.rounds = getattr(self, "rounds", 0) + 1
        return result


def test_three_owners_iid_come_within_1_5_points_of_centralised_training(keys1024, key_cloud):
    dataset = load_digits_dataset()
    settings = fed.FederatedSettings(owners=3)
    aggregator = CheckingAggregator(S1Context(keys1024.public, key_cloud.dgk_public,
                                              InProcessChannel(key_cloud.handle)), generate_keypair(1024))
    report = fed.run_session(dataset, settings, aggregator)
    assert aggregator.rounds == settings.rounds and len(report.rounds) == settings.rounds
    assert sum(report.samples) == len(dataset.y_train)
    central = train_icnn(dataset, epochs=settings.total_epochs, seed=settings.seed).float_test_accuracy
    final = report.rounds[-1].float_accuracy
    assert final >= central - 0.015, (final, central)
    costs = report.to_json()["rounds"][-1]
    assert costs["cloud_bytes"] > 0 and len(costs["owners"]) == 3 and costs["owners"][0]["upload_bytes"] > 0


def test_the_splits_deal_every_training_image_once():
    dataset = load_digits_dataset()
    for split in fed.SPLITS:
        parts = fed.split_dataset(dataset, 3, split)
        assert sum(len(p.y_train) for p in parts) == len(dataset.y_train)
        assert all(np.array_equal(p.x_test, dataset.x_test) for p in parts)
    iid = fed.split_dataset(dataset, 3, "iid")
    assert all(len(set(p.y_train.tolist())) == 10 for p in iid)
    by_label = fed.split_dataset(dataset, 3, "label")
    assert all(len(set(p.y_train.tolist())) <= 5 for p in by_label)  # two shards of a label-sorted sixth each


def test_fixed_point_updates_round_trip_and_refuse_what_does_not_fit():
    model = build_model("icnn", (1, 16, 16), 10)
    values = fed.to_fixed(model, 16, 24)
    state = fed.from_fixed(model, values, 16)
    for name, tensor in model.state_dict().items():
        assert float((state[name] - tensor).abs().max()) <= 2.0 ** -17
    with torch.no_grad():
        model.fc.bias[0] = 256.0  # 2^24 at 16 fractional bits
    with pytest.raises(EncodingOverflow):
        fed.to_fixed(model, 16, 24)
    with pytest.raises(BadRequest):
        fed.from_fixed(model, values[:-1], 16)
    for bad in [dict(owners=1), dict(split="random"), dict(rounds=0), dict(lr_decay=0.0), dict(fraction_bits=24)]:
        with pytest.raises(BadRequest):
            fed.FederatedSettings(**bad)


def test_the_published_integers_are_the_owners_quantisation_of_the_average():
    """scale_runs' factors take the weighted sum S = T 2^f w to quantize_icnn's integers, and served_model
    builds the model of exactly those integers (bounds anew)."""
    from he_cnn.training.quantize import quantize_icnn

    model = build_model("icnn", (1, 16, 16), 10)
    values = fed.to_fixed(model, 16, 24)
    model.load_state_dict(fed.from_fixed(model, values, 16))  # the average the owners decrypted
    ideal = quantize_icnn(model)
    total = 5
    sums = values * total
    flat = []
    for (_, count, num, den), start in zip(fed.scale_runs(ideal, model, total, 16),
                                           np.cumsum([0] + [t.numel() for t in model.state_dict().values()])):
        flat += [(2 * int(s) * num + den) // (2 * den) for s in sums[start:start + count]]
    served = fed.served_model(ideal, np.array(flat, dtype=object), model)
    differ = 0
    for a, b in zip(served.linear_layers(), ideal.linear_layers()):
        for mine, theirs in ((a.weight, b.weight), (a.bias, b.bias)):
            diff = np.abs((mine - theirs).astype(np.int64))
            assert diff.max() <= 1, a.name  # exact halves: the protocol rounds them up, numpy to even
            differ += int(diff.sum())
    assert differ < 0.01 * len(flat)
    assert set(served.bits) == set(ideal.bits) and all(served.bits[t] <= ideal.bits[t] + 1 for t in ideal.bits)
