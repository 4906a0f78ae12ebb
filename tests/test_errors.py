"""The error hierarchy is the one table of error codes and HTTP statuses: every class has its own code
and a status; a Flask app of the clouds answers each with that code and status; the client maps each
JSON error body back to its class; and a cloud passes on a peer's error as 502 ``peer_error`` unless
the class says it is about the request.
"""
from __future__ import annotations

import json

import pytest
import requests

from he_cnn import errors
from he_cnn.errors import HECNNError, PeerError, ProtocolError
from he_cnn.servers import launch, model_store, s1, s2, storage  # noqa: F401 (their error classes join the walk)
from he_cnn.servers.http import new_app, status_of
from he_cnn.transport.http_channel import error_from_response

#: what the clouds answered before the codes moved into he_cnn.errors; every other code is 400
PINNED_STATUS = {"bound_exceeded": 422, "unknown_model": 404, "peer_key_changed": 502, "peer_error": 502,
                 "peer_unavailable": 503, "service_busy": 429, "workers_unavailable": 503,
                 "round_not_ready": 409,  # (federated sessions, new with them)
                 "enrolment_expired": 409}  # (galleries)


def all_subclasses() -> list[type[HECNNError]]:
    found, stack = [], [HECNNError]
    while stack:
        cls = stack.pop()
        found.append(cls)
        stack.extend(cls.__subclasses__())
    return found


def fake_response(status: int, body: bytes) -> requests.Response:
    response = requests.Response()
    response.status_code = status
    response._content = body
    response.headers["Content-Type"] = "application/json"
    return response


@pytest.fixture(scope="module")
def client():
    app = new_app(__name__, 1024)

    @app.get("/raise/<code>")
    def raise_error(code: str):
        raise errors.error_classes()[code]("what was expected, and what arrived")

    @app.get("/relay/<code>")
    def relay_error(code: str):
        raise error_from_response(fake_response(errors.error_classes()[code].status,
                                                json.dumps({"error": code, "message": "refused"}).encode()), "S2")

    return app.test_client()


def test_every_error_class_has_its_own_code_and_an_http_status():
    classes = all_subclasses()
    codes = [cls.code for cls in classes]
    assert len(set(codes)) == len(codes), sorted(c for c in codes if codes.count(c) > 1)
    for cls in classes:
        assert isinstance(cls.code, str) and cls.code, cls
        assert 400 <= cls.status <= 599, cls


def test_error_classes_holds_every_class_of_the_errors_module():
    table = errors.error_classes()
    in_module = [cls for cls in all_subclasses() if cls.__module__ == errors.__name__]
    assert sorted(table) == sorted(cls.code for cls in in_module)
    assert all(table[cls.code] is cls for cls in in_module)
    assert {code: cls.status for code, cls in table.items() if cls.status != 400} == PINNED_STATUS


def test_the_servers_raise_the_classes_of_the_errors_module():
    assert s1.PeerKeyChanged is errors.PeerKeyChanged
    assert s2.UnknownSetup is errors.UnknownSetup
    assert model_store.UnknownModel is errors.UnknownModel


@pytest.mark.parametrize("code", sorted(errors.error_classes()))
def test_each_code_crosses_http_and_comes_back_as_its_class(client, code):
    cls = errors.error_classes()[code]
    reply = client.get(f"/raise/{code}")
    assert reply.status_code == cls.status == status_of(cls("x"))[0]
    assert reply.get_json() == {"error": code, "message": "what was expected, and what arrived"}

    err = error_from_response(fake_response(reply.status_code, reply.data), "S1")
    assert type(err) is cls
    assert str(err) == "S1: what was expected, and what arrived"
    assert (err.peer_code, err.peer_status) == (code, cls.status)


@pytest.mark.parametrize("code", sorted(errors.error_classes()))
def test_a_peers_error_is_relayed_as_peer_error_unless_it_is_about_the_request(client, code):
    cls = errors.error_classes()[code]
    reply = client.get(f"/relay/{code}")
    expected = (cls.status, code) if cls.relayed_as_is else (PeerError.status, PeerError.code)
    assert (reply.status_code, reply.get_json()["error"]) == expected
    assert reply.get_json()["message"] == "S2: refused"
    assert status_of(error_from_response(fake_response(cls.status, reply.data), "S1"))[0] == reply.status_code


def test_bound_exceeded_keeps_its_status_through_the_peer(client):
    assert client.get("/relay/bound_exceeded").status_code == 422
    assert client.get("/relay/unknown_setup").status_code == 502


@pytest.mark.parametrize("status, body, code", [
    (418, json.dumps({"error": "no_such_code", "message": "m"}).encode(), "no_such_code"),
    (500, b"<html>proxy error</html>", "http_error"),
    (400, json.dumps({"error": "bad_request"}).encode(), "http_error"),
])
def test_unknown_or_malformed_error_bodies_are_protocol_errors(status, body, code):
    err = error_from_response(fake_response(status, body), "S2")
    assert type(err) is ProtocolError
    assert (err.peer_code, err.peer_status) == (code, status)


def test_start_up_errors_of_the_servers_keep_the_default_status():
    assert storage.DataDirError.status == launch.CloudStartError.status == HECNNError.status == 400
    assert storage.DataDirError.code not in errors.error_classes()
