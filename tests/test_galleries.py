"""Galleries over HTTP: enrolment in chunks and appends, identify and verify, hostile input (4xx JSON),
restart persistence, interrupted enrolments, and no template in the clear on either cloud's disk.
S1 and S2 run in this process, each served by waitress in a thread (1024-bit keys)."""
from __future__ import annotations

import numpy as np
import pytest

from he_cnn.crypto.tensor import EncryptedTensor
from he_cnn.errors import HECNNError
from he_cnn.graph.integer_model import IntegerModel, infer_shapes_and_bounds
from he_cnn.graph.layers import Conv, Dense, Flatten, MaxPool, ReLU
from he_cnn.owner.enrolling import as_templates, embedding, embeddings_of, enrol, template_bits, template_shift
from he_cnn.parties.compute_cloud import encrypt_model
from he_cnn.protocols import identify as idf
from he_cnn.user.identify import GallerySession
from he_cnn.wire import Message, encode
from threaded_clouds import ThreadedClouds
from waiting import wait_for
from test_service_errors import AUTH_OWNER, OWNER_TOKEN, WIRE, error_of, ints, query_body

pytestmark = pytest.mark.usefixtures("no_pool_filling")  # apps never shut down: no pool filling


def embedding_model() -> IntegerModel:
    """conv 3x3 (2 channels) -> ReLU -> max-pool 2 -> flatten -> dense 6: a 6-feature embedding of 1x6x6."""
    rng = np.random.default_rng(5)
    layers = (
        Conv("conv", "input", "conv", ints(rng.integers(-7, 8, 18), (2, 1, 3, 3)), ints([3, -2], (2,)), 1, 1),
        ReLU("relu", "conv", "relu"),
        MaxPool("pool", "relu", "pool", 2, 2),
        Flatten("flat", "pool", "flat"),
        Dense("emb", "flat", "emb", ints(rng.integers(-7, 8, 108), (6, 18)), ints([0] * 6, (6,))),
    )
    shapes, bounds = infer_shapes_and_bounds(layers, "input", (1, 6, 6), 15)
    return IntegerModel(layers, (1, 6, 6), 15, "input", "emb", 6, shapes, bounds, {"classes": list("abcdef")})


def images(n, seed):
    rng = np.random.default_rng(seed)
    return [ints(rng.integers(0, 16, 36), (1, 6, 6)) for _ in range(n)]


@pytest.fixture(scope="module")
def clouds(tmp_path_factory, keys1024):
    return ThreadedClouds(tmp_path_factory.mktemp("galleries"), keys1024)


@pytest.fixture(scope="module")
def model():
    return embedding_model()


@pytest.fixture(scope="module")
def model_id(clouds, model, keys1024):
    response = clouds.client.post("/v1/models", data=encrypt_model(model, keys1024.public).serialize(),
                                  headers=AUTH_OWNER, content_type=WIRE)
    assert response.status_code == 201, response.data
    return response.get_json()["model_id"]


GALLERY = images(11, 1)
EXTRA = images(4, 2)
THRESHOLD = 0


def templates_of(model, images, chunk_size=256):
    """The owner's templates: embeddings cut to 8 bits at the scale of the first gallery images."""
    shift = template_shift(np.concatenate(list(embeddings_of(model, GALLERY))), template_bits(model))
    return (as_templates(e, template_bits(model), shift) for e in embeddings_of(model, images, chunk_size))


@pytest.fixture(scope="module")
def templates(model):
    return np.concatenate(list(templates_of(model, GALLERY + EXTRA)))


@pytest.fixture(scope="module")
def gallery_id(clouds, model, model_id):
    info = enrol(clouds.url, OWNER_TOKEN, templates_of(model, GALLERY, chunk_size=4), template_bits(model),
                 model_id=model_id, threshold=THRESHOLD)
    assert info["count"] == 11 and info["chunks"] == 3
    appended = enrol(clouds.url, OWNER_TOKEN, templates_of(model, EXTRA), template_bits(model),
                     gallery_id=info["gallery_id"])
    assert appended["count"] == 15 and appended["chunks"] == 4 and appended["gallery_id"] == info["gallery_id"]
    return info["gallery_id"]


