"""S2 and S1 as apps on data directories, each served by waitress in a thread of this process: the
fixture of the HTTP tests that need real requests between the clouds and a restart on the same data
(galleries, federated sessions)."""
from __future__ import annotations

from he_cnn.parties.key_cloud import KeyCloud
from he_cnn.servers import s1 as s1_app
from he_cnn.servers import s2 as s2_app
from he_cnn.servers.config import S1Config, S2Config
from test_service_errors import CLOUD_TOKEN, OWNER_TOKEN, start_server


class ThreadedClouds:
    """S2 and S1 (open, 1024-bit key) under ``root``; :meth:`restart` makes new apps on the same
    directories, S2 with an empty memory (its key pair kept, as its key file would give it)."""

    def __init__(self, root, keys, cloud: KeyCloud | None = None):
        self.root, self.keys = root, keys
        self.cloud = cloud or KeyCloud.create(keys)
        self.start()

    def start(self) -> None:
        cloud = KeyCloud(self.cloud.keys, self.cloud.dgk_public, self.cloud.dgk_private)
        self.s2_app = s2_app.create_app(S2Config(data_dir=self.root / "s2", cloud_token=CLOUD_TOKEN, key_bits=1024),
                                        key_cloud=cloud)
        self.s2_server = start_server(self.s2_app)
        s2_url = f"http://127.0.0.1:{self.s2_server.socket.getsockname()[1]}"
        self.s1_app = self.app = s1_app.create_app(S1Config(
            require_user_keys=False, data_dir=self.root / "s1", peer_url=s2_url, owner_token=OWNER_TOKEN,
            cloud_token=CLOUD_TOKEN, peer_timeout=30.0))
        self.s1_server = start_server(self.s1_app)
        self.url = f"http://127.0.0.1:{self.s1_server.socket.getsockname()[1]}"
        self.client = self.s1_app.test_client()

    def restart(self) -> None:
        self.s1_server.close()
        self.s2_server.close()
        self.start()

