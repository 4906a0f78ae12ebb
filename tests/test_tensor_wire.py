import numpy as np
import pytest

from he_cnn.errors import HECNNError, KeyMismatch, ShapeError, WireFormatError
from he_cnn.crypto.paillier import generate_keypair
from he_cnn.crypto.tensor import EncryptedTensor
from he_cnn.wire import Message, decode, encode


@pytest.fixture(scope="module")
def kp():
    return generate_keypair(512, allow_small=True)


def obj(values, shape=None):
    a = np.array(values, dtype=object)
    return a.reshape(shape) if shape else a


def roundtrip(kp, t: EncryptedTensor) -> EncryptedTensor:
    back = EncryptedTensor.deserialize(kp.public, t.serialize())
    assert back.shape == t.shape
    return back


def test_ops_match_plaintext_and_survive_serialisation(kp):
    rng = np.random.default_rng(1)
    a = obj([int(v) for v in rng.integers(-1000, 1000, 12)], (3, 4))
    b = obj([int(v) for v in rng.integers(-1000, 1000, 12)], (3, 4))
    ea, eb = EncryptedTensor.encrypt(kp.public, a), EncryptedTensor.encrypt(kp.public, b)
    sk = kp.private
    assert (roundtrip(kp, ea + eb).decrypt(sk) == a + b).all()
    assert (roundtrip(kp, ea - eb).decrypt(sk) == a - b).all()
    assert (roundtrip(kp, ea - 5).decrypt(sk) == a - 5).all()
    assert (roundtrip(kp, -ea).decrypt(sk) == -a).all()
    assert (roundtrip(kp, ea * b).decrypt(sk) == a * b).all()
    assert (roundtrip(kp, ea.sum(axis=1)).decrypt(sk) == a.sum(axis=1)).all()
    assert roundtrip(kp, ea.sum()).decrypt(sk) == a.sum()
    w = obj([int(v) for v in rng.integers(-9, 9, 20)], (4, 5))
    assert (roundtrip(kp, ea.matmul_plain(w)).decrypt(sk) == a.dot(w)).all()
    assert (roundtrip(kp, ea.reshape(4, 3)).decrypt(sk) == a.reshape(4, 3)).all()
    idx = np.array([[0, -1], [11, 3]])
    assert (ea.take(idx).decrypt(sk) == obj([a.flat[0], 0, a.flat[11], a.flat[3]], (2, 2))).all()
    assert (ea.rerandomize().decrypt(sk) == a).all()
    assert not (ea.rerandomize().data == ea.data).any()


@pytest.mark.parametrize("v", [0, -1, 1])
def test_extremes_roundtrip(kp, v):
    m = kp.public.max_abs * v
    t = EncryptedTensor.encrypt(kp.public, obj([m, 0, -m]))
    assert list(roundtrip(kp, t).decrypt(kp.private)) == [m, 0, -m]


def test_encrypted_tensor_is_opaque(kp):
    t = EncryptedTensor.encrypt(kp.public, obj([1, 2, 3]))
    assert repr(t) == f"EncryptedTensor(shape=(3,), key={kp.public.key_id})"
    with pytest.raises(HECNNError, match="truth value"):
        bool(t)
    with pytest.raises(HECNNError, match="SMP"):
        t * t


def test_shape_and_key_errors(kp):
    other = generate_keypair(512, allow_small=True)
    a = EncryptedTensor.encrypt(kp.public, obj([1, 2, 3]))
    with pytest.raises(ShapeError, match=r"\(3,\) and \(2,\)"):
        a + EncryptedTensor.encrypt(kp.public, obj([1, 2]))
    with pytest.raises(KeyMismatch):
        a + EncryptedTensor.encrypt(other.public, obj([1, 2, 3]))
    with pytest.raises(KeyMismatch):
        EncryptedTensor.deserialize(other.public, a.serialize())
    with pytest.raises(ShapeError, match="matmul"):
        a.reshape(1, 3).matmul_plain(obj([1, 2], (2, 1)))
    with pytest.raises(HECNNError, match="integers"):
        a + obj([1.5, 2, 3])


def test_wire_roundtrip_and_fixed_width():
    msg = Message(meta={"a": 1, "s": "x"}, arrays={"ct": obj([1, 2**100, 3]), "i": obj([-5, 2**70, 0], (3, 1))},
                  widths={"ct": 16})
    data = encode(msg)
    back = decode(data)
    assert back.meta == msg.meta
    assert list(back.arrays["ct"]) == [1, 2**100, 3] and back.widths["ct"] == 16
    assert back.arrays["i"].shape == (3, 1) and list(back.arrays["i"].ravel()) == [-5, 2**70, 0]



