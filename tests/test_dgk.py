import gmpy2
import numpy as np
import pytest

from he_cnn.crypto.dgk import DGK_U, DGKPublicKey, generate_dgk_keypair, subgroup_bits
from he_cnn.errors import InvalidCiphertext
from he_cnn.parallel import from_blob


@pytest.fixture(scope="module")
def dgk():
    return generate_dgk_keypair(1024)


def encrypted_bits(pub, bits):
    """DGK encryptions of 0/1 values as an object array (what S1 decodes from S2's compare_bits reply)."""
    return np.array(from_blob(pub.encrypt_bits_blob(bits), pub.ciphertext_bytes), dtype=object)


def test_key_shape(dgk):
    pub, priv = dgk
    assert pub.n.bit_length() == 1024 and pub.u == DGK_U and pub.t == subgroup_bits(1024) == 160
    assert priv.v_p.bit_length() == 160 and (priv.p - 1) % (pub.u * priv.v_p) == 0
    assert priv.p.bit_length() == 341 and pub.n % priv.p == 0  # the zero test's prime: a third of n
    assert gmpy2.powmod(pub.g, pub.u * priv.v_p, priv.p) == 1
    assert pub.max_bits == 67
    assert DGKPublicKey.from_dict(pub.to_dict()).n == pub.n


def test_zero_test_and_homomorphism(dgk):
    pub, priv = dgk
    assert priv.is_zero(pub.encrypt(0))
    assert not any(priv.is_zero(pub.encrypt(m)) for m in (1, 2, 17, pub.u - 1))
    a, b = pub.encrypt(5), pub.encrypt(pub.u - 5)
    assert priv.is_zero(a * b % pub.n)  # 5 + (u - 5) = 0 mod u
    assert not priv.is_zero(gmpy2.powmod(pub.encrypt(3), 7, pub.n))  # blinding keeps non-zero non-zero
    assert priv.is_zero(gmpy2.powmod(pub.encrypt(0), 7, pub.n) * pub.randomizer() % pub.n)


def test_bits_and_randomizers_as_one_buffer(dgk):
    """The forms the comparison hands to the wire and the workers: fixed-width bytes, drawn from the pool."""
    pub, priv = dgk
    bits = [1, 0, 0, 1, 1, 0, 1]
    pub.pool.fill(len(bits) + 3)
    taken = pub.pool.taken
    cts = from_blob(pub.encrypt_bits_blob(iter(bits)), pub.ciphertext_bytes)
    assert [0 if priv.is_zero(c) else 1 for c in cts] == bits
    assert len(set(cts)) == len(bits)  # fresh randomness each
    randomizers = from_blob(pub.randomizer_blob(3), pub.ciphertext_bytes)
    assert len(randomizers) == 3 and all(priv.is_zero(r) for r in randomizers)
    assert pub.pool.taken == taken + len(bits) + 3 and len(pub.pool) == 0


def test_pool_entries_are_ready_bytes(dgk, keys1024):
    """The pool holds h^r as bytes, and with ``pool_pairs`` (S2's key) g h^r beside it: a bit's
    encryption is then a slice. Entries of either form encrypt correctly, also mixed in one pool."""
    from he_cnn.parties.key_cloud import KeyCloud

    pub, priv = dgk
    key = DGKPublicKey.from_dict(pub.to_dict())
    width = key.ciphertext_bytes
    key.pool.fill(2)
    assert [len(e) for e in key.pool._ready] == [width] * 2
    key.pool_pairs = True
    key.pool.fill(4)
    assert [len(e) for e in key.pool._ready] == [width] * 2 + [2 * width] * 2
    r, gr = from_blob(key.pool._ready[2], width)
    assert gr == key.g * r % key.n and priv.is_zero(r)
    bits = [1, 0, 1, 1, 0, 1]  # two plain entries, two pairs, then two computed on the spot
    cts = from_blob(key.encrypt_bits_blob(bits), width)
    assert [0 if priv.is_zero(c) else 1 for c in cts] == bits and len(set(cts)) == len(bits)
    key.pool.fill(1)
    assert priv.is_zero(key.randomizer()) and isinstance(key.randomizer(), gmpy2.mpz)
    assert KeyCloud(keys1024, key, priv).dgk_public.pool_pairs  # S2 keeps pairs


def test_validate_range(dgk):
    pub, _ = dgk
    for bad in (0, pub.n, -1):
        with pytest.raises(InvalidCiphertext):
            pub.validate(bad)


def test_blinded_rows_carry_the_comparison_and_uniform_non_zero_values(dgk):
    """S1's blinding (step 3 of the comparison), decrypted as S2 could if it had the full DGK plaintext:
    each row holds exactly one zero when beta' < rho' (s = +1) or beta' > rho' (s = -1) and none
    otherwise; every other value -- computed and blinded, or sent as a fresh non-zero encryption where
    c_j cannot be zero -- is uniform on [1, u-1] (chi-square), so S2 cannot tell the two apart."""
    import random

    from scipy import stats

    from he_cnn.protocols.comparison import blind_bit_comparisons

    pub, priv = dgk
    rng = random.Random(11)
    l, n = 10, 400
    betas = [rng.randrange(1 << l) for _ in range(n)]
    r_low = [rng.randrange(1 << l) for _ in range(n)]
    signs = [rng.choice((1, -1)) for _ in range(n)]
    enc = encrypted_bits(pub, [(((b << 1) | 1) >> (l - j)) & 1 for b in betas for j in range(l + 1)]).reshape(n, l + 1)
    rows = blind_bit_comparisons(pub, enc, r_low, signs, [pub.randomizer() for _ in range(n * (l + 1))])
    g_vp = gmpy2.powmod(pub.g, priv.v_p, priv.p)
    log = {gmpy2.powmod(g_vp, m, priv.p): m for m in range(pub.u)}  # discrete log of the plaintext, mod u
    plain = [log[gmpy2.powmod(c, priv.v_p, priv.p)] for c in rows]
    non_zero = []
    for i in range(n):
        row = plain[i * (l + 1):(i + 1) * (l + 1)]
        beta, rho = (betas[i] << 1) | 1, r_low[i] << 1
        expected = beta < rho if signs[i] == 1 else beta > rho
        assert row.count(0) == int(expected)
        non_zero += [m for m in row if m]
    counts = np.bincount(non_zero, minlength=pub.u)[1:]
    assert stats.chisquare(counts).pvalue > 1e-6  # a broken dummy (constant or zero m) gives ~1e-100


def test_blinding_work_does_not_depend_on_the_secret_sign(dgk, monkeypatch):
    """S1 exponentiates max(p, l + 1 - p) positions per element (p = popcount(rho')) for either sign:
    the count of exponentiations, and so S1's time, tells S2 nothing about s."""
    import types

    from he_cnn.protocols import comparison

    pub, _ = dgk
    calls = []
    fake = types.SimpleNamespace(powmod=lambda *a: calls.append(1) or gmpy2.powmod(*a))
    monkeypatch.setattr(comparison, "gmpy2", fake)
    l = 9
    for r in (0, 1, 0b101, 0b111111111, 0b110110101):
        counts = []
        for s in (1, -1):
            calls.clear()
            enc = encrypted_bits(pub, [1] * (l + 1)).reshape(1, l + 1)
            comparison.blind_bit_comparisons(pub, enc, [r], [s], [pub.randomizer() for _ in range(l + 1)])
            counts.append(len(calls))
        ones = bin(r).count("1")
        assert counts == [max(ones, l + 1 - ones) + 1] * 2, (r, counts)  # + 1: the table's g^u
