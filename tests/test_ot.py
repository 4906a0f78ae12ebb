"""The OT comparison: base OTs, IKNP extension, the millionaires' circuit, and what S2 sees of them.

Exactness of the comparisons themselves (compare, ReLU, truncation, max-pooling) is tested for both
protocols in test_protocols.py (the ``s1`` fixture runs each test once per protocol).
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import stats

from he_cnn.crypto import ot
from he_cnn.crypto.tensor import EncryptedTensor
from he_cnn.errors import ProtocolError, UnknownOTSession
from he_cnn.protocols import comparison, millionaire
from he_cnn.protocols.common import S1Context
from he_cnn.transport.channel import InProcessChannel

#: a p-value below this fails a uniformity or independence test (as in test_secure_icnn.py)
P_THRESHOLD = 1e-3


def test_the_group_is_rfc3526_group_15():
    import gmpy2
    import mpmath

    mpmath.mp.prec = 3300
    pi_bits = int(mpmath.floor(mpmath.mpf(2) ** 2942 * mpmath.pi))
    assert ot.GROUP_P == 2**3072 - 2**3008 - 1 + 2**64 * (pi_bits + 1690314)
    assert gmpy2.is_prime(ot.GROUP_P) and gmpy2.is_prime((ot.GROUP_P - 1) // 2)
    assert gmpy2.legendre(ot.GROUP_G, ot.GROUP_P) == 1  # g generates the prime-order subgroup


def base_link():
    sender = ot.BaseSender()
    s = ot.random_bits(ot.KAPPA_OT)
    bs, keys = ot.base_receive(int(sender.A), s)
    pairs = sender.keys([int(b) for b in bs])
    return s, keys, pairs


def test_base_ots_give_the_chosen_key_only():
    s, keys, pairs = base_link()
    assert 20 < int(s.sum()) < 108
    assert all(keys[i] == pairs[i][s[i]] and keys[i] != pairs[i][1 - s[i]] for i in range(ot.KAPPA_OT))
    assert len({k for pair in pairs for k in pair}) == 2 * ot.KAPPA_OT


def test_base_ot_refuses_elements_outside_the_group():
    sender = ot.BaseSender()
    for bad in (0, 1, int(ot.GROUP_P) - 1, int(ot.GROUP_P), int(ot.GROUP_P) + 5):
        with pytest.raises(ProtocolError, match="not an element"):
            ot.base_receive(bad, ot.random_bits(ot.KAPPA_OT))
    with pytest.raises(ProtocolError):
        sender.keys([4] * (ot.KAPPA_OT - 1))


@pytest.fixture(scope="module")
def link():
    s, keys, pairs = base_link()
    return ot.OTReceiver("test", pairs), ot.OTSender(s, keys)


@pytest.mark.parametrize("count", [1, 127, 128, 129, 5000, ot.SLICE + 300])
def test_extension_gives_random_ots(link, count):
    receiver, sender = link
    batch = receiver.extend(count)
    x0, x1 = sender.extend(batch.batch, batch.count, batch.u)
    assert x0.shape == x1.shape == batch.choices.shape == batch.chosen.shape == (count,)
    assert (np.where(batch.choices == 1, x1, x0) == batch.chosen).all()
    if count >= 5000:  # (the last size spans two transposition slices)
        for bits in (x0, x1, x0 ^ x1, batch.choices):
            assert stats.binomtest(int(bits.sum()), count, 0.5).pvalue > P_THRESHOLD


def test_a_batch_is_used_once_and_checked(link):
    receiver, sender = link
    batch = receiver.extend(300)
    sender.extend(batch.batch, batch.count, batch.u)
    with pytest.raises(ProtocolError, match="already used"):
        sender.extend(batch.batch, batch.count, batch.u)
    other = receiver.extend(300)
    with pytest.raises(ProtocolError, match="bytes"):
        sender.extend(other.batch, other.count, other.u[:-16])
    with pytest.raises(ProtocolError):
        sender.extend(other.batch, 0, b"")


def simulate(a_values, b_values, k):
    """Both parties' circuits in plaintext with valid random OTs: the XOR of their results."""
    n = len(a_values)
    a, b = millionaire.bit_matrix(a_values, k), millionaire.bit_matrix(b_values, k)
    total = millionaire.rot_count(n, k) - n * k
    c, x0, x1 = ot.random_bits(total), ot.random_bits(total), ot.random_bits(total)
    sigma = ot.random_bits(n * k).reshape(n, k)
    s1 = millionaire.CircuitState(0, ((1 ^ a) & b) ^ sigma, b.copy(),
                                  millionaire.receiver_triples(c, np.where(c == 1, x1, x0)), millionaire.level_widths(k))
    s2 = millionaire.CircuitState(1, sigma, 1 ^ a, millionaire.sender_triples(x0, x1), millionaire.level_widths(k))
    pending = [] if s2.done else [s2.open()]
    requests = 1
    while True:
        ops = millionaire.s1_round(s1, pending)
        if not ops:
            break
        requests += 1
        pending = millionaire.s2_round(s2, ops)
    assert s1.done and s2.done and requests == millionaire.requests_needed(k)
    return s1.result() ^ s2.result()


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_circuit_is_exact_on_every_pair(k):
    pairs = list(itertools.product(range(2**k), repeat=2))
    got = simulate([p[0] for p in pairs], [p[1] for p in pairs], k)
    assert got.tolist() == [int(a < b) for a, b in pairs]