def user_files(tmp_path, pixels):
    paths = []
    for i, p in enumerate(pixels):
        paths.append(tmp_path / f"q{i}.npy")
        np.save(paths[-1], np.asarray(p, dtype=np.int64))
    return paths


def test_identify_and_verify_over_http_are_exact(clouds, model, gallery_id, templates, tmp_path, user_keys):
    session = GallerySession(clouds.url, gallery_id, user_keys)
    queries = [GALLERY[3], EXTRA[1], images(1, 9)[0], np.zeros((1, 6, 6), dtype=object)]
    for path, pixels in zip(user_files(tmp_path, queries), queries):
        x = np.asarray(model_embedding(model, pixels))
        expected = idf.identify_reference(templates, x, THRESHOLD)
        assert session.identify(path).index == expected
    claimed = [0, 14]
    path = user_files(tmp_path, [EXTRA[3]])[0]
    x = model_embedding(model, EXTRA[3])
    for j in claimed:
        answer = session.verify(path, j)
        assert (answer.index == j) == idf.verify_reference(templates, x, THRESHOLD, j)
        assert answer.server["count"] == 15 and answer.server["rounds"] > 0


def model_embedding(model, pixels):
    return embedding(model, pixels)


def test_galleries_are_listed_with_their_public_shape_only(clouds, gallery_id, model_id):
    listed = clouds.client.get("/v1/galleries").get_json()["galleries"]
    info = next(g for g in listed if g["gallery_id"] == gallery_id)
    assert info["model_id"] == model_id and info["count"] == 15 and info["features"] == 6
    assert clouds.client.get(f"/v1/galleries/{gallery_id}").get_json() == info


def test_hostile_requests_get_4xx_json(clouds, gallery_id, keys1024, user_keys):
    c = clouds.client
    error_of(c.get("/v1/galleries/0123456789abcdef"), 404, "unknown_model")
    error_of(c.post(f"/v1/galleries/{gallery_id}/chunks", data=b"x", content_type=WIRE), 401)
    wrong = {"Authorization": "Bearer " + "w" * 32}
    for path in ("/v1/galleries", f"/v1/galleries/{gallery_id}/chunks", f"/v1/galleries/{gallery_id}/commit"):
        error_of(c.post(path, data=b"x", headers=wrong, content_type=WIRE), 401)
    error_of(c.post(f"/v1/galleries/{gallery_id}/identify", data=b"x", content_type="text/plain"), 415)
    error_of(c.get(f"/v1/galleries/{gallery_id}/identify"), 405)
    error_of(c.post(f"/v1/galleries/{gallery_id}/chunks", data=b"junk", headers=AUTH_OWNER, content_type=WIRE), 400)
    error_of(c.post(f"/v1/galleries/{gallery_id}/commit", headers=AUTH_OWNER, content_type=WIRE, data=b"-"), 400)
    bad = Message(meta={"format": idf.CHUNK_FORMAT, "key_id": keys1024.public.key_id, "count": 2})
    bad.arrays["masks"] = np.ones((2, 5), dtype=object)
    error_of(c.post(f"/v1/galleries/{gallery_id}/chunks", data=encode(bad), headers=AUTH_OWNER, content_type=WIRE), 400)
    chunk = idf.enrol_chunk(keys1024.public, np.ones((2, 6), dtype=object), 4, 4)
    unmasked = idf.GalleryChunk(2, chunk.packs, np.zeros((2, 6), dtype=np.int64), chunk.seed)  # B = 0: T~ = T
    error_of(c.post(f"/v1/galleries/{gallery_id}/chunks", data=encode(idf.encode_chunk(unmasked)), headers=AUTH_OWNER,
                    content_type=WIRE), 422, "bound_exceeded")
    create = Message(meta={"model_id": "0123456789abcdef", "template_bits": 8, "key_id": keys1024.public.key_id})
    create.arrays["threshold"] = EncryptedTensor.encrypt(keys1024.public, [1]).data
    create.widths["threshold"] = keys1024.public.ciphertext_bytes
    error_of(c.post("/v1/galleries", data=encode(create), headers=AUTH_OWNER, content_type=WIRE), 404)
    body = query_body(keys1024, user_keys)
    error_of(c.post(f"/v1/galleries/{gallery_id}/verify", data=body, content_type=WIRE), 400)  # no claimed index
    error_of(c.post(f"/v1/galleries/{gallery_id}/identify", data=b"\x00" * 40, content_type=WIRE), 400)
    error_of(c.post(f"/v1/galleries/{gallery_id}/identify", data=query_body(keys1024, user_keys, shape=(1, 5, 5)),
                    content_type=WIRE), 400)
    assert c.get(f"/v1/galleries/{gallery_id}").status_code == 200  # nothing lost


