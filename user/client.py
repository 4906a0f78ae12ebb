"""The Python client: classify images from a program, as ``he-cnn user query`` does from a shell.

``he_cnn.Client(s1_url, user_key, model=...)`` opens a :class:`~user.query.Session` with S1 at once (S1
reachable, the model known, its cloud key the model's: any failure is one :class:`~he_cnn.errors.HECNNError`
before an image is encrypted) and ``classify(images)`` returns one typed
:class:`~user.query.Classification` per image: the class index (``predicted``) and name, the decrypted
class vector, the seconds the query took and S1's statistics (``server``: seconds, rounds, bytes each
way, per layer). The user's secret key stays in this process; the clouds see only ciphertexts.
The ``he-cnn user query`` command is a thin layer over this class.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Iterator, Union

from he_cnn.crypto.paillier import KeyPair
from he_cnn.errors import BadRequest, ProtocolError
from he_cnn.transport.http_channel import http_request

from .keys import load_user_key
from .query import INFO_TIMEOUT, Classification, ModelInfo, Session

__all__ = ["Client", "Classification"]

#: a file path: a key file, or an image (PNG, JPEG or .npy; the model's preprocessing converts and resizes it)
FilePath = Union[str, os.PathLike]


class Client:
    """A user of one model on one S1.

    ``user_key`` is the user's own key pair, or the path of its secret key file (``he-cnn user keygen``).
    ``model`` is a model id (``he-cnn owner upload`` prints it, :meth:`models` lists them); without it the
    client takes S1's only model, and refuses to guess when S1 holds several. ``api_key`` is the API key
    the operator issued (``he-cnn admin user add``), sent with every query; ``HECNN_API_KEY`` if not given,
    none for an open S1. ``tls_ca`` is the CA (or self-signed certificate) S1's HTTPS certificate must
    chain to; ``HECNN_TLS_CA`` if not given, the system's CAs without either.
    """

    def __init__(self, s1_url: str, user_key: KeyPair | FilePath, model: str | None = None,
                 api_key: str | None = None, tls_ca: FilePath | None = None):
        self.s1_url = s1_url.rstrip("/")
        self.keys = user_key if isinstance(user_key, KeyPair) else load_user_key(Path(user_key))
        api_key = api_key if api_key is not None else os.environ.get("HECNN_API_KEY") or None
        self.tls_ca = str(tls_ca) if tls_ca is not None else os.environ.get("HECNN_TLS_CA") or None
        self.session = Session(self.s1_url, model if model is not None else self._only_model(), self.keys, api_key,
                               self.tls_ca)

    def __repr__(self) -> str:  # the key id only: never the secret key
        return f"Client(s1_url={self.s1_url!r}, model={self.model_id!r}, key_id={self.keys.public.key_id!r})"

    @property
    def model_id(self) -> str:
        return self.session.info.model_id

    @property
    def info(self) -> ModelInfo:
        """The model's public description: input shape, classes, preprocessing."""
        return self.session.info

    def models(self) -> list[dict]:
        """S1's stored models (id, layers, input shape, classes)."""
        return _list_models(self.s1_url, self.tls_ca)

    def classify(self, images: FilePath | Iterable[FilePath]) -> list[Classification]:
        """Classify one image file or several, in order; one :class:`Classification` each."""
        return list(self.classify_each(images))

    def classify_each(self, images: FilePath | Iterable[FilePath]) -> Iterator[Classification]:
        """:meth:`classify`, one result at a time as each query returns (for progress reports)."""
        for path in _paths(images):
            yield self.session.classify(path)

    def _only_model(self) -> str:
        ids = [str(m.get("model_id")) for m in _list_models(self.s1_url, self.tls_ca)]
        if len(ids) != 1:
            held = f"it holds {len(ids)}: {', '.join(ids)}" if ids else "it holds none yet"
            raise BadRequest(f"name the model to query (model=...): S1 at {self.s1_url} has no single model; {held}")
        return ids[0]


def _list_models(s1_url: str, tls_ca: str | None = None) -> list[dict]:
    try:
        body = http_request("GET", f"{s1_url}/v1/models", "S1", INFO_TIMEOUT, tls_ca=tls_ca).json()
    except ValueError as e:  # not JSON
        raise ProtocolError(f"S1 listed its models in an unexpected form: {e}") from e
    models = body.get("models") if isinstance(body, dict) else None
    if not isinstance(models, list) or not all(isinstance(m, dict) for m in models):
        raise ProtocolError("S1 listed its models in an unexpected form")
    return models


def _paths(images: FilePath | Iterable[FilePath]) -> list[FilePath]:
    if isinstance(images, (str, os.PathLike)):
        return [images]
    paths = list(images)
    bad = [p for p in paths if not isinstance(p, (str, os.PathLike))]
    if bad:
        raise BadRequest(f"images must be file paths (PNG, JPEG or .npy), got {type(bad[0]).__name__}")
    return paths