def test_wire_blobs_go_out_as_arrays_and_received_bytes_stay_available():
    """A ciphertext array given as fixed-width bytes is the same message as the array itself, and a
    decoded message hands the bytes of each ciphertext array back without re-encoding them."""
    values = [1, 2**100, 3, 2**127 + 5, 7, 9]
    blob = b"".join(v.to_bytes(16, "big") for v in values)
    as_blob = Message(meta={"a": 1}, arrays={"i": obj([-5])})
    as_blob.set_blob("ct", blob, 16, (3, 2))
    as_array = Message(meta={"a": 1}, arrays={"i": obj([-5]), "ct": obj(values, (3, 2))}, widths={"ct": 16})
    assert encode(as_blob) == encode(as_array)
    back = decode(encode(as_blob))
    assert back.arrays["ct"].shape == (3, 2) and list(back.arrays["ct"].ravel()) == values
    assert back.payload("ct") == blob and back.received.keys() == {"ct"}  # signed arrays are decoded only
    with pytest.raises(WireFormatError, match="lacks ciphertext array"):
        back.payload("i")
    with pytest.raises(WireFormatError, match="do not hold"):
        as_blob.set_blob("short", blob[:-1], 16, (3, 2))
    back.arrays["ct"] = obj([4, 5], (2,))  # received bytes are not sent again: an edited array goes out edited
    twice = encode(Message(arrays={"ct": obj([1, 2]), "cu": obj([3, 4])}, widths={"ct": 16, "cu": 16}))
    with pytest.raises(WireFormatError, match="appears twice"):  # one name, two arrays: refused
        decode(twice.replace(b'"name":"cu"', b'"name":"ct"'))
    assert list(decode(encode(back)).arrays["ct"]) == [4, 5]

def test_wire_decodes_ciphertext_arrays_only_when_asked():
    """A received ciphertext array stays bytes until someone asks for its integers (the comparison's
    DGK arrays go to the workers as bytes and are never decoded in the main process); its shape is
    known without decoding, and a decode uses the width the array arrived with."""
    values = [5, 2**100, 3, 2**127 + 5]
    back = decode(encode(Message(arrays={"ct": obj(values, (2, 2)), "i": obj([-5])}, widths={"ct": 16})))
    assert back._pending.keys() == {"ct"} and back.shape("ct") == (2, 2) and back._pending.keys() == {"ct"}
    assert "(2, 2)" in repr(back) and back.shape("i") == (1,)
    back.widths["ct"] = 8  # a later edit of the width (as a hostile test makes) does not change what arrived
    assert list(back.array("ct").ravel()) == values and not back._pending
    again = decode(encode(Message(arrays={"ct": obj(values)}, widths={"ct": 16})))
    assert sorted(again.arrays) == ["ct"] and list(again.arrays["ct"]) == values  # .arrays decodes everything
    with pytest.raises(WireFormatError, match="lacks array"):
        again.shape("missing")


@pytest.mark.parametrize("mutate, match", [
    (lambda d: b"XXXX" + d[4:], "magic"),
    (lambda d: d[:4] + b"\x00\x09" + d[6:], "version"),
    (lambda d: d[:-1], "needs"),
    (lambda d: d + b"\x00", "trailing"),
    (lambda d: d[:12], "header length"),
    (lambda d: b"HE", "shorter"),
])
def test_wire_rejects_malformed(mutate, match):
    data = encode(Message(meta={"k": 1}, arrays={"ct": obj([7, 8])}, widths={"ct": 4}))
    with pytest.raises(WireFormatError, match=match):
        decode(mutate(data))


@pytest.mark.parametrize("shape", [[2**32, 2**32], [True, 1], [-1], [1.5]])
def test_wire_refuses_hostile_shapes(shape):
    """A shape whose product overflows a machine integer, or holds a bool, is refused at decode (a
    received array keeps its shape until it is decoded, and protocol code trusts it)."""
    import json
    import struct

    header = json.dumps({"meta": {}, "arrays": [{"name": "a", "shape": shape, "width": 8, "signed": False}]}).encode()
    with pytest.raises(WireFormatError):
        decode(struct.pack(">4sHI", b"HECN", 1, len(header)) + header)


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_wire_refuses_non_json_constants(constant):
    import struct

    header = ('{"meta":{"k":%s},"arrays":[]}' % constant).encode()
    with pytest.raises(WireFormatError, match="not allowed"):
        decode(struct.pack(">4sHI", b"HECN", 1, len(header)) + header)


@pytest.mark.parametrize("shape", [(1, 19, 3), (3, 17, 4), (8, 5, 6), (2, 1, 2), (1, 6, 9), (3, 4, 5)])
def test_matmul_split_over_workers_matches_plaintext(kp, shape):
    """matmul_plain splits by rows (P a multiple of the workers, or many rows), by output columns
    (few rows, C >= 2 workers), or by the shared dimension F (few rows and columns: the parts' products
    are multiplied); all give the exact product, signed weights and long exponents included."""
    from he_cnn.parallel import Workers

    p, f, c = shape
    rng = np.random.default_rng(sum(shape))
    a = obj([int(v) for v in rng.integers(-1000, 1000, p * f)], (p, f))
    w = obj([int(v) * (1 << 50) + int(u) for v, u in zip(rng.integers(-9, 9, f * c), rng.integers(0, 1 << 30, f * c))],
            (f, c))
    ea = EncryptedTensor.encrypt(kp.public, a)
    workers = Workers(2)
    try:
        assert (ea.matmul_plain(w, workers).decrypt(kp.private) == a.dot(w)).all()
    finally:
        workers.shutdown()
