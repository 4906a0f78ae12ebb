import gmpy2
import pytest
from gmpy2 import mpz

from he_cnn.errors import EncodingOverflow, HECNNError, InvalidCiphertext, KeyMismatch
from he_cnn.crypto.paillier import FixedBaseTable, PublicKey, batch_invert, generate_keypair, keypair_from_primes
from he_cnn.crypto.tensor import EncryptedTensor

# a tiny fixed key: known ciphertexts for fixed randomness
P, Q = 1000000007, 998244353


def test_fixed_key_known_ciphertext():
    kp = keypair_from_primes(P, Q)
    n = P * Q
    # g = n + 1, r = 2: c = (1 + m n) 2^n mod n^2
    c = (1 + 42 * n) * pow(2, n, n * n) % (n * n)
    assert kp.private.decrypt(c) == 42
    assert kp.public.plain_term(42) * pow(2, n, n * n) % (n * n) == c


@pytest.fixture(scope="module")
def kp():
    return generate_keypair(512, allow_small=True)


@pytest.mark.parametrize("v", [0, 1, -1, 12345, -98765, 2**100, -(2**100)])
def test_encrypt_decrypt_roundtrip(kp, v):
    assert kp.private.decrypt(kp.public.encrypt(v)) == v


def test_largest_encodable_magnitude(kp):
    m = kp.public.max_abs
    for v in (m, -m):
        assert kp.private.decrypt(kp.public.encrypt(v)) == v
    for v in (m + 1, -m - 1, 2 * m):
        with pytest.raises(EncodingOverflow, match="does not fit"):
            kp.public.encode(v)


def test_key_size_floor():
    with pytest.raises(HECNNError, match="at least 1024"):
        generate_keypair(512)


def test_randomizers_are_nth_residues_and_pool_is_used_once(kp):
    pk = kp.public
    pk.pool.fill(3)
    assert len(pk.pool) == 3
    drawn = {pk.randomizer() for _ in range(5)}  # 3 from the pool, 2 computed on the spot
    assert len(drawn) == 5 and len(pk.pool) == 0
    for rho in drawn:
        assert kp.private.decrypt(rho) == 0
        assert kp.private.decrypt(pk.plain_term(7) * rho % pk.nsq) == 7


def test_fixed_base_table_matches_pow():
    table = FixedBaseTable(mpz(7), mpz(1000003), 64, window=4)
    for e in (0, 1, 2**63 + 5, 123456789):
        assert table.power(e) == pow(7, e, 1000003)


def test_validate_rejects_out_of_range_and_non_units(kp):
    pk = kp.public
    for bad in (0, pk.nsq, pk.nsq + 5, -3):
        with pytest.raises(InvalidCiphertext):
            pk.validate(bad)
    with pytest.raises(InvalidCiphertext, match="unit"):
        pk.validate(kp.private.p * 3)
    good = [pk.encrypt(v) for v in (0, 5, -7)]
    assert pk.validate_many(good) == good  # the batched check: one gcd of the product
    for bad in (0, pk.nsq, -3):
        with pytest.raises(InvalidCiphertext, match="range"):
            pk.validate_many(good + [bad])
    with pytest.raises(InvalidCiphertext, match="unit"):
        pk.validate_many(good + [kp.private.q * 11] + good)


def test_batch_invert_matches_invert(kp):
    n = kp.public.n
    values = [kp.public.encrypt(v) % n for v in range(7)]
    assert batch_invert(values, n) == [gmpy2.invert(v, n) for v in values]
    assert batch_invert([], n) == [] and batch_invert([mpz(3)], mpz(7)) == [5]
    with pytest.raises(ZeroDivisionError):
        batch_invert(values + [kp.private.p], n)


def test_public_key_identity_and_repr(kp):
    other = generate_keypair(512, allow_small=True)
    assert PublicKey(kp.public.n) == kp.public
    assert kp.public != other.public
    with pytest.raises(KeyMismatch, match=other.public.key_id):
        kp.public.require_same(other.public)
    assert "bits=" in repr(kp.public) and str(int(kp.private.p)) not in repr(kp.private)


def test_phe_interop(kp):
    c = EncryptedTensor.encrypt(kp.public, [5]).data[0]
    import phe

    enc = phe.EncryptedNumber(kp.public.to_phe(), int(c))
    assert kp.private.to_phe().raw_decrypt(enc.ciphertext(be_secure=False)) == 5


def test_user_keys_keep_the_most_recent_keys_with_their_pools():
    from he_cnn.crypto.paillier import UserKeys
    keys = [generate_keypair(512, allow_small=True).public for _ in range(3)]
    kept = UserKeys(limit=2)
    a = kept.get(keys[0].n)
    assert a == keys[0] and a is not keys[0] and kept.get(keys[0].n) is a  # one object per modulus
    a.pool.fill(3)
    kept.get(keys[1].n)
    kept.get(keys[0].n)  # used again: now the most recent
    kept.get(keys[2].n)  # evicts keys[1], the least recently used
    assert len(kept) == 2 and kept.get(keys[0].n) is a and len(a.pool) == 3
    assert sorted(target for _, target in kept.pools(5)) == [5, 5]
    assert {id(pool) for pool, _ in kept.pools(5)} == {id(a.pool), id(kept.get(keys[2].n).pool)}
    with pytest.raises(HECNNError):
        kept.get(4)  # not a modulus
    a.fresh_randomizer()
    assert a._randomizer.window == 4  # a small table: a user's answer needs a few randomizers
    budget = UserKeys(limit=10, max_bytes=2 * UserKeys.table_bytes(keys[0]))  # room for two tables
    for key in keys:
        budget.get(key.n)
    assert len(budget) == 2 and int(keys[0].n) not in budget._keys
