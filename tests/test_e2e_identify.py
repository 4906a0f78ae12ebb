"""Identification end to end with a 2048-bit cloud key: S1 and S2 as processes, the owner trains and uploads
the built-in embedding network (``he-cnn owner upload --arch embed``) and enrols the digits with ``he-cnn owner
enrol`` without a model file (the built-in network, trained again on its side: the same integers, or the
answers below would differ), the user identifies and verifies with ``he-cnn user identify|verify --json``;
every answer equals the plaintext integer reference (``identify_reference``) of the uploaded model, including
a query with no match, and the rank-1 accuracy ``enrol`` prints is that of its templates. Then S1 restarts
and the gallery answers again."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from he_cnn.graph.integer_model import load_integer_model
from he_cnn.graph.reference import classify_reference
from he_cnn.images import load_image_file, quantize_image
from he_cnn.owner.enrol_cli import gallery_dataset, gallery_split
from he_cnn.owner.enrolling import as_templates, embedding as embedding_of, template_bits, template_shift
from he_cnn.protocols.identify import identify_reference, verify_reference
from he_cnn.training.data import load_digits_dataset
from he_cnn.training.embedding import rank1_accuracy
from test_e2e import Clouds, he_cnn

pytestmark = pytest.mark.slow


def embedding(model_path: Path, image: Path) -> np.ndarray:
    model = load_integer_model(model_path)
    pixels = quantize_image(load_image_file(image, model.input_shape[1]), model.input_max)
    return np.asarray(classify_reference(model, pixels), dtype=object)


def test_identify_and_verify_2048(tmp_path):
    clouds = Clouds(tmp_path, 2048)
    try:
        saved_model = tmp_path / "embed.json"
        owner = {"HECNN_OWNER_TOKEN": clouds.owner_token, "HECNN_CACHE_DIR": str(tmp_path / "cache")}
        model_id = json.loads(he_cnn("owner", "upload", "--arch", "embed", "--save-model", str(saved_model), "--s1",
                                     clouds.s1_url, "--json", env=owner))["model_id"]
        model = load_integer_model(saved_model)
        images, gallery_labels, probes, probe_labels = gallery_split(model, gallery_dataset(model, "digits"), 2)
        embeddings = np.stack([embedding_of(model, img) for img in images])
        bits = template_bits(model)
        templates = as_templates(embeddings, bits, template_shift(embeddings[:8], bits))  # as enrol's first chunk
        blank = np.zeros_like(load_digits_dataset().x_test[0][0])
        similarities = np.sort(embeddings.dot(templates.T).reshape(-1))
        blank_best = max(templates.dot(embedding_of(model, quantize_image(blank[None], model.input_max))))
        threshold = max(int(similarities[len(similarities) // 2]), int(blank_best) + 1)  # the blank image: no match
        labels = tmp_path / "labels.json"
        out = json.loads(he_cnn("owner", "enrol", "--s1", clouds.s1_url, "--model", model_id, "--per-class", "2",
                                "--threshold", str(threshold), "--chunk", "8", "--labels", str(labels), "--json",
                                env=owner))
        gallery_id = out["gallery_id"]
        assert out["count"] == 20 and len(json.loads(labels.read_text())["labels"]) == 20
        assert out["rank1_accuracy"] == rank1_accuracy(templates, gallery_labels,
                                                       [embedding_of(model, x) for x in probes], probe_labels)
        key = tmp_path / "me.key"
        he_cnn("user", "keygen", "--out", str(key), "--bits", "1024")
        data = load_digits_dataset()
        paths = []
        for i in (0, 1):
            paths.append(tmp_path / f"probe-{i}.npy")
            np.save(paths[-1], data.x_test[i][0])
        paths.append(tmp_path / "blank.npy")  # a blank image: every similarity is below the threshold
        np.save(paths[-1], blank)
        found = json.loads(he_cnn("user", "identify", "--s1", clouds.s1_url, "--gallery", gallery_id, "--key", str(key),
                                  "--labels", str(labels), "--json", *map(str, paths)))["results"]
        expected = [identify_reference(templates, embedding(saved_model, p), threshold) for p in paths]
        assert [r["index"] for r in found] == expected and expected[-1] is None
        claim = 0 if expected[0] is None else expected[0]
        verified = json.loads(he_cnn("user", "verify", "--s1", clouds.s1_url, "--gallery", gallery_id, "--key",
                                     str(key), "--claim", str(claim), "--json", str(paths[0])))["results"][0]
        assert verified["match"] == verify_reference(templates, embedding(saved_model, paths[0]), threshold, claim)
        clouds.restart_s1()
        again = json.loads(he_cnn("user", "identify", "--s1", clouds.s1_url, "--gallery", gallery_id, "--key",
                                  str(key), "--json", str(paths[1])))["results"][0]
        assert again["index"] == expected[1]
    finally:
        clouds.stop()
