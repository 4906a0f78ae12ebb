"""Shared fixtures. Fast tier: 1024-bit cloud keys (512-bit where only encoding is tested)."""
from __future__ import annotations

import sys

import pytest

from he_cnn.transport.channel import InProcessChannel
from he_cnn.training.data import load_digits_dataset
from he_cnn.crypto.paillier import generate_keypair
from he_cnn.protocols.common import COMPARISONS, S1Context
from he_cnn.training.quantize import quantize_icnn
from he_cnn.parties.key_cloud import KeyCloud
from he_cnn.training.train import train_icnn


@pytest.fixture(scope="session")
def keys1024():
    return generate_keypair(1024)


@pytest.fixture(scope="session")
def user_keys():
    return generate_keypair(1024)


@pytest.fixture(scope="session")
def key_cloud(keys1024):
    return KeyCloud.create(keys1024, record=True)


@pytest.fixture(params=COMPARISONS)
def s1(request, keys1024, key_cloud):
    """A fresh S1 context (fresh channel counters) talking in-process to the shared S2, once with each
    comparison protocol."""
    key_cloud.observations.clear()
    return S1Context(keys1024.public, key_cloud.dgk_public, InProcessChannel(key_cloud.handle),
                     comparison=request.param)


@pytest.fixture(scope="session")
def trained_icnn():
    """(digits data set, training result, 6-bit integer model): trained once per test session."""
    dataset = load_digits_dataset()
    result = train_icnn(dataset)
    return dataset, result, quantize_icnn(result.model)


@pytest.fixture(scope="module")
def no_pool_filling():
    """No background randomness pools in a module's services: apps that are never shut down would keep
    filling them in daemon threads for the rest of the session and slow every later test (the GIL)."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("HECNN_RANDOMNESS_POOL", "0")
        yield


def pytest_terminal_summary(terminalreporter) -> None:
    """The figures the trust tests measured (cases tried, faults injected, throughput), if any ran."""
    support = sys.modules.get("trust_support")  # imported by the trust tests only
    figures = support.REPORT if support is not None else {}
    if figures:
        terminalreporter.section("trust figures")
        for name in sorted(figures):
            value = figures[name]
            terminalreporter.write_line(f"{name}: {value:g}" if isinstance(value, float) else f"{name}: {value}")
