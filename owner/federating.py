"""The owners' side of a federated session over HTTP: create it at S1, upload each round's encrypted
updates, fetch the sum under the consortium's key (the endpoints: :mod:`he_cnn.servers.federation`).

:class:`HTTPAggregator` is the :class:`~he_cnn.training.federated.Aggregator` that goes through real
clouds: the training loop (:func:`~he_cnn.training.federated.train_rounds`) runs unchanged on top of it.
It acts for every owner it holds a token of: one machine simulating K owners (the demo, ``he-cnn owner
federate``), each upload made with that owner's own token, each owner fetching the sum itself; or one
owner on its own machine with only its own token (``he-cnn owner federate join``), which then waits for
the others: it polls the round's sum, and uploads again if the round was aborted meanwhile (S1 discards
an aborted round's uploads and reopens the same round).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Mapping, Sequence

import numpy as np

from he_cnn.crypto.paillier import KeyPair
from he_cnn.crypto.tensor import EncryptedTensor
from he_cnn.errors import ProtocolError, RoundNotReady
from he_cnn.protocols import aggregate
from he_cnn.graph.integer_model import IntegerModel
from he_cnn.training.federated import AggregationRound, scale_runs, served_model
from he_cnn.training.quantize import quantize_icnn
from he_cnn.transport.http_channel import CloudPublicKey, http_request
from he_cnn.wire import Message, encode

from .pipeline import UPLOAD_TIMEOUT, _as_owner

TIMEOUT = 60.0
#: how often an owner asks S1 for a round's sum while other owners are missing, and for how long at most
POLL_SECONDS = 0.5
WAIT_SECONDS = 3600.0


def create_session(s1_url: str, owner_token: str, count: int, value_bits: int, weights: Sequence[int], rounds: int,
                   consortium: KeyPair, tls_ca: str | None = None, round_seconds: float | None = None) -> dict[str, Any]:
    """POST a new session to S1 (owner token); S1's answer with the owners' tokens (shown this once).
    ``round_seconds``: how long after its first upload a round with owners missing is aborted (S1's default: 1 h)."""
    msg = Message(meta={"count": count, "value_bits": value_bits, "weights": [int(w) for w in weights],
                        "rounds": rounds, **({} if round_seconds is None else {"round_seconds": round_seconds})})
    msg.arrays["consortium_n"] = np.array([consortium.public.n], dtype=object)
    response = _as_owner(s1_url, lambda: http_request("POST", s1_url.rstrip("/") + "/v1/federations", "S1", TIMEOUT,
                                                      token=owner_token, data=encode(msg), tls_ca=tls_ca))
    return response.json()


class HTTPAggregator:
    """Rounds of a session at S1 for the owners whose ``tokens`` it holds: a list (index = owner, all K
    simulated here) or a mapping owner index -> token (an owner on its own machine: one entry)."""

    def __init__(self, s1_url: str, session_id: str, tokens: Sequence[str] | Mapping[int, str], key: CloudPublicKey,
                 consortium: KeyPair, tls_ca: str | None = None, poll_seconds: float = POLL_SECONDS,
                 wait_seconds: float = WAIT_SECONDS):
        self.base = f"{s1_url.rstrip('/')}/v1/federations/{session_id}"
        self.tokens = dict(tokens) if isinstance(tokens, Mapping) else dict(enumerate(tokens))
        self.key = key.paillier
        self.key_bits = self.key.bits
        self.consortium = consortium
        self.tls_ca = tls_ca
        self.poll_seconds, self.wait_seconds = poll_seconds, wait_seconds
        self.round = 1

    @property
    def owners(self) -> list[int]:
        """The owners this aggregator uploads for, in the order :meth:`aggregate` takes their updates."""
        return sorted(self.tokens)

    def _request(self, method: str, path: str, k: int, data: bytes | None = None) -> Any:
        return http_request(method, self.base + path, "S1", UPLOAD_TIMEOUT, token=self.tokens[k], data=data,
                            tls_ca=self.tls_ca)

    def status(self) -> dict[str, Any]:
        return self._request("GET", "", self.owners[0]).json()

    def upload(self, k: int, packs: EncryptedTensor | bytes) -> tuple[float, int, dict[str, Any]]:
        """Owner k's upload for the open round: seconds, bytes and S1's answer."""
        body = packs if isinstance(packs, bytes) else packs.serialize()
        started = time.perf_counter()
        answer = self._request("POST", f"/rounds/{self.round}/update", k, body).json()
        return time.perf_counter() - started, len(body), answer

    def fetch_sum(self, k: int, layout: aggregate.AggregationLayout) -> tuple[np.ndarray, int, float]:
        """Owner k fetches and decrypts the round's sum: the sums, the bytes and the decryption seconds
        (:class:`RoundNotReady` while owners are missing)."""
        data = self._request("GET", f"/rounds/{self.round}/sum", k).content
        started = time.perf_counter()
        total = EncryptedTensor.deserialize(self.consortium.public, data)
        sums = aggregate.decrypt_sum(self.consortium.private, total, layout)
        return sums, len(data), time.perf_counter() - started

    def await_sum(self, uploads: Mapping[int, bytes], layout: aggregate.AggregationLayout
                  ) -> tuple[np.ndarray, int, float]:
        """:meth:`fetch_sum` for the first of ``uploads``' owners, polling until the other owners are in;
        an owner's upload that S1 discarded (the round was aborted) is made again. :class:`RoundNotReady`
        after ``wait_seconds``."""
        k, deadline = min(uploads), time.monotonic() + self.wait_seconds
        while True:
            try:
                return self.fetch_sum(k, layout)
            except RoundNotReady:
                if time.monotonic() > deadline:
                    raise RoundNotReady(f"round {self.round}'s sum did not come within {self.wait_seconds:g} s: "
                                        "owners are missing") from None
            state = self.status()
            if state.get("round") == self.round:
                for owner, body in uploads.items():
                    if owner not in state.get("uploaded", []):  # the round was aborted, and reopened
                        self.upload(owner, body)
            time.sleep(self.poll_seconds)

    def aggregate(self, updates: Sequence[np.ndarray], layout: aggregate.AggregationLayout) -> AggregationRound:
        """Encrypt and upload the updates of :attr:`owners` (in that order), then each owner fetches the sum."""
        if len(updates) != len(self.tokens):
            raise ProtocolError(f"{len(updates)} updates for the {len(self.tokens)} owners this process plays")
        encrypt_s, upload_s, upload_b, answer, bodies = [], [], [], {}, {}
        for k, values in zip(self.owners, updates):
            started = time.perf_counter()
            bodies[k] = aggregate.encrypt_update(self.key, values, layout).serialize()
            encrypt_s.append(time.perf_counter() - started)
            seconds, size, answer = self.upload(k, bodies[k])
            upload_s.append(seconds)
            upload_b.append(size)
        sums, download, decrypt_s = self.await_sum(bodies, layout)
        for k in self.owners[1:]:  # every owner fetches its copy; all copies are the same ciphertexts
            self._request("GET", f"/rounds/{self.round}/sum", k)
        self.round += 1
        return AggregationRound(sums, tuple(encrypt_s), tuple(upload_s), tuple(upload_b),
                                float(answer.get("aggregation_seconds", 0.0)), int(answer.get("cloud_bytes", 0)),
                                download, decrypt_s)

    def publish(self, model: Any, dataset: Any, layout: aggregate.AggregationLayout, fraction_bits: int
                ) -> tuple[IntegerModel, dict[str, Any]]:
        """After the last round: have S1 serve the aggregate as a model. The owners quantise their plaintext
        average (:func:`~he_cnn.training.quantize.quantize_icnn`), send the scale factors, learn the exact
        integers S1 serves (under the consortium's key) and send that model's public spec; the served
        model (the reference of its answers) and S1's summary with its ``model_id``."""
        ideal = quantize_icnn(model)
        ideal = dataclasses.replace(ideal, meta={**ideal.meta, "classes": list(dataset.classes),
                                                 "preprocessing": dataset.preprocessing.to_json()})
        runs = scale_runs(ideal, model, layout.total, fraction_bits)
        msg = Message(meta={"runs": [list(r) for r in runs]})
        data = self._request("POST", "/publish", self.owners[0], encode(msg)).content
        bits = aggregate.scaled_bits(layout, [r[1:] for r in runs])
        values = aggregate.read_values(self.consortium.private, EncryptedTensor.deserialize(self.consortium.public, data),
                                       bits, layout.count, self.key_bits)
        served = served_model(ideal, values, model)
        answer = self._request("POST", "/model", self.owners[0], encode(Message(meta={"spec": served.to_spec()}))).json()
        return served, answer