def test_an_interrupted_enrolment_leaves_no_half_gallery_and_galleries_survive_a_restart(
        clouds, model, model_id, gallery_id, tmp_path, user_keys, templates):
    key = clouds.keys.public
    create = Message(meta={"model_id": model_id, "template_bits": template_bits(model), "key_id": key.key_id})
    create.arrays["threshold"] = EncryptedTensor.encrypt(key, [0]).data
    create.widths["threshold"] = key.ciphertext_bytes
    pending = clouds.client.post("/v1/galleries", data=encode(create), headers=AUTH_OWNER, content_type=WIRE)
    assert pending.status_code == 201
    pending_id = pending.get_json()["gallery_id"]
    chunk = idf.enrol_chunk(key, templates[:3], template_bits(model), pending.get_json()["embedding_bits"])
    assert clouds.client.post(f"/v1/galleries/{pending_id}/chunks", data=encode(idf.encode_chunk(chunk)),
                              headers=AUTH_OWNER, content_type=WIRE).status_code == 202
    assert pending_id not in {g["gallery_id"] for g in clouds.client.get("/v1/galleries").get_json()["galleries"]}
    clouds.restart()  # the enrolment never committed
    listed = {g["gallery_id"]: g for g in clouds.client.get("/v1/galleries").get_json()["galleries"]}
    assert pending_id not in listed and listed[gallery_id]["count"] == 15
    assert not [p for p in (clouds.root / "s1" / "galleries").iterdir() if pending_id in p.name]
    session = GallerySession(clouds.url, gallery_id, user_keys)
    path = user_files(tmp_path, [GALLERY[5]])[0]
    x = model_embedding(model, GALLERY[5])
    assert session.identify(path).index == idf.identify_reference(templates, x, THRESHOLD)


def test_no_template_in_the_clear_in_either_clouds_files(clouds, gallery_id, templates):
    files = [p for d in ("s1", "s2") for p in (clouds.root / d / "galleries").rglob("*") if p.is_file()]
    assert any(p.parent.name == gallery_id for p in files) and any(p.parent.name == "galleries" and "s2" in str(p)
                                                                  for p in files)
    rows = {b"".join(int(v).to_bytes(w, "big", signed=True) for v in row) for row in templates for w in (2, 3, 4, 8)}
    rows |= {b"".join(int(v).to_bytes(8, "little", signed=True) for v in row) for row in templates}
    for path in files:
        data = path.read_bytes()
        assert not any(r in data for r in rows), path
        assert str(list(templates[0]))[1:-1].encode() not in data


def test_enrolment_refuses_a_wrong_token_before_any_work(clouds, model, model_id):
    with pytest.raises(HECNNError, match="owner token"):
        enrol(clouds.url, "w" * 32, templates_of(model, GALLERY[:2]), template_bits(model), model_id=model_id,
              threshold=0)


