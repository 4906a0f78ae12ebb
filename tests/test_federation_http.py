"""Federated sessions over HTTP (servers/federation.py, owner/federating.py): S1 and S2 in this process,
each served by waitress in a thread, 1024-bit keys. Rounds sum exactly; a drop-out aborts the round; a
restarted S1 keeps the session; tokens, rounds and refusals; S1's disk holds only ciphertexts."""
from __future__ import annotations

import time

import numpy as np
import pytest

from he_cnn.crypto.paillier import generate_keypair
from he_cnn.errors import HECNNError, RoundNotReady
from he_cnn.owner.federating import HTTPAggregator, create_session
from he_cnn.protocols import aggregate as agg
from he_cnn.transport.http_channel import fetch_public_key
from he_cnn.wire import Message, encode
from threaded_clouds import ThreadedClouds
from test_service_errors import AUTH_OWNER, OWNER_TOKEN, error_of

pytestmark = pytest.mark.usefixtures("no_pool_filling")  # apps never shut down: no pool filling

COUNT, BITS, WEIGHTS = 300, 24, (40, 25, 35)


@pytest.fixture(scope="module")
def clouds(tmp_path_factory, keys1024):
    return ThreadedClouds(tmp_path_factory.mktemp("federation"), keys1024)


@pytest.fixture(scope="module")
def consortium():
    return generate_keypair(1024)


def session(clouds, consortium, rounds=3):
    created = create_session(clouds.url, OWNER_TOKEN, COUNT, BITS, WEIGHTS, rounds, consortium)
    key = fetch_public_key(clouds.url, 10.0, peer="S1")[0]
    return created, HTTPAggregator(clouds.url, created["session_id"], created["owner_tokens"], key, consortium)


def updates(seed):
    rng = np.random.default_rng(seed)
    return [rng.integers(-(1 << BITS) + 1, 1 << BITS, COUNT).astype(object) for _ in WEIGHTS]


def test_rounds_sum_exactly_a_dropout_aborts_and_a_restart_keeps_the_session(clouds, consortium):
    created, owners = session(clouds, consortium)
    layout = agg.AggregationLayout(COUNT, BITS, WEIGHTS, owners.key_bits)
    assert created["owners"] == 3 and len(set(created["owner_tokens"])) == 3 and created["packs"] == layout.packs
    values = updates(1)
    result = owners.aggregate(values, layout)
    assert list(result.sums) == list(agg.plaintext_average(values, WEIGHTS)[0])
    assert result.cloud_bytes > 0 and owners.status()["round"] == 2
    # round 2: owner 2 drops out after two uploads; the round is aborted, its uploads discarded, and redone
    values = updates(2)
    for k in (0, 1):
        owners.upload(k, agg.encrypt_update(owners.key, values[k], layout))
    with pytest.raises(RoundNotReady):
        owners.fetch_sum(0, layout)
    client = clouds.app.test_client()
    state = client.post(f"/v1/federations/{created['session_id']}/abort", headers=AUTH_OWNER).get_json()
    assert state["aborted"] == 1 and state["uploaded"] == [] and state["round"] == 2
    # ... and S1 restarts with two of three uploads in: the session and the uploads survive
    for k in (0, 1):
        owners.upload(k, agg.encrypt_update(owners.key, values[k], layout))
    clouds.restart()
    owners.base = owners.base.replace(owners.base.split("/v1/")[0], clouds.url)
    assert owners.status()["uploaded"] == [0, 1]
    _, _, answer = owners.upload(2, agg.encrypt_update(owners.key, values[2], layout))
    assert answer["aggregated"] and answer["round"] == 3
    assert list(owners.fetch_sum(1, layout)[0]) == list(agg.plaintext_average(values, WEIGHTS)[0])
    with pytest.raises(RoundNotReady):  # publishing waits for the session's last round
        owners._request("POST", "/publish", 0, encode(Message(meta={"runs": [["stem_conv.weight", 1, 1, 1]]})))
    # S1's disk: the session file and ciphertexts under the two keys, no plaintext sum
    folder = clouds.root / "s1" / "federations" / created["session_id"]
    assert sorted(p.name for p in folder.iterdir()) == ["session.json", "sum-1.hecn", "sum-2.hecn"]


