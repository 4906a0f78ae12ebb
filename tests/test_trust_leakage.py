"""What leaks over HTTP: S2 sees nothing that depends on the image, the result is the user's alone,
and S1 never holds a secret key, in its files, its environment or its memory.

S2 runs as a real process, ``he-cnn serve s2`` started by ``tests/recording_s2.py``: every plaintext
it obtains (each masked value it decrypts, each zero-test bit) is appended to a file. The owner
uploads the tiny model with ``he-cnn owner upload --model``; the user classifies four very different
images (blank, saturated, random, a digit) through the user's code path.

Statistics (scipy.stats). Masked values are scaled by their mask range 2^(bits+1+kappa) into [0, 1).
The family of tests is: a two-sample Kolmogorov-Smirnov test for every pair of images, a one-sample
KS test against the uniform distribution for every image and for the set-up reveal (K + B), and a
binomial test against 1/2 on every image's zero-test bits. Threshold: the family fails if any
p-value is at or below 1e-3 / m (m tests, Bonferroni), so an honest implementation fails a run by
chance with probability below 1e-3; ``test_the_statistics_have_power`` shows the same tests reject
unmasked and under-masked values of the same images.
"""
from __future__ import annotations

import json
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
import requests
from scipy import stats

from he_cnn.images import quantize_image
from he_cnn.training.data import load_digits_dataset
from he_cnn.errors import HECNNError
from he_cnn.crypto.paillier import generate_keypair, keypair_from_primes
from he_cnn.protocols.common import slot_bits, slots_per_pack
from he_cnn.graph.integer_model import save_integer_model
from he_cnn.graph.reference import run_reference
from he_cnn.crypto.tensor import EncryptedTensor
from he_cnn.wire import decode
from test_e2e import he_cnn
from trust_support import (REPORT, TINY_SIZE, CloudPair, SecretScanner, assert_exact, classify, process_memory,
                           process_tree, random_image, s2_secrets, tiny_model)

pytestmark = pytest.mark.slow

#: the family-wise false-alarm rate of the leakage statistics (Bonferroni-split over the tests)
P_FAMILY = 1e-3
#: the steps S2 handles in one query of the tiny model, in order, and how many values each reveals
# conv (x, then its packed cross terms z), a 2x2 pool (two levels), ReLU, dense (x, z), the result;
# "bits" stands for the bits S2 sees of one comparison: with DGK its zero-test results ("delta"), with
# OT the extension columns, S1's e bits and openings, and S2's share of the carry (ot_u, ot_e,
# ot_open..., ot_delta), all of which must be fair coins
QUERY_STEPS = ["x", "z", "d", "bits", "d", "bits", "d", "bits", "x", "z", "y"]
SIZES = {0: 64, 2: 128, 4: 64, 6: 32, 8: 32, 10: 3}
#: per comparison, the record holding one bit per compared element (DGK: the zero test; OT: S2's share)
RESULT_BITS = {"dgk": "delta", "ot": "ot_delta"}
#: the z reveals: (output positions P, channels C); each channel's P values fill whole packs
Z_SHAPES = {1: (64, 2), 9: (1, 3)}


