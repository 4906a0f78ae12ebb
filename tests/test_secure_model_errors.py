"""Typed errors a library user gets from the secure model API."""
from dataclasses import dataclass, replace

import numpy as np
import pytest

from he_cnn.errors import KeyMismatch, ShapeError, UnsupportedLayer
from he_cnn.graph.integer_model import infer_shapes_and_bounds
from he_cnn.graph.layers import ReLU
from he_cnn.crypto.paillier import generate_keypair
from he_cnn.parties.compute_cloud import EncryptedModel, encrypt_model, secure_inference, setup_model
from he_cnn.crypto.tensor import EncryptedTensor


@pytest.fixture(scope="module")
def encrypted(trained_icnn, keys1024):
    return encrypt_model(trained_icnn[2], keys1024.public)


def test_wrong_image_shape(encrypted, s1, keys1024, user_keys):
    setup = setup_model(s1, encrypted)
    image = EncryptedTensor.encrypt(keys1024.public, np.zeros((1, 8, 8), dtype=object))
    with pytest.raises(ShapeError, match=r"image shape \(1, 8, 8\), expected \(1, 16, 16\)"):
        secure_inference(s1, encrypted, setup, image, user_keys.public)


def test_image_under_another_key(encrypted, s1, user_keys):
    other = generate_keypair(1024)
    image = EncryptedTensor.encrypt(other.public, np.zeros((1, 16, 16), dtype=object))
    with pytest.raises(KeyMismatch, match="image is under key"):
        secure_inference(s1, encrypted, None, image, user_keys.public)


def test_model_bytes_under_another_key(encrypted):
    other = generate_keypair(1024)
    with pytest.raises(KeyMismatch, match="expected"):
        EncryptedModel.deserialize(other.public, encrypted.serialize())


def test_serialised_model_round_trip(encrypted, keys1024):
    back = EncryptedModel.deserialize(keys1024.public, encrypted.serialize())
    assert back.spec == encrypted.spec
    for name, layer in encrypted.linear.items():
        assert (back.linear[name].weight.data == layer.weight.data).all()


@dataclass(frozen=True)
class Softmax:
    name: str
    input: str
    output: str


def test_unsupported_layer(trained_icnn):
    model = trained_icnn[2]
    bad = replace(model, layers=model.layers + (Softmax("softmax", model.output, "probs"),))
    with pytest.raises(UnsupportedLayer, match="Softmax.*expected one of"):
        bad.to_spec()
    with pytest.raises(UnsupportedLayer, match="Softmax"):
        infer_shapes_and_bounds(bad.layers, bad.input_name, bad.input_shape, bad.input_max)


def test_layer_reading_unknown_tensor(trained_icnn):
    model = trained_icnn[2]
    with pytest.raises(ShapeError, match="no earlier layer produces"):
        infer_shapes_and_bounds(model.layers + (ReLU("r", "nowhere", "x"),), model.input_name, model.input_shape,
                                model.input_max)


@pytest.mark.parametrize("mutate", [
    lambda spec: spec["layers"][0].update(stride=0),
    lambda spec: spec["layers"][0].update(kernel=-1),
    lambda spec: spec["layers"][0].update(padding=99),
    lambda spec: spec["shapes"].update(input=[1, 2]),
    lambda spec: spec.update(version=99),
    lambda spec: spec["layers"][0].pop("input"),
])
def test_malformed_architecture_is_bad_request(encrypted, keys1024, mutate):
    import copy

    from he_cnn.errors import BadRequest
    from he_cnn.wire import decode, encode

    msg = decode(encrypted.serialize())
    msg.meta["spec"] = copy.deepcopy(msg.meta["spec"])
    mutate(msg.meta["spec"])
    with pytest.raises(BadRequest, match="model"):
        EncryptedModel.deserialize(keys1024.public, encode(msg))
