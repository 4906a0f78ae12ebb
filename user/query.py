"""Classifying an image as the user: encode, encrypt under the cloud key, send, decrypt with one's own key.

Steps per image:
  1. read the model's public description from S1 (input shape, class names, and the preprocessing:
     size, grey/RGB/BGR channels, ``input_max``);
  2. read the image (PNG/JPEG/.npy), convert it to the model's channels, resize it to the model's input
     size and encode its pixels as the integers ``0..input_max``
     (:meth:`he_cnn.images.Preprocessing.encode`), exactly as the owner's model expects;
  3. encrypt every pixel under the clouds' public key (relayed by S1) and POST the wire message
     ``{user_n: [N_u], image: E(pixels)}`` to ``/v1/models/<id>/classify``;
  4. decrypt the returned ``class_vector`` (under the user's own key) and take the arg-max.
Neither cloud sees the pixels, the scores or the class.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gmpy2 import mpz

from he_cnn.errors import BadRequest, ProtocolError
from he_cnn.images import Preprocessing
from he_cnn.transport.http_channel import CloudPublicKey, fetch_public_key, http_request
from he_cnn.crypto.paillier import KeyPair
from he_cnn.crypto.tensor import EncryptedTensor
from he_cnn.wire import Message, decode, encode

INFO_TIMEOUT = 30.0
#: a query at 2048 bits on a small machine takes minutes; S1 answers only when it is done
QUERY_TIMEOUT = 3600.0


@dataclass(frozen=True)
class ModelInfo:
    """The public facts about a model that a user needs to query it.

    ``preprocessing`` comes from the spec; a server that predates it sends none and its model takes
    the default for its input (raw grey or RGB pixels).
    """

    model_id: str
    key_id: str
    input_shape: tuple[int, int, int]
    input_max: int
    classes: tuple[str, ...]
    preprocessing: Preprocessing

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> "ModelInfo":
        try:
            spec = body["spec"]
            shape = tuple(int(v) for v in spec["input_shape"])
            if len(shape) != 3:
                raise ValueError(f"input shape {shape} is not (C, H, W)")
            input_max = int(spec["input_max"])
            preprocessing = Preprocessing.declared(spec.get("preprocessing"), shape, input_max)
            return cls(str(body["model_id"]), str(body["key_id"]), shape, input_max,  # type: ignore[arg-type]
                       tuple(str(c) for c in spec["classes"]), preprocessing)
        except (KeyError, TypeError, ValueError, AttributeError, BadRequest) as e:
            raise ProtocolError(f"S1 described the model in an unexpected form: {e}") from e


@dataclass(frozen=True)
class Classification:
    image: str
    pixels: np.ndarray  # the encoded image that was encrypted, (C, H, W) ints
    vector: list[int]  # the decrypted class-score vector
    predicted: int
    class_name: str
    seconds: float  # wall time of the whole query, as the user sees it
    server: dict[str, Any]  # S1's statistics: seconds, rounds, bytes each way, per layer


def fetch_model_info(s1_url: str, model_id: str, tls_ca: str | None = None) -> ModelInfo:
    response = http_request("GET", f"{s1_url.rstrip('/')}/v1/models/{model_id}", "S1", INFO_TIMEOUT, tls_ca=tls_ca)
    return ModelInfo.from_json(response.json())


def encode_image(path: str | Path, info: ModelInfo) -> np.ndarray:
    """The image at ``path`` as the model's integer input ``(C, H, W)``, as its preprocessing says."""
    return info.preprocessing.encode(path)


def query_message(pixels: np.ndarray, cloud_key: CloudPublicKey, user: KeyPair) -> bytes:
    msg = Message()
    user_n = np.empty(1, dtype=object)
    user_n[0] = mpz(user.public.n)
    msg.arrays["user_n"] = user_n
    msg.arrays["image"] = EncryptedTensor.encrypt(cloud_key.paillier, pixels).data
    msg.widths["image"] = cloud_key.paillier.ciphertext_bytes
    return encode(msg)


def read_answer(data: bytes, info: ModelInfo, user: KeyPair) -> tuple[list[int], dict[str, Any]]:
    """The decrypted class vector and S1's statistics from a classify reply."""
    msg = decode(data)
    cts = msg.array("class_vector").reshape(-1)
    if cts.size != len(info.classes):
        raise ProtocolError(f"S1 returned {cts.size} class scores, expected {len(info.classes)}")
    vector = EncryptedTensor.from_ciphertexts(user.public, cts, (cts.size,)).decrypt(user.private)
    return [int(v) for v in vector], dict(msg.meta)


class Session:
    """One user talking to one S1 about one model (``tls_ca``: the CA S1's HTTPS certificate must chain
    to; None: the system's)."""

    def __init__(self, s1_url: str, model_id: str, user: KeyPair, api_key: str | None = None,
                 tls_ca: str | None = None):
        self.s1_url = s1_url.rstrip("/")
        self.user = user
        self._api_key = api_key  # sent with each query only; never shown
        self.tls_ca = tls_ca
        self.info = fetch_model_info(self.s1_url, model_id, tls_ca)
        self.cloud_key = fetch_public_key(self.s1_url, INFO_TIMEOUT, peer="S1", tls_ca=tls_ca)[0]
        if self.cloud_key.key_id != self.info.key_id:
            raise ProtocolError(f"S1 serves cloud key {self.cloud_key.key_id} but the model is under "
                                f"{self.info.key_id}")
        if self.cloud_key.paillier == user.public:
            raise BadRequest("the user key must be the user's own key, not the clouds' key")

    def classify(self, path: str | Path) -> Classification:
        started = time.perf_counter()
        pixels = encode_image(path, self.info)
        body = query_message(pixels, self.cloud_key, self.user)
        response = http_request("POST", f"{self.s1_url}/v1/models/{self.info.model_id}/classify", "S1",
                                QUERY_TIMEOUT, data=body, token=self._api_key, tls_ca=self.tls_ca)
        vector, server = read_answer(response.content, self.info, self.user)
        predicted = int(np.argmax(vector))
        return Classification(str(path), pixels, vector, predicted, self.info.classes[predicted],
                              time.perf_counter() - started, server)
