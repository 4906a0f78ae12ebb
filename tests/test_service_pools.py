import time

from flask import Flask

from he_cnn.keys import generate_keypair
from servers.pools import PoolFiller


def wait_for(condition, seconds=10.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_pools_fill_only_while_the_cloud_is_quiet():
    pk = generate_keypair(512, allow_small=True).public
    app = Flask(__name__)

    @app.get("/slow")
    def slow():
        filled = len(pk.pool)
        time.sleep(0.5)
        return {"grew": len(pk.pool) - filled}

    filler = PoolFiller(app, [(pk.pool, 200)], quiet_seconds=0.2)
    try:
        assert wait_for(lambda: len(pk.pool) >= 64)
        with app.test_client() as client:
            assert client.get("/slow").get_json() == {"grew": 0}  # nothing computed during a request
        assert wait_for(lambda: len(pk.pool) == 200)
        drawn = pk.randomizer()
        assert len(pk.pool) == 199 and drawn
    finally:
        filler.shutdown()
