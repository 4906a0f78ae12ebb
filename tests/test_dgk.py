import gmpy2
import pytest

from he_cnn.dgk import DGK_U, DGKPublicKey, generate_dgk_keypair, subgroup_bits
from he_cnn.errors import InvalidCiphertext


@pytest.fixture(scope="module")
def dgk():
    return generate_dgk_keypair(1024)


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


def test_validate_range(dgk):
    pub, _ = dgk
    for bad in (0, pub.n, -1):
        with pytest.raises(InvalidCiphertext):
            pub.validate(bad)