def check_z_count(count: int, positions: int, channels: int, bits: int, kappa: int, key_bits: int) -> None:
    k = slots_per_pack(key_bits, slot_bits(bits, kappa))
    assert count == channels * -(-positions // k) * k


def images() -> dict[str, np.ndarray]:
    digit = load_digits_dataset(size=TINY_SIZE).x_test[0]
    shape = (1, TINY_SIZE, TINY_SIZE)
    return {"blank": np.zeros(shape, dtype=int).astype(object), "saturated": np.full(shape, 15).astype(object),
            "random": random_image(11), "digit": quantize_image(digit, 15)}


def read_records(path: Path, start: int, end: int) -> list[dict]:
    with path.open("rb") as f:
        f.seek(start)
        return [json.loads(line) for line in f.read(end - start).splitlines()]


def collapse(records: list[dict]) -> list[dict]:
    """The records with each comparison's run of bit records (kappa 0) merged into one "bits" record."""
    out: list[dict] = []
    for r in records:
        if r["kappa"] == 0 and out and out[-1]["step"] == "bits":
            out[-1]["values"] = out[-1]["values"] + r["values"]
            out[-1]["parts"].append(r)
        elif r["kappa"] == 0:
            out.append({"step": "bits", "bits": 1, "kappa": 0, "values": list(r["values"]), "parts": [r]})
        else:
            out.append(r)
    return out


@pytest.fixture(scope="module", params=["ot", "dgk"])
def recorded(request, tmp_path_factory):
    """Upload with the owner CLI, four queries; per image its reply and what S2 recorded during it
    (once with each comparison protocol, S1 started with ``--comparison``)."""
    root = tmp_path_factory.mktemp(f"leakage-{request.param}")
    record = root / "s2-plaintexts.jsonl"
    pair = CloudPair(root, s2_record=record, s1_args=["--comparison", request.param])
    pair.comparison = request.param
    try:
        model = tiny_model()
        model_path = root / "tiny.json"
        save_integer_model(model, model_path)
        out = he_cnn("owner", "upload", "--model", str(model_path), "--s1", pair.s1_url, "--json",
                     env={"HECNN_OWNER_TOKEN": pair.owner_token})
        model_id = json.loads(out)["model_id"]
        setup_records = read_records(record, 0, record.stat().st_size)
        cloud_key, user = pair.cloud_key(), generate_keypair(1024)
        runs = {}
        for name, pixels in images().items():
            start = record.stat().st_size
            vector, _, raw = classify(pair.s1_url, model_id, cloud_key, user, pixels)
            runs[name] = (pixels, vector, raw, collapse(read_records(record, start, record.stat().st_size)))
        yield pair, model, setup_records, user, runs
        REPORT["leakage: images queried over HTTP"] += len(runs)
        REPORT["leakage: plaintexts S2 obtained (recorded)"] += sum(len(r["values"]) for *_, rs in runs.values()
                                                                   for r in rs)
    finally:
        pair.stop()


def scaled(records: list[dict]) -> np.ndarray:
    """Every masked value, divided by its mask range 2^(bits+1+kappa): uniform on [0, 1) if hidden."""
    return np.array([v / 2 ** (r["bits"] + 1 + r["kappa"]) for r in records if r["step"] not in ("bits", "delta")
                     for v in r["values"]])


def zero_test_bits(records: list[dict]) -> np.ndarray:
    """Every bit S2 saw of the comparisons (DGK: zero-test results; OT: everything it saw of the OT)."""
    return np.array([v for r in records if r["step"] in ("bits", "delta") for v in r["values"]])


def result_bits(records: list[dict], comparison: str) -> int:
    """How many one-bit-per-element results (zero tests, or S2's carry shares) the comparisons gave."""
    return sum(len(p["values"]) for r in records if r["step"] == "bits" for p in r["parts"]
               if p["step"] == RESULT_BITS[comparison])


def test_queries_are_exact_and_s2_sees_only_masked_values(recorded):
    pair, model, setup_records, _, runs = recorded
    assert [r["step"] for r in setup_records] == ["w0", "w1"]  # the set-up: K + B of conv and fc, once
    for pixels, vector, _, records in runs.values():
        assert_exact(model, pixels, vector)
        assert [r["step"] for r in records] == QUERY_STEPS
        assert {i: len(records[i]["values"]) for i in SIZES} == SIZES
        for i in (3, 5, 7):  # one result bit per compared element
            assert sum(len(p["values"]) for p in records[i]["parts"]
                       if p["step"] == RESULT_BITS[pair.comparison]) == SIZES[i - 1]
        for i, (positions, channels) in Z_SHAPES.items():
            check_z_count(len(records[i]["values"]), positions, channels, records[i]["bits"], records[i]["kappa"],
                          pair.key_bits)
        for r in records:
            if r["kappa"]:
                assert r["kappa"] >= 40
                assert all(0 <= v < 2 ** (r["bits"] + 2 + r["kappa"]) for v in r["values"])
            else:
                assert set(r["values"]) <= {0, 1}


def leakage_p_values(setup_records: list[dict], runs: dict[str, list[dict]]) -> dict[str, float]:
    values = {name: scaled(records) for name, records in runs.items()}
    bits = {name: zero_test_bits(records) for name, records in runs.items()}
    p = {f"KS {a} vs {b}": stats.ks_2samp(values[a], values[b]).pvalue for a, b in combinations(values, 2)}
    p |= {f"uniform {name}": stats.kstest(v, "uniform").pvalue for name, v in values.items()}
    p["uniform set-up K+B"] = stats.kstest(scaled(setup_records), "uniform").pvalue
    p |= {f"binomial {name}": stats.binomtest(int(b.sum()), len(b), 0.5).pvalue for name, b in bits.items()}
    return p


def test_what_s2_sees_does_not_depend_on_the_image(recorded):
    pair, _, setup_records, _, runs = recorded
    records = {name: run[3] for name, run in runs.items()}
    z_values = {name: sum(len(r["values"]) for r in rs if r["step"] == "z") for name, rs in records.items()}
    assert all(len(scaled(r)) == 323 + z_values[name] and result_bits(r, pair.comparison) == 224
               and len(zero_test_bits(r)) >= 224 for name, r in records.items())
    p = leakage_p_values(setup_records, records)
    assert len(p) == 15
    failed = {name: value for name, value in p.items() if value <= P_FAMILY / len(p)}
    assert not failed, failed
    REPORT["leakage: statistical tests passed"] += len(p)
    REPORT["leakage: smallest p-value"] = float(f"{min(p.values()):.3g}")


def test_the_statistics_have_power(recorded):
    """Negative controls on the same images: the values S2 would see without masks, or with masks only
    as wide as the values (kappa = 0), fail the same family of tests."""
    _, model, setup_records, _, runs = recorded
    bits = model.to_spec()["bits"]
    rng = np.random.default_rng(0)

    def observed(pixels: np.ndarray, kappa: int | None) -> list[dict]:
        tensors = run_reference(model, pixels)
        out = []
        for name in ("input", "conv", "relu", "flat", "fc"):
            x, l = [int(v) for v in np.ravel(tensors[name])], bits[name]
            if kappa is None:  # unmasked: the value itself, shifted to be non-negative (scaled by 2^(l+1))
                values = [v + 2**l for v in x]
            else:
                values = [v + 2**l + int(r) for v, r in zip(x, rng.integers(0, 2 ** (l + 1 + kappa), len(x)))]
            out.append({"step": name, "bits": l, "kappa": kappa or 0, "values": values})
        out.append({"step": "delta", "bits": 1, "kappa": 0,
                    "values": [int(v > 0) for v in np.ravel(tensors["conv"])]})
        return out

    for kappa in (None, 0):
        p = leakage_p_values(setup_records, {name: observed(run[0], kappa) for name, run in runs.items()})
        failed = {name for name, value in p.items() if value <= P_FAMILY / len(p)}
        assert any(name.startswith("KS ") for name in failed), (kappa, p)  # tells images apart
        if kappa is None:
            assert any(name.startswith("uniform ") for name in failed)  # and is visibly not uniform


def test_the_result_is_not_decryptable_with_the_cloud_key(recorded):
    pair, _, _, user, runs = recorded
    secret = s2_secrets(pair.s2_dir)
    cloud = keypair_from_primes(secret["paillier p"], secret["paillier q"])
    for pixels, vector, raw, _ in runs.values():
        ciphertexts = decode(raw).array("class_vector").reshape(-1)
        assert list(EncryptedTensor.from_ciphertexts(user.public, ciphertexts, (3,)).decrypt(user.private)) == vector
        with pytest.raises(HECNNError):  # under the user's key, refused by the key check...
            EncryptedTensor(user.public, ciphertexts).decrypt(cloud.private)
        for c in ciphertexts:  # ...and decrypting it anyway with the cloud key gives noise
            if 0 < c < cloud.public.nsq:
                noise = cloud.private.decrypt(c)
                assert noise not in vector and abs(noise) > 2**900


def test_s1_never_holds_a_secret_key(recorded):
    """S2's primes and DGK secret appear in none of S1's files, environment, command line, log or memory
    (every writable region of S1 and its worker processes), nor in any GET answer of either cloud; the
    scanner does find them in S2's memory."""
    pair, _, _, _, _ = recorded
    scanner = SecretScanner(s2_secrets(pair.s2_dir))
    files = [p for p in pair.s1_dir.rglob("*") if p.is_file()]
    assert len(files) >= 4  # pinned key, model, set-up, summary
    for path in files:
        assert not scanner.find(path.read_bytes()), path
    assert not scanner.find("\n".join(pair.logs).encode())
    scanned = 0
    for pid in process_tree(pair.s1.process.pid):
        for name in ("environ", "cmdline"):
            assert not scanner.find(Path(f"/proc/{pid}/{name}").read_bytes()), (pid, name)
        for region in process_memory(pid):
            assert not scanner.find(region), pid
            scanned += len(region)
    assert scanned > 10 * 2**20
    found = set()
    for region in process_memory(pair.s2.process.pid):
        found.update(scanner.find(region))
    assert {"paillier p (little-endian)", "dgk v_p (little-endian)"} <= found, found  # GMP's limbs
    for url, path in [(pair.s1_url, p) for p in ("/v1/health", "/v1/public-key", "/v1/models")] + \
                     [(pair.s2_url, p) for p in ("/v1/health", "/v1/public-key")]:
        assert not scanner.find(requests.get(url + path, timeout=10).content), path  # no route hands them out
    REPORT["leakage: bytes of S1 memory scanned for S2's secrets"] += scanned