def new_gallery(clouds, model, model_id, rows):
    return enrol(clouds.url, OWNER_TOKEN, templates_of(model, rows), template_bits(model), model_id=model_id,
                 threshold=THRESHOLD)["gallery_id"]


def test_searches_take_prepared_batches_and_survive_s2_losing_its_state(clouds, model, model_id, tmp_path,
                                                                        user_keys):
    rows = images(6, 7)
    gallery = new_gallery(clouds, model, model_id, rows)
    expected_templates = np.concatenate(list(templates_of(model, rows)))
    preparer = clouds.app.extensions["he_cnn.s1.gallery_preparer"]
    s2 = clouds.s2_app.extensions["he_cnn.s2"]
    session = GallerySession(clouds.url, gallery, user_keys)
    queries = [rows[2], rows[4], rows[0]]
    paths = user_files(tmp_path, queries)

    def check(i):
        x = model_embedding(model, queries[i])
        assert session.identify(paths[i]).index == idf.identify_reference(expected_templates, x, THRESHOLD)

    assert wait_for(lambda: preparer.ready_count(gallery) > 1)
    kept = len(s2.prepared)
    check(0)  # a prepared query, no new batch: S2 holds one mask less
    assert len(s2.prepared) == kept - 1
    s2.prepared = type(s2.prepared)(ttl=60)  # S2 restarted: every prepared mask is gone
    check(1)
    s2.galleries.clear()  # and the seeds too (its data directory restored from an old backup)
    preparer.drop(gallery)
    check(2)
    assert gallery in s2.galleries


def test_delete_a_gallery_at_both_clouds_and_drop_uncommitted_chunks(clouds, model, model_id, keys1024):
    c = clouds.client
    gallery = new_gallery(clouds, model, model_id, images(3, 8))
    chunk = idf.enrol_chunk(keys1024.public, np.ones((2, 6), dtype=object), template_bits(model),
                            c.get(f"/v1/galleries/{gallery}").get_json()["embedding_bits"])
    assert c.post(f"/v1/galleries/{gallery}/chunks", data=encode(idf.encode_chunk(chunk)), headers=AUTH_OWNER,
                  content_type=WIRE).status_code == 202
    error_of(c.delete(f"/v1/galleries/{gallery}/chunks"), 401)
    assert c.delete(f"/v1/galleries/{gallery}/chunks", headers=AUTH_OWNER).get_json()["dropped_chunks"] == 1
    error_of(c.post(f"/v1/galleries/{gallery}/commit", headers=AUTH_OWNER), 400)  # nothing left to commit
    assert c.get(f"/v1/galleries/{gallery}").get_json()["count"] == 3
    s2 = clouds.s2_app.extensions["he_cnn.s2"]
    assert gallery in s2.galleries
    error_of(c.delete(f"/v1/galleries/{gallery}"), 401)
    deleted = c.delete(f"/v1/galleries/{gallery}", headers=AUTH_OWNER)
    assert deleted.status_code == 200 and deleted.get_json()["s2_dropped"] is True
    assert gallery not in s2.galleries and not [p for p in (clouds.root / "s1" / "galleries").iterdir()
                                                if gallery in p.name]
    error_of(c.get(f"/v1/galleries/{gallery}"), 404)
    error_of(c.post(f"/v1/galleries/{gallery}/identify", data=b"x", content_type=WIRE), 404)
    error_of(c.delete(f"/v1/galleries/{gallery}", headers=AUTH_OWNER), 404)
    error_of(c.delete("/v1/galleries/not-an-id", headers=AUTH_OWNER), 404)
    clouds.restart()
    assert gallery not in {g["gallery_id"] for g in clouds.client.get("/v1/galleries").get_json()["galleries"]}
    assert gallery not in clouds.s2_app.extensions["he_cnn.s2"].galleries


