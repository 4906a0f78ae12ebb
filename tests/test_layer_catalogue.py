"""The layer catalogue: a new layer kind is one class, and every part of he-cnn then knows it.

The kind below (``Negate``) is defined here, in the test, and nowhere else: the reference, the
owner's file, the public spec, S1's upload check and S1's secure inference all pick it up from its
class alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest

from he_cnn.crypto.tensor import EncryptedTensor
from he_cnn.errors import BadRequest, UnsupportedLayer
from he_cnn.graph import parse
from he_cnn.graph.integer_model import IntegerModel, build_model, load_integer_model, save_integer_model
from he_cnn.graph.layers import LAYER_KINDS, Conv, Dense, Flatten, Layer, MaxPool, ReLU, layer_from_spec, param
from he_cnn.graph.reference import classify_reference, run_reference
from he_cnn.parties.compute_cloud import EncryptedModel, encrypt_model, secure_inference, setup_model


@pytest.fixture
def negate_kind():
    """A toy layer kind, out = -in, registered for the test's duration."""

    @dataclass(frozen=True, eq=False)
    class Negate(Layer):
        kind: ClassVar[str] = "negate"
        interactive: ClassVar[bool] = False
        name: str = param(parse.text)
        input: str = param(parse.text)
        output: str = param(parse.text)

        def out_shape(self, in_shapes):
            return in_shapes[0]

        def interval(self, in_shapes, ins):
            lo, hi = ins[0]
            return [-v for v in hi], [-v for v in lo]

        def evaluate(self, xs):
            return -xs[0]

        def secure(self, run, xs):
            return xs[0].neg()

    yield Negate
    del LAYER_KINDS["negate"]


def ints(values) -> np.ndarray:
    return np.array([int(v) for v in np.ravel(values)], dtype=object).reshape(np.shape(values))


def toy_model(negate_kind) -> IntegerModel:
    rng = np.random.default_rng(3)
    layers = (
        Conv("conv", "input", "conv", ints(rng.integers(-7, 8, (2, 1, 3, 3))), ints(rng.integers(-20, 20, 2)),
             padding=1),
        negate_kind("neg", "conv", "neg"),
        MaxPool("pool", "neg", "pool", 2, 2),
        ReLU("relu", "pool", "relu"),
        Flatten("flat", "relu", "flat"),
        Dense("fc", "flat", "fc", ints(rng.integers(-7, 8, (3, 8))), ints(rng.integers(-9, 9, 3))),
    )
    return build_model(layers, "input", (1, 4, 4), 15, "fc", {"classes": ["a", "b", "c"]})


def test_reference_runs_the_new_kind(negate_kind):
    model = toy_model(negate_kind)
    image = ints(np.random.default_rng(4).integers(0, 16, (1, 4, 4)))
    tensors = run_reference(model, image)
    assert np.array_equal(tensors["neg"], -tensors["conv"])
    assert model.bounds["neg"] == model.bounds["conv"]  # its interval rule: [-hi, -lo]


def test_spec_and_file_round_trip(negate_kind, tmp_path):
    model = toy_model(negate_kind)
    spec = model.to_spec()
    assert {"kind": "negate", "name": "neg", "input": "conv", "output": "neg"} in spec["layers"]
    public = IntegerModel.from_spec(spec)
    assert type(public.layer("neg")) is negate_kind and public.to_spec() == spec
    save_integer_model(model, tmp_path / "toy.json")
    loaded = load_integer_model(tmp_path / "toy.json")
    image = ints(np.random.default_rng(5).integers(0, 16, (1, 4, 4)))
    assert np.array_equal(classify_reference(loaded, image), classify_reference(model, image))


def test_a_kind_is_checked_like_any_other(negate_kind):
    spec = toy_model(negate_kind).to_spec()
    entry = next(e for e in spec["layers"] if e["kind"] == "negate")
    with pytest.raises(BadRequest, match="unexpected fields"):
        layer_from_spec({**entry, "weight": 1})
    with pytest.raises(BadRequest, match="must be a non-empty string"):
        layer_from_spec({**entry, "input": 7})
    with pytest.raises(UnsupportedLayer, match="expected one of .*negate"):
        layer_from_spec({**entry, "kind": "negative"})


def test_upload_check_and_secure_inference(negate_kind, keys1024, s1, user_keys):
    model = toy_model(negate_kind)
    uploaded = EncryptedModel.deserialize(keys1024.public, encrypt_model(model, keys1024.public).serialize())
    assert type(uploaded.graph.layer("neg")) is negate_kind and uploaded.graph.layer("conv").weight is None
    setup = setup_model(s1, uploaded)
    rng = np.random.default_rng(6)
    for _ in range(2):
        image = ints(rng.integers(0, 16, (1, 4, 4)))
        encrypted = EncryptedTensor.encrypt(keys1024.public, image)
        result = secure_inference(s1, uploaded, setup, encrypted, user_keys.public)
        assert np.array_equal(result.output.decrypt(user_keys.private), classify_reference(model, image))
    assert [s.name for s in result.layers] == ["conv", "pool", "relu", "fc", "result"]  # negate is local


def test_upload_of_an_unknown_kind_is_refused(negate_kind, keys1024):
    body = encrypt_model(toy_model(negate_kind), keys1024.public).serialize()
    del LAYER_KINDS["negate"]  # S1 without the class: the upload names a kind it does not know
    try:
        with pytest.raises(UnsupportedLayer, match="'negate' is not supported"):
            EncryptedModel.deserialize(keys1024.public, body)
    finally:
        LAYER_KINDS["negate"] = negate_kind


def test_every_kind_provides_the_whole_contract():
    """What docs/architecture.md promises of a layer class, for every registered kind."""
    for kind, cls in LAYER_KINDS.items():
        assert cls.kind == kind
        for method in ("out_shape", "interval", "evaluate", "secure"):
            assert getattr(cls, method) is not getattr(Layer, method), (kind, method)


def test_a_kind_cannot_be_defined_twice():
    with pytest.raises(TypeError, match="defined twice"):
        @dataclass(frozen=True, eq=False)
        class AnotherReLU(Layer):
            kind: ClassVar[str] = "relu"


def test_the_public_graph_holds_no_weights(negate_kind):
    """What S1 holds: the reference refuses it with a clear message."""
    public = toy_model(negate_kind).public()
    assert all(layer.weight is None for layer in public.linear_layers()) and not public.bounds
    with pytest.raises(BadRequest, match="has no weights"):
        run_reference(public, ints(np.zeros((1, 4, 4), dtype=int)))
