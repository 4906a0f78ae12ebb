"""Enrolling a gallery as the owner: templates in the clear here, encrypted chunk by chunk, committed at once.

Steps:
  1. the templates are the uploaded model's output on the gallery's images, computed in the clear by the
     plaintext integer reference (:func:`embeddings_of`) and shortened to ``bits`` bits
     (:func:`as_templates`); the owner keeps them, and the labels;
  2. ``POST /v1/galleries`` with E(theta) opens a pending gallery (or an existing id is appended to: what an
     interrupted append left uncommitted there is dropped first, ``DELETE .../chunks``);
  3. per chunk of ``chunk_size`` templates (:func:`he_cnn.protocols.identify.enrol_chunk`): E(P), the
     masks B and E(sigma), one ``POST .../chunks`` each, so memory stays bounded by one chunk;
  4. ``POST .../commit``: S1 relays the seeds to S2 and publishes every chunk at once. Until then
     nothing is served, and an interrupted enrolment leaves nothing behind.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator

import numpy as np

from he_cnn.errors import BadRequest, ProtocolError
from he_cnn.graph.integer_model import IntegerModel
from he_cnn.graph.reference import classify_reference
from he_cnn.protocols import identify
from he_cnn.transport.http_channel import http_request
from he_cnn.wire import Message, encode

from .pipeline import UPLOAD_TIMEOUT, _as_owner, check_owner

#: templates per uploaded chunk: ~10 MB at 2048 bits and 1,024 features
DEFAULT_CHUNK = 256
#: the templates' default bound: |T| < 2^8
TEMPLATE_BITS = 8


def embedding(model: IntegerModel, image: np.ndarray) -> np.ndarray:
    """The model's output for one image, flattened: the query's embedding as the clouds compute it."""
    return np.asarray(classify_reference(model, image), dtype=object).reshape(-1)


def template_bits(model: IntegerModel, bits: int = TEMPLATE_BITS) -> int:
    """The templates' bound (|T| < 2^bits): ``bits``, or the embedding's own if that is narrower."""
    return min(bits, int(model.bits[model.output]))


def embeddings_of(model: IntegerModel, images: Iterable[np.ndarray], chunk_size: int = DEFAULT_CHUNK
                  ) -> Iterator[np.ndarray]:
    """The model's output for each image, flattened, ``chunk_size`` rows at a time."""
    rows: list[np.ndarray] = []
    for image in images:
        rows.append(embedding(model, image))
        if len(rows) == chunk_size:
            yield np.stack(rows)
            rows = []
    if rows:
        yield np.stack(rows)


def template_shift(embeddings: np.ndarray, bits: int) -> int:
    """The low bits to drop so that the largest of these embeddings' values keeps ``bits`` bits (the
    worst-case bound of an embedding is usually far above what images reach)."""
    return max(0, max(abs(int(v)) for v in np.asarray(embeddings).reshape(-1)).bit_length() - bits)


def as_templates(embeddings: np.ndarray, bits: int, shift: int) -> np.ndarray:
    """Templates from embeddings: ``shift`` low bits dropped (towards zero), then clipped to |T| < 2^bits.
    The similarity x . T runs on shorter numbers and ranks as x . embedding does, up to that rounding."""
    top = (1 << bits) - 1
    return np.vectorize(lambda v: min(abs(int(v)) >> shift, top) * (1 if v >= 0 else -1), otypes=[object])(embeddings)


def _get(s1_url: str, path: str, tls_ca: str | None) -> dict[str, Any]:
    return http_request("GET", s1_url.rstrip("/") + path, "S1", UPLOAD_TIMEOUT, tls_ca=tls_ca).json()


def _owner_call(s1_url: str, owner_token: str, path: str, body: bytes | None, tls_ca: str | None,
                method: str = "POST") -> dict[str, Any]:
    return _as_owner(s1_url, lambda: http_request(method, s1_url.rstrip("/") + path, "S1", UPLOAD_TIMEOUT,
                                                  token=owner_token, data=body, tls_ca=tls_ca)).json()


def enrol(s1_url: str, owner_token: str, chunks: Iterable[np.ndarray], bits: int, *, model_id: str | None = None,
          threshold: int | None = None, gallery_id: str | None = None, tls_ca: str | None = None,
          progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Enrol ``chunks`` of (n, F) integer templates: a new gallery of ``model_id`` with ``threshold``, or
    appended to ``gallery_id``; returns S1's summary after the commit (``gallery_id``, ``count``)."""
    key = check_owner(s1_url, owner_token, tls_ca).paillier
    if gallery_id is None:
        if model_id is None or threshold is None:
            raise BadRequest("a new gallery needs its model id and its threshold")
        spec = _get(s1_url, f"/v1/models/{model_id}", tls_ca)["spec"]
        try:
            embedding_bits, features = int(spec["bits"][spec["output"]]), int(np.prod(spec["shapes"][spec["output"]]))
        except (KeyError, TypeError, ValueError) as e:
            raise ProtocolError(f"S1 described model {model_id} in an unexpected form: {e}") from e
        msg = Message(meta={"model_id": model_id, "template_bits": bits, "key_id": key.key_id})
        msg.arrays["threshold"] = identify.encrypt_threshold(key, threshold, embedding_bits, bits, features).data
        msg.widths["threshold"] = key.ciphertext_bytes
        info = _owner_call(s1_url, owner_token, "/v1/galleries", encode(msg), tls_ca)
        gallery_id = info["gallery_id"]
    else:
        info = _get(s1_url, f"/v1/galleries/{gallery_id}", tls_ca)
        if info.get("template_bits") != bits:  # appended chunks must be cut as the gallery's first ones were
            raise BadRequest(f"gallery {gallery_id} holds {info.get('template_bits')}-bit templates; these are "
                             f"{bits}-bit (enrol with the same --template-bits)")
        # chunks an interrupted append left uncommitted would be published with these, under wrong labels
        _owner_call(s1_url, owner_token, f"/v1/galleries/{gallery_id}/chunks", None, tls_ca, method="DELETE")
    before, sent = int(info.get("count", 0)), 0
    for templates in chunks:
        chunk = identify.enrol_chunk(key, templates, bits, info["embedding_bits"])
        _owner_call(s1_url, owner_token, f"/v1/galleries/{gallery_id}/chunks", encode(identify.encode_chunk(chunk)),
                    tls_ca)
        sent += chunk.count
        if progress is not None:
            progress(chunk.count)
    done = _owner_call(s1_url, owner_token, f"/v1/galleries/{gallery_id}/commit", b"", tls_ca)
    if done.get("count") != before + sent:  # the labels file numbers templates from before: it must be exact
        raise ProtocolError(f"S1 holds {done.get('count')} templates in gallery {gallery_id} after this enrolment "
                            f"of {sent} onto {before}: another enrolment ran at the same time; check the gallery")
    return done


def delete_gallery(s1_url: str, owner_token: str, gallery_id: str, tls_ca: str | None = None) -> dict[str, Any]:
    """Delete a gallery at S1 and its seeds at S2 (S1's JSON reply: ``s2_dropped`` says whether S2 did)."""
    return _owner_call(s1_url, owner_token, f"/v1/galleries/{gallery_id}", None, tls_ca, method="DELETE")
