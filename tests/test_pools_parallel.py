"""Randomness pools filled on the worker processes: the values a worker computes from a key's public
recipe are valid randomizers (Paillier: N-th residues, checked with the factorisation; DGK: h^r
encrypts 0 and g h^r encrypts 1, checked with S2's zero test), a :class:`PoolFiller` with
``Workers(2)`` brings a pool to its target without the main process ever building a randomizer table,
and a pool below one query's draw is filled while a request runs -- up to that watermark only, the
rest waits for the cloud to be idle. No timing assertions: only conditions awaited with a deadline,
and upper bounds that slowness can only make easier to meet.
"""
from __future__ import annotations

import secrets
import threading
import time

import gmpy2
import pytest
from flask import Flask
from gmpy2 import mpz

from he_cnn.crypto import paillier
from he_cnn.crypto.dgk import generate_dgk_keypair
from he_cnn.crypto.paillier import PoolRecipe, generate_keypair, pool_values
from he_cnn.servers.http import worker_pool
from he_cnn.servers.pools import BUSY_CHUNK, PoolFiller
from waiting import wait_for




def carmichael(keys) -> mpz:
    p, q = keys.private.p, keys.private.q
    return (p - 1) * (q - 1) // gmpy2.gcd(p - 1, q - 1)


def is_nth_residue(keys, r) -> bool:
    """r is an N-th residue mod N^2 exactly when r^lambda = 1 (the group of N-th residues has order phi(N),
    and lambda is the exponent of Z*_N; a unit that is no N-th residue has order divisible by N)."""
    return gmpy2.powmod(mpz(r), carmichael(keys), keys.public.nsq) == 1


@pytest.fixture(scope="module")
def keys():
    return generate_keypair(1024)


@pytest.fixture(scope="module")
def workers():
    pool = worker_pool(2)  # forked now, before the fillers' threads start
    yield pool
    pool.shutdown()


def test_worker_values_are_paillier_randomizers(keys):
    recipe = keys.public.pool_recipe()
    assert recipe.base == keys.public.randomizer_base() and recipe.modulus == keys.public.nsq
    values = recipe.unpack(pool_values(recipe, 50))
    assert len(values) == 50 and len(set(values)) == 50
    assert all(is_nth_residue(keys, r) for r in values)
    for m, r in zip([0, 1, -7, 12345], values):  # each one makes a valid encryption of m
        assert keys.private.decrypt(keys.public.plain_term(m) * r % keys.public.nsq) == m
    # the check itself can fail: a random unit mod N^2 is almost never an N-th residue
    assert not is_nth_residue(keys, secrets.randbelow(int(keys.public.nsq) - 2) + 2)
    # and the values come from the key's own base: the same as the key computes itself
    assert is_nth_residue(keys, keys.public.fresh_randomizer())


def test_worker_values_are_dgk_randomizers_and_pairs():
    public, private = generate_dgk_keypair(1024)
    public.pool_pairs = True  # as at S2: each entry is h^r followed by g h^r
    recipe = public.pool_recipe()
    assert recipe.as_bytes and recipe.multiplier == public.g
    entries = recipe.unpack(pool_values(recipe, 20))
    width = public.ciphertext_bytes
    assert len(entries) == 20 and all(len(e) == 2 * width for e in entries)
    for e in entries:
        hr, ghr = mpz.from_bytes(e[:width], "big"), mpz.from_bytes(e[width:], "big")
        assert ghr == public.g * hr % public.n
        assert private.is_zero(hr) and not private.is_zero(ghr)  # E(0) and E(1)
    public.pool.extend(entries)
    assert private.is_zero(public.randomizer()) and public.pool.taken == 1
    public.pool_pairs = False
    single = public.pool_recipe()
    assert all(len(e) == width for e in single.unpack(pool_values(single, 3)))


def test_workers_build_each_table_once_and_keep_it(keys):
    recipe = keys.public.pool_recipe()
    pool_values(recipe, 1)
    table = paillier._cached_table(recipe)
    pool_values(recipe, 1)
    assert paillier._cached_table(recipe) is table
    other = PoolRecipe(recipe.base, recipe.modulus, recipe.exponent_bits, 4, recipe.width)
    assert paillier._cached_table(other) is not table


def test_the_filler_reaches_the_target_on_two_workers(workers):
    fresh = generate_keypair(1024)
    app = Flask(__name__)
    filler = PoolFiller(app, [(fresh.public.pool, 700, "paillier")], quiet_seconds=0.1, workers=workers)
    try:
        assert wait_for(lambda: filler.status()["full"])
        assert len(fresh.public.pool) >= 700 and filler.filled["idle"] >= 700
        assert fresh.public._randomizer is None  # the main process never built the randomizer table
        drawn = [fresh.public.randomizer() for _ in range(40)]
        assert all(is_nth_residue(fresh, r) for r in drawn) and len(set(drawn)) == 40
        detail = filler.detail()
        assert detail["named"]["paillier"]["target"] == 700 and detail["workers"] == 2
    finally:
        filler.shutdown()


def test_a_pool_below_one_querys_draw_fills_while_a_request_runs(workers):
    fresh = generate_keypair(1024)
    pool, target = fresh.public.pool, 5000
    app = Flask(__name__)
    started, release = threading.Event(), threading.Event()

    @app.post("/query")
    def query():
        started.set()
        release.wait(60)
        return {}

    filler = PoolFiller(app, [(pool, target, "paillier")], quiet_seconds=3600, workers=workers)  # never idle
    try:
        for _ in range(300):  # what one query drew (computed inline: the pool was empty)
            fresh.public.randomizer()
        filler.mark_query()
        assert filler.detail()["named"]["paillier"]["low_watermark"] == 300
        request = threading.Thread(target=lambda: app.test_client().post("/query"))
        request.start()
        assert started.wait(30)
        assert wait_for(lambda: len(pool) >= 300)  # filled during the request, on the workers
        assert request.is_alive() and filler.running() == 1 and filler.filled["busy"] >= 300
        time.sleep(0.3)
        assert len(pool) <= 300 + 2 * BUSY_CHUNK  # while busy, only up to the watermark
        release.set()
        request.join(30)
        filler.quiet_seconds = 0.1  # now the cloud is idle: the rest of the target
        assert wait_for(lambda: len(pool) >= target)
        assert all(is_nth_residue(fresh, pool.take()) for _ in range(20))
    finally:
        release.set()
        filler.shutdown()


def test_without_a_measured_draw_a_busy_cloud_is_left_alone(workers):
    fresh = generate_keypair(1024)
    app = Flask(__name__)
    filler = PoolFiller(app, [(fresh.public.pool, 1000, "paillier")], quiet_seconds=3600, workers=workers)
    try:
        time.sleep(0.5)
        assert len(fresh.public.pool) == 0 and filler.filled == {"idle": 0, "busy": 0}
    finally:
        filler.shutdown()