@pytest.mark.parametrize("k", [7, 13, 31, 64, 70])
def test_circuit_is_exact_on_wide_values(k):
    rng = np.random.default_rng(k)
    a = [int(v) for v in rng.integers(0, 2**min(k, 62), 300)] + [2**k - 1, 0, 5]
    b = [int(v) for v in rng.integers(0, 2**min(k, 62), 300)] + [2**k - 1, 1, 5]
    a[:50] = b[:50]  # ties
    assert simulate(a, b, k).tolist() == [int(x < y) for x, y in zip(a, b)]


def test_round_and_ot_counts():
    assert [millionaire.requests_needed(k) for k in (1, 2, 4, 5, 16, 17, 64)] == [1, 2, 2, 3, 3, 4, 4]
    assert millionaire.rot_count(1, 1) == 1
    assert millionaire.rot_count(10, 8) == 10 * (8 + 2 * (2 * 4 + 2 * 2 + 1))


def ot_context(keys1024, key_cloud):
    return S1Context(keys1024.public, key_cloud.dgk_public, InProcessChannel(key_cloud.handle), comparison="ot")


def test_s1_makes_a_new_link_when_s2_forgot_it(keys1024, key_cloud):
    ctx = ot_context(keys1024, key_cloud)
    x = np.array([5, -3, 0, 7, -8], dtype=object)
    assert list(comparison.secure_compare(ctx, EncryptedTensor.encrypt(keys1024.public, x), 4)
                .decrypt(keys1024.private)) == [1, 0, 1, 1, 0]
    key_cloud.ot_links.clear()  # S2 restarted
    assert list(comparison.secure_relu(ctx, EncryptedTensor.encrypt(keys1024.public, x), 4)
                .decrypt(keys1024.private)) == [5, 0, 0, 7, 0]
    assert ctx.channel.stats.steps["ot_base"].rounds == 2


