"""S2 exactly as ``he-cnn serve s2`` starts it, except that it records every plaintext it obtains.

Run as ``python tests/recording_s2.py RECORD_FILE s2 [serve s2 options...]``: the same options,
environment variables, key file, set-ups, logging and waitress server as the real command (it runs
:data:`he_cnn.servers.serve.serve` itself and only hands it another app factory), with a key cloud
whose :meth:`~he_cnn.parties.key_cloud.KeyCloud.observe` hook appends each plaintext to
``RECORD_FILE``. Used by the leakage tests over HTTP (``tests/test_trust_leakage.py``) through
:class:`trust_support.CloudPair`. The file holds the masked weights K + B, which S1's masks turn into
the model: this recording exists only here, never in the service.
"""
from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path
from typing import Callable

from flask import Flask

from he_cnn.parties.key_cloud import KeyCloud
from he_cnn.servers.config import S2Config
from he_cnn.servers.s2 import create_app, load_or_create_key_cloud
from he_cnn.servers.serve import serve


class RecordingKeyCloud(KeyCloud):
    """``cloud``'s keys, appending every plaintext it obtains to ``record_file``, one JSON line per reveal.

    A line is ``{"step", "bits", "kappa", "values"}``: the masked values of one revealed field (kappa > 0)
    or the zero-test bits of one comparison round (kappa = 0), exactly what the handlers pass to
    :meth:`~he_cnn.parties.key_cloud.KeyCloud.observe`.
    """

    def __init__(self, cloud: KeyCloud, record_file: Path):
        super().__init__(cloud.keys, cloud.dgk_public, cloud.dgk_private)
        self.record_file = record_file
        self._record_lock = threading.Lock()
        # the file exists (mode 0600) from the start, so a reader can take its size before any reveal
        os.close(os.open(record_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))

    def observe(self, step: str, values: list[int], bits: int, kappa: int) -> None:
        line = json.dumps({"step": step, "bits": bits, "kappa": kappa, "values": [int(v) for v in values]})
        with self._record_lock, self.record_file.open("a") as f:
            f.write(line + "\n")


def recording_app(record_file: Path) -> Callable[[S2Config], Flask]:
    """An app factory for ``serve s2``: S2's own key cloud (loaded or created as usual), recording."""

    def build(config: S2Config) -> Flask:
        cloud = load_or_create_key_cloud(Path(config.data_dir), config.key_bits)
        return create_app(config, RecordingKeyCloud(cloud, record_file))

    return build


if __name__ == "__main__":
    serve.main(sys.argv[2:], prog_name="recording_s2", obj=recording_app(Path(sys.argv[1])))
