"""Encrypted federated averaging (he_cnn/protocols/aggregate.py) against its plaintext reference, at 1024 bits.

Exactness: the weighted sum and the rounded average each owner decrypts equal the plaintext integers
bit for bit. Leakage: what S2 decrypts is uniform and the same whatever the updates. Refusals: keys
that cannot or must not receive the sum, updates outside their declared bound.
"""
from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from he_cnn.crypto.paillier import generate_keypair
from he_cnn.crypto.tensor import EncryptedTensor
from he_cnn.errors import BadRequest, BoundExceeded, EncodingOverflow, ProtocolError
from he_cnn.protocols import aggregate as agg
from he_cnn.protocols.common import S1Context
from he_cnn.transport.channel import InProcessChannel

P_THRESHOLD = 1e-3
BITS = 24


@pytest.fixture
def s1(keys1024, key_cloud):
    key_cloud.observations.clear()
    return S1Context(keys1024.public, key_cloud.dgk_public, InProcessChannel(key_cloud.handle))


@pytest.fixture(scope="module")
def consortium():
    return generate_keypair(1024)


def updates(count: int, weights: tuple[int, ...], seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = [rng.integers(-(1 << BITS) + 1, 1 << BITS, count).astype(object) for _ in weights]
    out[0][:2] = [(1 << BITS) - 1, -(1 << BITS) + 1]  # the extremes of the declared bound
    return out


def federate(s1: S1Context, layout: agg.AggregationLayout, values: list[np.ndarray], consortium) -> np.ndarray:
    uploads = [agg.encrypt_update(s1.public_key, v, layout) for v in values]
    total = agg.aggregate_updates(uploads, layout)
    return agg.decrypt_sum(consortium.private, agg.reencrypt_for_consortium(s1, total, layout, consortium.public),
                           layout)


@pytest.mark.parametrize("weights", [(449, 450, 448), (1, 1), (1000, 3, 17, 250)])
def test_the_decrypted_average_equals_the_plaintext_integer_average(s1, consortium, weights):
    layout = agg.AggregationLayout(1500, BITS, weights, s1.public_key.bits)
    values = updates(layout.count, weights, seed=len(weights))
    sums = federate(s1, layout, values, consortium)
    reference_sums, reference_average = agg.plaintext_average(values, weights)
    assert list(sums) == list(reference_sums)
    assert list(agg.divide_rounded(sums, layout.total)) == list(reference_average)
    assert s1.channel.stats.rounds == 1


def test_rounding_is_to_the_nearest_integer_halves_up():
    assert list(agg.divide_rounded(np.array([5, -5, 7, -7, 6, -6, 0], dtype=object), 4)) == [1, -1, 2, -2, 2, -1, 0]


def test_the_layout_packs_the_icnn_at_1024_bits():
    layout = agg.AggregationLayout(11416, BITS, (449, 450, 448), 1024)
    assert (layout.sum_bits, layout.slot, layout.per_pack, layout.packs) == (36, 79, 12, 952)


def test_what_s2_decrypts_is_uniform_and_independent_of_the_updates(s1, key_cloud, consortium):
    """Two very different sets of updates (all at the top of the bound, all at the bottom): S2's masked
    values are indistinguishable from each other and from uniform."""
    weights = (3, 5, 7)
    layout = agg.AggregationLayout(400, BITS, weights, s1.public_key.bits)
    records = []
    for value in ((1 << BITS) - 1, -(1 << BITS) + 1):
        key_cloud.observations.clear()
        federate(s1, layout, [np.full(layout.count, value, dtype=object) for _ in weights], consortium)
        assert [o.step for o in key_cloud.observations] == ["sum"]
        o = key_cloud.observations[0]
        records.append(np.array([v / 2 ** (o.bits + 1 + o.kappa) for v in o.values[:layout.count]]))
    high, low = records
    assert stats.ks_2samp(high, low, method="asymp").pvalue > P_THRESHOLD / 3
    for values in records:
        assert stats.kstest(values, "uniform").pvalue > P_THRESHOLD / 3


def test_keys_that_must_not_receive_the_sum_are_refused(s1, keys1024, consortium):
    layout = agg.AggregationLayout(30, BITS, (2, 3), s1.public_key.bits)
    total = agg.aggregate_updates([agg.encrypt_update(s1.public_key, v, layout) for v in updates(30, (2, 3), 0)],
                                  layout)
    with pytest.raises(ProtocolError, match="unacceptable user key"):  # S2 never encrypts to its own key
        agg.reencrypt_for_consortium(s1, total, layout, keys1024.public)
    with pytest.raises(ProtocolError, match="cannot hold"):
        agg.reencrypt_for_consortium(s1, total, layout, generate_keypair(512, allow_small=True).public)


def test_updates_outside_the_layout_are_refused(s1, consortium):
    layout = agg.AggregationLayout(30, BITS, (2, 3), s1.public_key.bits)
    with pytest.raises(EncodingOverflow):
        agg.pack_update(np.full(30, 1 << BITS, dtype=object), layout)
    with pytest.raises(BadRequest):
        agg.pack_update(np.zeros(29, dtype=object), layout)
    with pytest.raises(ProtocolError, match="updates for"):
        agg.aggregate_updates([agg.encrypt_update(s1.public_key, np.zeros(30, dtype=object), layout)], layout)
    for bad in [dict(weights=(1,)), dict(weights=(0, 2)), dict(count=0), dict(value_bits=0), dict(value_bits=65)]:
        with pytest.raises(BadRequest):
            agg.AggregationLayout(**{**dict(count=30, value_bits=BITS, weights=(2, 3), key_bits=1024), **bad})
    # an owner that packs a slot beyond the bound trips S2's guard bits: the round fails, nothing is revealed
    honest = agg.encrypt_update(s1.public_key, np.zeros(30, dtype=object), layout)
    hostile = EncryptedTensor.encrypt(s1.public_key, [1 << (layout.slot - 2)] * layout.packs)
    with pytest.raises(BoundExceeded):
        agg.reencrypt_for_consortium(s1, agg.aggregate_updates([honest, hostile], layout), layout, consortium.public)


def test_unpacking_the_sum_scales_each_value_to_within_one_of_its_rounding(s1, key_cloud, keys1024):
    weights = (3, 4)
    layout = agg.AggregationLayout(50, BITS, weights, s1.public_key.bits)
    values = updates(layout.count, weights, seed=7)
    total = agg.aggregate_updates([agg.encrypt_update(s1.public_key, v, layout) for v in values], layout)
    sums = agg.plaintext_average(values, weights)[0]
    runs = [(20, 1, 1), (10, 5, 7 << 16), (20, 15, 7 << 10)]
    key_cloud.observations.clear()
    scaled = agg.unpack_scaled(s1, total, layout, runs)
    out = scaled.decrypt(keys1024.private)
    assert list(out[:20]) == list(sums[:20])  # den 1: exact
    for j in range(20, 50):
        num, den = (5, 7 << 16) if j < 30 else (15, 7 << 10)
        assert out[j] - (2 * sums[j] * num + den) // (2 * den) in (0, 1)
    assert [o.step for o in key_cloud.observations] == ["sum"]
    # the owners learn exactly these integers, packed under their key
    bits = agg.scaled_bits(layout, runs)
    assert max(abs(int(v)) for v in out) < 1 << bits
    consortium = generate_keypair(1024)
    packs = agg.reencrypt_values_for_consortium(s1, scaled, bits, consortium.public)
    assert list(agg.read_values(consortium.private, packs, bits, 50, s1.public_key.bits)) == list(out)
    for bad in [[(49, 1, 1)], [(51, 1, 1)], [(50, 0, 1)], [(50, 1, 0)], []]:
        with pytest.raises(ProtocolError):
            agg.unpack_scaled(s1, total, layout, bad)