def test_tokens_rounds_and_parameters_are_checked(clouds, consortium):
    created, owners = session(clouds, consortium, rounds=1)
    sid = created["session_id"]
    client = clouds.app.test_client()
    error_of(client.get(f"/v1/federations/{sid}", headers={"Authorization": "Bearer nope"}), 401)
    error_of(client.post(f"/v1/federations/{sid}/rounds/1/update", data=b"x",
                         headers={"Authorization": f"Bearer {OWNER_TOKEN}"}), 401)  # the operator is no owner
    error_of(client.get("/v1/federations/0123456789abcdef", headers=AUTH_OWNER), 404)
    layout = agg.AggregationLayout(COUNT, BITS, WEIGHTS, owners.key_bits)
    owners.round = 2
    with pytest.raises(RoundNotReady):
        owners.upload(0, agg.encrypt_update(owners.key, updates(3)[0], layout))
    owners.round = 1
    wrong = agg.AggregationLayout(COUNT + 200, BITS, WEIGHTS, owners.key_bits)
    with pytest.raises(HECNNError, match="expected"):
        owners.upload(0, agg.encrypt_update(owners.key, np.zeros(COUNT + 200, dtype=object), wrong))
    for bad in [dict(weights=(1,)), dict(count=0), dict(rounds=0), dict(value_bits=99)]:
        args = {**dict(count=COUNT, value_bits=BITS, weights=WEIGHTS, rounds=1), **bad}
        with pytest.raises(HECNNError):
            create_session(clouds.url, OWNER_TOKEN, args["count"], args["value_bits"], args["weights"], args["rounds"],
                           consortium)
    with pytest.raises(HECNNError, match="consortium key"):
        create_session(clouds.url, OWNER_TOKEN, COUNT, BITS, WEIGHTS, 1, clouds.cloud.keys)


def test_a_round_with_an_owner_missing_aborts_itself_after_round_seconds(clouds, consortium):
    created = create_session(clouds.url, OWNER_TOKEN, COUNT, BITS, WEIGHTS, 2, consortium, round_seconds=1.0)
    key = fetch_public_key(clouds.url, 10.0, peer="S1")[0]
    owners = HTTPAggregator(clouds.url, created["session_id"], created["owner_tokens"], key, consortium)
    layout = agg.AggregationLayout(COUNT, BITS, WEIGHTS, owners.key_bits)
    owners.upload(0, agg.encrypt_update(owners.key, updates(4)[0], layout))
    assert owners.status()["uploaded"] == [0]
    time.sleep(1.2)
    state = owners.status()
    assert state["uploaded"] == [] and state["aborted"] == 1 and state["round"] == 1


def test_the_federation_commands_have_help_and_fail_in_one_line():
    from click.testing import CliRunner

    from he_cnn.servers.cli import main

    for command in (["owner", "federate"], ["federate-demo"], ["owner", "audit"]):
        result = CliRunner().invoke(main, [*command, "--help"])
        assert result.exit_code == 0 and result.output.startswith("Usage: ")
    assert "--gradient-leakage" in CliRunner().invoke(main, ["owner", "audit", "--help"]).output
    result = CliRunner().invoke(main, ["owner", "federate", "--s1", "http://127.0.0.1:9", "--token", "t", "-q"])
    lines = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert result.exit_code == 1 and len(lines) == 1 and "unreachable" in lines[0], result.output


@pytest.mark.slow
def test_the_demo_runs_a_session_and_serves_its_aggregate_exactly():
    """``he-cnn federate-demo`` at 1024 bits, one short round: S1 and S2 as processes, three owners over HTTP;
    the published aggregate answers a user's query with exactly its integer reference."""
    import json

    from click.testing import CliRunner

    from he_cnn.servers.cli import main

    result = CliRunner().invoke(main, ["federate-demo", "--key-bits", "1024", "--rounds", "1", "--local-epochs", "1",
                                       "--images", "1", "--json", "-q"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output.strip().splitlines()[-1])
    (only,) = report["rounds"]
    assert report["key_bits"] == 1024 and report["samples"] == [449, 449, 449] and only["cloud_bytes"] > 0
    assert all(o["upload_bytes"] > 0 for o in only["owners"]) and 0.0 <= report["integer_accuracy"] <= 1.0
    (query,) = report["queries"]
    assert query["equals_reference"] and len(report["model_id"]) == 16