def test_idle_pending_enrolments_are_dropped(clouds, model, model_id, monkeypatch):
    from he_cnn.servers import galleries
    key = clouds.keys.public
    create = Message(meta={"model_id": model_id, "template_bits": template_bits(model), "key_id": key.key_id})
    create.arrays["threshold"] = EncryptedTensor.encrypt(key, [0]).data
    create.widths["threshold"] = key.ciphertext_bytes
    opened = [clouds.client.post("/v1/galleries", data=encode(create), headers=AUTH_OWNER,
                                 content_type=WIRE).get_json()["gallery_id"] for _ in range(galleries.MAX_PENDING)]
    error_of(clouds.client.post("/v1/galleries", data=encode(create), headers=AUTH_OWNER, content_type=WIRE), 429)
    monkeypatch.setattr(galleries, "PENDING_SECONDS", 0.0)  # every one of them is now idle too long
    fresh = clouds.client.post("/v1/galleries", data=encode(create), headers=AUTH_OWNER, content_type=WIRE)
    assert fresh.status_code == 201
    for gallery in opened:
        error_of(clouds.client.post(f"/v1/galleries/{gallery}/commit", headers=AUTH_OWNER), 404)
    assert not [p for p in (clouds.root / "s1" / "galleries").iterdir() if p.name.endswith(opened[0])]
    assert clouds.client.delete(f"/v1/galleries/{fresh.get_json()['gallery_id']}",
                                headers=AUTH_OWNER).status_code == 200


def test_owner_unenrol_deletes_at_both_clouds_in_one_command(clouds, model, model_id, tmp_path):
    from click.testing import CliRunner
    from he_cnn.owner.cli import owner
    gallery = new_gallery(clouds, model, model_id, images(2, 10))
    labels = tmp_path / "labels.json"
    labels.write_text("{}")
    env = {"HECNN_OWNER_TOKEN": OWNER_TOKEN}
    done = CliRunner().invoke(owner, ["unenrol", "--s1", clouds.url, "--gallery", gallery, "--labels", str(labels)],
                              env=env)
    assert done.exit_code == 0 and "deleted at S1; its seeds deleted at S2" in done.output, done.output
    assert not labels.exists() and gallery not in clouds.s2_app.extensions["he_cnn.s2"].galleries
    again = CliRunner().invoke(owner, ["unenrol", "--s1", clouds.url, "--gallery", gallery, "--json"], env=env)
    assert again.exit_code == 1 and "no gallery" in again.output and len(again.output.strip().splitlines()) == 1


def test_an_append_left_idle_is_refused_not_half_published(clouds, model, model_id, keys1024, monkeypatch):
    from he_cnn.servers import galleries
    c = clouds.client
    gallery = new_gallery(clouds, model, model_id, images(2, 11))
    bits = c.get(f"/v1/galleries/{gallery}").get_json()["embedding_bits"]
    body = encode(idf.encode_chunk(idf.enrol_chunk(keys1024.public, np.ones((2, 6), dtype=object),
                                                   template_bits(model), bits)))
    assert c.post(f"/v1/galleries/{gallery}/chunks", data=body, headers=AUTH_OWNER, content_type=WIRE).status_code == 202
    monkeypatch.setattr(galleries, "PENDING_SECONDS", 0.0)
    error_of(c.post(f"/v1/galleries/{gallery}/chunks", data=body, headers=AUTH_OWNER, content_type=WIRE), 409,
             "enrolment_expired")
    error_of(c.post(f"/v1/galleries/{gallery}/commit", headers=AUTH_OWNER), 400)  # nothing half-published
    assert c.get(f"/v1/galleries/{gallery}").get_json()["count"] == 2
    store = clouds.app.extensions["he_cnn.s1.galleries"]
    stored = store.get(gallery)
    assert not store.delete(stored, only_if_idle=True)  # committed: never dropped as an idle enrolment
    assert store.delete(stored) and not store.delete(stored)  # a second delete (a race) is a no-op
