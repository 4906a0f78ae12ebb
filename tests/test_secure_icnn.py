"""The whole ICNN under encryption: exact against the integer reference, and what S2 sees.

Five test images with 1024-bit keys run in-process (S1 and S2 as separate objects, one process
pool each); one image runs with a 2048-bit key in the slow tier. Every plaintext S2 obtains is
recorded and tested for independence from the image.
"""
from __future__ import annotations

import gc
import types

import numpy as np
import pytest
from scipy import stats

from he_cnn.transport.channel import InProcessChannel
from he_cnn.images import quantize_image
from he_cnn.crypto.dgk import DGKPrivateKey
from he_cnn.crypto.paillier import PrivateKey, generate_keypair
from he_cnn.parallel import Workers
from he_cnn.protocols.common import S1Context
from he_cnn.graph.reference import classify_reference, run_reference
from he_cnn.parties.key_cloud import KeyCloud
from he_cnn.parties.compute_cloud import encrypt_model, prepare_query, secure_inference, setup_model
from he_cnn.crypto.tensor import EncryptedTensor

#: a p-value below this fails an independence test (documented in docs/threat-model.md)
P_THRESHOLD = 1e-3
#: the six tests of the independence family share P_THRESHOLD (Bonferroni, as the HTTP leakage tests
#: do): an honest run fails by chance with probability < 1e-3, not 0.6 %
P_EACH = P_THRESHOLD / 6


def run_secure(integer_model, images, bits, user_keys, workers=2, record=True, prepare=True):
    keys = generate_keypair(bits)
    pool = Workers(workers)
    cloud = KeyCloud.create(keys, record=record, workers=pool)
    ctx = S1Context(keys.public, cloud.dgk_public, InProcessChannel(cloud.handle), workers=pool)
    model = encrypt_model(integer_model, keys.public)
    setup = setup_model(ctx, model)
    cloud.observations.clear()
    runs = []
    try:
        for image in images:
            start = len(cloud.observations)
            prepared = prepare_query(ctx, model, setup) if prepare else None
            result = secure_inference(ctx, model, setup, EncryptedTensor.encrypt(keys.public, image), user_keys.public,
                                      prepared)
            runs.append((result, cloud.observations[start:]))
    finally:
        pool.shutdown()
    return ctx, model, setup, runs


@pytest.fixture(scope="module")
def five_images(trained_icnn, user_keys):
    dataset, _, integer_model = trained_icnn
    images = [quantize_image(dataset.x_test[i], integer_model.input_max) for i in range(5)]
    ctx, model, setup, runs = run_secure(integer_model, images, 1024, user_keys)
    return integer_model, images, ctx, model, setup, runs


def test_class_vector_equals_integer_reference_1024(five_images, user_keys):
    integer_model, images, _, _, _, runs = five_images
    for image, (result, _) in zip(images, runs):
        decrypted = result.output.decrypt(user_keys.private)
        assert list(decrypted) == list(classify_reference(integer_model, image))
        assert result.output.public_key == user_keys.public


def test_per_layer_statistics_are_recorded(five_images):
    _, _, _, model, _, runs = five_images
    result = runs[0][0]
    names = [s.name for s in result.layers]
    assert names == [e["name"] for e in model.spec["layers"] if e["kind"] not in ("concat", "flatten")] + ["result"]
    for s in result.layers:
        assert s.seconds > 0 and s.rounds >= 1 and s.bytes_to_s2 > 0 and s.bytes_to_s1 > 0
    assert result.rounds == sum(s.rounds for s in result.layers)


def masked_samples(observations):
    """Every masked value S2 decrypted, scaled by its mask range to [0, 1), and every zero-test bit."""
    values, bits = [], []
    for o in observations:
        if o.kappa:
            scale = 2 ** (o.bits + 1 + o.kappa)
            values.extend(v / scale for v in o.values)
        else:
            bits.extend(o.values)
    return np.array(values), np.array(bits)