@pytest.mark.parametrize("bits", [1, 20, 37, 45])
def test_relu_product_by_ot_or_by_exponentiation(keys1024, key_cloud, bits):
    """The ReLU's product e M comes from bit OTs while the 128-bit pads hold it (masks up to 79 bits:
    l <= 37 at kappa 40), else from S1's exponentiation E(-e)^M as with DGK; exact either way."""
    ctx = ot_context(keys1024, key_cloud)
    top = 2**bits - 1
    x = np.array([v for v in [0, 1, -1, top, -top, -(2**bits), top // 2, -(top // 3)] + list(range(-5, 5))
                  if -(2**bits) <= v < 2**bits], dtype=object)  # the declared range
    out = comparison.secure_relu(ctx, EncryptedTensor.encrypt(keys1024.public, x), bits)
    assert list(out.decrypt(keys1024.private)) == [max(int(v), 0) for v in x]
    by_ot = millionaire.product_width(bits, ctx.kappa) is not None
    assert by_ot == (bits <= 37)
    assert ctx.ops.get("exp_short", 0) == (0 if by_ot else x.size)


def test_the_product_answers_give_exactly_e_times_m():
    rng = np.random.default_rng(5)
    for l in (1, 24, 37):
        width = millionaire.product_width(l, 40)
        masks = [(1 << l) + int(v) for v in rng.integers(0, 2**min(l + 41, 62), 100)] + [(1 << l) + 2**(l + 41) - 1]
        m_bits = millionaire.lsb_bits(masks, width)
        n = len(masks)
        c = ot.random_bits(n * width).reshape(n, width)
        pads0, pads1 = (np.frombuffer(ot.os.urandom(n * width * 16), dtype=np.uint8).reshape(n, width, 16)
                        for _ in range(2))
        e = ot.random_bits(n)
        answers, r_sums = millionaire.product_answer(pads0, pads1, m_bits ^ c, e)
        sums = millionaire.product_sums(answers, m_bits, np.where(c[..., None] == 1, pads1, pads0))
        assert [q - r for q, r in zip(sums, r_sums)] == [int(ei) * m for ei, m in zip(e, masks)]


def test_a_link_that_served_its_batches_is_renewed(keys1024, key_cloud, monkeypatch):
    """S2 keeps a bounded record of used batches per link: past MAX_LINK_BATCHES it refuses the link as
    unknown, and S1 makes a new one without the caller noticing."""
    monkeypatch.setattr(ot, "MAX_LINK_BATCHES", 2)
    ctx = ot_context(keys1024, key_cloud)
    x = np.array([5, -3, 0, 7, -8], dtype=object)
    for _ in range(3):
        assert list(comparison.secure_relu(ctx, EncryptedTensor.encrypt(keys1024.public, x), 4)
                    .decrypt(keys1024.private)) == [5, 0, 0, 7, 0]
    assert ctx.channel.stats.steps["ot_base"].rounds == 2


def test_s2_refuses_inconsistent_ot_messages(keys1024, key_cloud):
    from he_cnn.wire import Message

    with pytest.raises(UnknownOTSession):
        millionaire.s2_link(key_cloud, "no-such-link")
    with pytest.raises(ProtocolError, match="malformed"):
        millionaire.s2_base(key_cloud, Message(meta={"A": "zz"}))
    with pytest.raises(ProtocolError, match="not an element"):
        millionaire.s2_base(key_cloud, Message(meta={"A": "1"}))
    msg = Message(meta={"ot_count": 7, "ot_session": "x", "ot_batch": 0})
    with pytest.raises(ProtocolError, match="OTs for"):
        millionaire.s2_start(key_cloud, msg, None, [1, 2], 20, 3, False)


def ot_view(key_cloud, keys1024, x, bits, repeats=3):
    """Everything S2 saw of the OT part (extension columns, e bits, S1's openings, its own share of the
    carry) over ``repeats`` ReLUs of the same tensor."""
    ctx = ot_context(keys1024, key_cloud)
    enc = EncryptedTensor.encrypt(keys1024.public, x)
    key_cloud.observations.clear()
    views = []
    for _ in range(repeats):
        start = len(key_cloud.observations)
        comparison.secure_relu(ctx, enc, bits)
        seen = {}
        for o in key_cloud.observations[start:]:
            if o.step.startswith("ot_"):
                seen.setdefault(o.step, []).extend(o.values)
        views.append({k: np.array(v) for k, v in seen.items()})
    return views


def test_what_s2_sees_of_the_ot_is_uniform_and_independent_of_the_input(keys1024, key_cloud):
    """S2's view of the OT comparison (u, e, the product OTs' corrections M_j xor c, S1's openings, its
    share of the carry) is fair coins, the
    same for an all-zero tensor and a tensor of extremes, and fresh for every run of the same input."""
    bits = 12
    rng = np.random.default_rng(3)
    zeros = np.zeros(400, dtype=object)
    extremes = np.array([int(v) for v in rng.choice([-(2**bits), 2**bits - 1], 400)], dtype=object)
    view_zeros, view_extremes = ot_view(key_cloud, keys1024, zeros, bits), ot_view(key_cloud, keys1024, extremes, bits)
    p = {}
    for step in ("ot_u", "ot_e", "ot_m", "ot_open", "ot_delta"):
        for name, views in (("zeros", view_zeros), ("extremes", view_extremes)):
            for i, view in enumerate(views):
                seen = view[step]
                assert len(seen) >= 400, step
                p[f"{step} fair, {name} run {i}"] = stats.binomtest(int(seen.sum()), len(seen), 0.5).pvalue
            # the same input twice: the bits differ in about half the positions (fresh OTs, fresh triples)
            changed = views[0][step] ^ views[1][step]
            p[f"{step} fresh, {name}"] = stats.binomtest(int(changed.sum()), len(changed), 0.5).pvalue
        a, b = view_zeros[0][step], view_extremes[0][step]
        table = [[int((a == 0).sum()), int((a == 1).sum())], [int((b == 0).sum()), int((b == 1).sum())]]
        p[f"{step} zeros vs extremes"] = stats.chi2_contingency(table).pvalue
    # one family of 45 tests: an honest run fails with probability < P_THRESHOLD (Bonferroni)
    failed = {name: v for name, v in p.items() if v <= P_THRESHOLD / len(p)}
    assert len(p) == 45 and not failed, failed


def test_the_ot_uniformity_test_has_power():
    """Negative control: had S2 seen the carry [a < b] itself rather than its XOR share, the same tests
    would tell the inputs apart: for the all-zero tensor d = M, so the carry is always 0, while for
    the extremes it is a biased coin that differs from it."""
    from he_cnn.protocols.common import sample_masks

    k = 12
    low = 2**k - 1
    masks = sample_masks(400, k, 40)
    carry_zeros = np.array([int((m & low) < (m & low)) for m in masks])
    x = np.random.default_rng(3).choice([-(2**k), 2**k - 1], 400)
    carry_extremes = np.array([int(((int(v) + m) & low) < (m & low)) for v, m in zip(x, masks)])
    assert stats.binomtest(int(carry_zeros.sum()), 400, 0.5).pvalue < P_THRESHOLD
    table = [[int((carry_zeros == 0).sum()), int((carry_zeros == 1).sum())],
             [int((carry_extremes == 0).sum()), int((carry_extremes == 1).sum())]]
    assert stats.chi2_contingency(table).pvalue < P_THRESHOLD
