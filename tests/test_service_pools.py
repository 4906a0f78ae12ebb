import time

from flask import Flask

from he_cnn.crypto.paillier import generate_keypair
from he_cnn.parties.key_cloud import KeyCloud
from he_cnn.servers import s2 as s2_app
from he_cnn.servers.config import S2Config
from he_cnn.servers.http import shutdown_app
from he_cnn.servers.pools import CHUNK, USER_KEY_POOL, PoolFiller
from waiting import wait_for




def test_pools_fill_only_while_the_cloud_is_quiet():
    pk = generate_keypair(512, allow_small=True).public
    app = Flask(__name__)

    @app.post("/slow")
    def slow():
        filled = len(pk.pool)
        time.sleep(0.5)
        return {"grew": len(pk.pool) - filled}

    filler = PoolFiller(app, [(pk.pool, 100_000)], quiet_seconds=0.2)
    try:
        assert wait_for(lambda: len(pk.pool) >= 64)
        with app.test_client() as client:
            # at most the one chunk already in flight is finished during a request (unchecked, the
            # filler would add thousands in those 0.5 s)
            assert client.post("/slow").get_json()["grew"] <= CHUNK
        before = len(pk.pool)
        assert wait_for(lambda: len(pk.pool) > before + CHUNK)  # and it resumes when quiet
        assert pk.pool.taken == 0 and pk.randomizer() and pk.pool.taken == 1
    finally:
        filler.shutdown()


def test_gets_do_not_hold_the_filler_back_and_health_reports_the_levels():
    pk = generate_keypair(512, allow_small=True).public
    app = Flask(__name__)

    @app.get("/v1/health")
    def health():
        return filler.status()

    @app.post("/work")
    def work():
        return {}

    filler = PoolFiller(app, [(pk.pool, 3 * CHUNK)], quiet_seconds=0.5)
    try:
        with app.test_client() as client:
            client.post("/work")
            statuses = []
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:  # polled far more often than the quiet period
                statuses.append(client.get("/v1/health").get_json())
                if statuses[-1]["full"]:
                    break
                time.sleep(0.05)
        assert statuses[0] == {"full": False, "levels": [[statuses[0]["levels"][0][0], 3 * CHUNK]]}
        assert statuses[-1] == {"full": True, "levels": [[3 * CHUNK, 3 * CHUNK]]}
    finally:
        filler.shutdown()


def test_s2_tops_up_the_pool_of_every_user_key_it_has_answered(tmp_path, monkeypatch):
    """A user's first answer builds the key's randomizer table; the filler then precomputes the
    randomizers of the next answers, so that they are drawn, not computed, inside a query."""
    monkeypatch.setenv("HECNN_RANDOMNESS_POOL", "10000000")  # more than a test run fills: the user pool goes first
    cloud = KeyCloud.create(generate_keypair(512, allow_small=True))
    app = s2_app.create_app(S2Config(data_dir=tmp_path, cloud_token="pools-cloud-token-" + "c" * 16, key_bits=1024),
                            key_cloud=cloud)
    try:
        user = cloud.user_key(generate_keypair(1024).public.n)  # what S2's to_user step does
        assert len(user.pool) == 0
        assert wait_for(lambda: len(user.pool) >= USER_KEY_POOL)
        assert cloud.user_key(user.n) is user  # kept, with its pool, for the next answer
        user.encrypt(5)
        assert user.pool.taken == 1
    finally:
        shutdown_app(app)