def test_what_s2_decrypts_does_not_depend_on_the_image(five_images):
    _, images, _, _, _, runs = five_images
    assert not np.array_equal(images[0], images[1])
    (values_a, bits_a), (values_b, bits_b) = masked_samples(runs[0][1]), masked_samples(runs[1][1])
    assert len(values_a) == len(values_b) > 5_000 and len(bits_a) == len(bits_b) > 1_000
    # the two images' samples are indistinguishable, and each matches the mask distribution (uniform)
    assert stats.ks_2samp(values_a, values_b, method="asymp").pvalue > P_EACH
    for values in (values_a, values_b):
        assert stats.kstest(values, "uniform").pvalue > P_EACH
    # zero-test outcomes (and the OT comparison's bits) are fair coins, whatever the image
    for bits in (bits_a, bits_b):
        assert stats.binomtest(int(bits.sum()), len(bits), 0.5).pvalue > P_EACH
    assert stats.ks_2samp(bits_a, bits_b, method="asymp").pvalue > P_EACH  # 0/1 ties: no exact method


def test_the_independence_test_has_power(five_images):
    """Negative control: had S2 seen the activations unmasked, the same two-sample test would tell a
    digit from a blank image, and the uniformity test would reject both."""
    integer_model, images, _, _, _, _ = five_images
    blank = np.zeros_like(images[0])

    def activations(image):
        tensors = run_reference(integer_model, image)
        return np.concatenate([np.asarray(tensors[t], dtype=float).ravel() / 2 ** integer_model.bounds[t].bit_length()
                               for t in tensors])

    act_digit, act_blank = activations(images[0]), activations(blank)
    assert stats.ks_2samp(act_digit, act_blank).pvalue < P_THRESHOLD
    for values in (act_digit, act_blank):
        assert stats.kstest(values, "uniform").pvalue < P_THRESHOLD


CODE = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.MethodType)


def reachable(*roots, skip=()):
    """Every object S1's state refers to (code, modules and the skipped objects not followed)."""
    seen, stack = set(), list(roots)
    skip_ids = {id(s) for s in skip}
    while stack:
        obj = stack.pop()
        if id(obj) in seen or id(obj) in skip_ids or isinstance(obj, CODE):
            continue
        seen.add(id(obj))
        yield obj
        stack.extend(gc.get_referents(obj))


def test_s1_holds_no_secret_key(five_images):
    _, _, ctx, model, setup, runs = five_images
    # the in-process channel is the only bridge to S2's object (and the process pool is shared with
    # it in this test); everything else S1 keeps is checked
    objects = list(reachable(ctx, model, setup, runs[0][0].output, skip=(ctx.channel, ctx.workers)))
    assert len(objects) > 1000
    for obj in objects:
        assert not isinstance(obj, (PrivateKey, DGKPrivateKey, KeyCloud))


@pytest.mark.slow
def test_class_vector_equals_integer_reference_2048(trained_icnn, user_keys):
    dataset, _, integer_model = trained_icnn
    image = quantize_image(dataset.x_test[7], integer_model.input_max)
    _, _, _, runs = run_secure(integer_model, [image], 2048, user_keys, record=False)
    assert list(runs[0][0].output.decrypt(user_keys.private)) == list(classify_reference(integer_model, image))


def test_inline_offline_work_shares_sibling_reveals_and_stays_exact(trained_icnn, user_keys):
    """Without a prepared query the offline work runs inside the layers; sibling layers still get one
    set of input masks, so S2 decrypts each linear layer's input tensor once, and the answer is exact."""
    dataset, _, integer_model = trained_icnn
    image = quantize_image(dataset.x_test[3], integer_model.input_max)
    _, model, _, runs = run_secure(integer_model, [image], 1024, user_keys, prepare=False)
    result, observed = runs[0]
    assert list(result.output.decrypt(user_keys.private)) == list(classify_reference(integer_model, image))
    linear_inputs = {e["input"] for e in model.spec["layers"] if e["kind"] in ("conv", "dense")}
    linear_layers = [e for e in model.spec["layers"] if e["kind"] in ("conv", "dense")]
    assert len(linear_inputs) < len(linear_layers)  # the ICNN has siblings
    assert sum(o.step == "x" for o in observed) == len(linear_inputs)
