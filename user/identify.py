"""Identifying (1:N) or verifying (1:1) an image against an enrolled gallery, as the user.

Steps per image: read the gallery's public summary (its model and size) and the model's preprocessing
from S1; encode and encrypt the image as for a classification (:mod:`.query`); POST it to
``/v1/galleries/<id>/identify`` (or ``/verify`` with the claimed index); decrypt the one answer with
one's own key and read the index of the best template, or "no match"
(:func:`he_cnn.protocols.identify.read_answer`). Neither cloud sees the image, a similarity or the
index; the user sees no similarity either. Names for the indices are the owner's to give.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from he_cnn.crypto.paillier import KeyPair
from he_cnn.crypto.tensor import EncryptedTensor
from he_cnn.errors import ProtocolError
from he_cnn.protocols.identify import MAX_TEMPLATES, read_answer
from he_cnn.transport.http_channel import http_request
from he_cnn.wire import decode, encode

from .query import INFO_TIMEOUT, QUERY_TIMEOUT, Session, encode_image, query_message


@dataclass(frozen=True)
class Identification:
    image: str
    #: the best template's index; None: no template reached the owner's threshold (verify: no match)
    index: int | None
    seconds: float  # wall time of the whole query, as the user sees it
    server: dict[str, Any]  # S1's statistics: seconds, rounds, bytes each way


class GallerySession:
    """One user querying one gallery at one S1."""

    def __init__(self, s1_url: str, gallery_id: str, user: KeyPair, api_key: str | None = None,
                 tls_ca: str | None = None):
        url = s1_url.rstrip("/")
        self.gallery = http_request("GET", f"{url}/v1/galleries/{gallery_id}", "S1", INFO_TIMEOUT,
                                    tls_ca=tls_ca).json()
        try:
            self.gallery_id, self.count = str(self.gallery["gallery_id"]), int(self.gallery["count"])
            model_id = str(self.gallery["model_id"])
        except (KeyError, TypeError, ValueError) as e:
            raise ProtocolError(f"S1 described the gallery in an unexpected form: {e}") from e
        self.session = Session(url, model_id, user, api_key, tls_ca)  # the model's preprocessing, the cloud key
        self._api_key = api_key  # sent with each query only; never shown

    def _ask(self, path: str | Path, route: str, claimed: int | None) -> Identification:
        started = time.perf_counter()
        s = self.session
        msg = decode(query_message(encode_image(path, s.info), s.cloud_key, s.user))
        if claimed is not None:
            msg.meta["claimed"] = claimed
        response = http_request("POST", f"{s.s1_url}/v1/galleries/{self.gallery_id}/{route}", "S1", QUERY_TIMEOUT,
                                data=encode(msg), token=self._api_key, tls_ca=s.tls_ca)
        reply = decode(response.content)
        cts = reply.array("answer").reshape(-1)
        if cts.size != 1:
            raise ProtocolError(f"S1 returned {cts.size} answers, expected one")
        value = EncryptedTensor.from_ciphertexts(s.user.public, cts, (1,)).decrypt(s.user.private)[0]
        count = reply.get("count", int)  # S1's count at query time: an append may have grown it since
        if not 1 <= count <= MAX_TEMPLATES:
            raise ProtocolError(f"S1 answered for a gallery of {count} templates")
        index = read_answer(int(value), count)
        if claimed is not None and index not in (claimed, None):
            raise ProtocolError(f"a verification of index {claimed} answered index {index}")
        return Identification(str(path), index, time.perf_counter() - started, dict(reply.meta))

    def identify(self, path: str | Path) -> Identification:
        return self._ask(path, "identify", None)

    def verify(self, path: str | Path, claimed: int) -> Identification:
        """index == claimed: match; None: no match."""
        return self._ask(path, "verify", claimed)
