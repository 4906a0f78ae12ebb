"""The parties' measurement hooks (he_cnn.trace): a tracer hears S1's and S2's heavy operations by kind,
once per batch operation, without changing what is computed."""
from collections import Counter
from contextlib import contextmanager
import dataclasses

import numpy as np
import pytest

from he_cnn.crypto.tensor import EncryptedTensor
from he_cnn.protocols import comparison
from he_cnn.trace import NULL_TRACER, OP_KINDS, Tracer


class Recorder(Tracer):
    """Every operation kind in the order the operations ended, and every reveal."""

    def __init__(self):
        self.open: list[str] = []
        self.ops: list[str] = []
        self.reveals: list[tuple[int, int]] = []

    @contextmanager
    def _timed(self, kind):
        self.open.append(kind)
        try:
            yield
        finally:
            self.ops.append(self.open.pop())

    def op(self, kind):
        assert kind in OP_KINDS
        return self._timed(kind)

    def reveal(self, count, bits):
        self.reveals.append((count, bits))


@pytest.fixture
def traced(s1, key_cloud):
    """(S1 context, recorder): S1, its channel and the in-process S2 all report to one recorder."""
    recorder = Recorder()
    if s1.comparison == "ot":
        s1.ot_link.receiver(s1)  # the link's base OTs are a set-up (setup_model makes them), not a query's
    s1.channel.tracer = recorder
    key_cloud.tracer = recorder
    try:
        yield dataclasses.replace(s1, tracer=recorder), recorder
    finally:
        key_cloud.tracer = NULL_TRACER  # the key cloud is shared by the whole session


def relu_ops(ctx, recorder, keys, values, bits):
    recorder.ops.clear()
    out = comparison.secure_relu(ctx, EncryptedTensor.encrypt(ctx.public_key, values), bits)
    assert list(out.decrypt(keys.private)) == [max(int(v), 0) for v in values]
    return Counter(recorder.ops)


def test_secure_relu_reports_its_operations_and_stays_exact(traced, keys1024):
    ctx, recorder = traced
    values = np.array([-(2**10), -5, -1, 0, 1, 7, 2**10 - 1, 300], dtype=object)
    ops = relu_ops(ctx, recorder, keys1024, values, 10)
    assert {"s1_pack", "s2_decrypt", "s2_encrypt", "s1_validate", "s1_wire", "s2_wire", "s2_other"} <= set(ops)
    if ctx.comparison == "dgk":  # the rest of SACT's path: DGK bits, blinding, S2's zero tests
        assert {"s2_dgk_encrypt", "s1_blind", "s2_zero"} <= set(ops) and not {"s1_ot", "s2_ot"} & set(ops)
    else:  # the OT extension and the circuit at both clouds
        assert {"s1_ot", "s2_ot"} <= set(ops) and not {"s2_dgk_encrypt", "s1_blind", "s2_zero"} & set(ops)
    assert recorder.open == []  # every operation ended
    assert recorder.reveals == [(values.size, 10)]


def test_operations_are_reported_per_batch_not_per_element(traced, keys1024):
    ctx, recorder = traced
    few = relu_ops(ctx, recorder, keys1024, np.arange(-4, 4, dtype=object), 6)
    many = relu_ops(ctx, recorder, keys1024, np.arange(-32, 32, dtype=object), 6)
    assert few == many


def test_parties_default_to_the_silent_tracer(s1, key_cloud):
    assert s1.tracer is NULL_TRACER and s1.channel.tracer is NULL_TRACER
    assert type(key_cloud).__dataclass_fields__["tracer"].default is NULL_TRACER
