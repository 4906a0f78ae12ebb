"""Every parser of outside bytes, fed deep, wide, truncated and mistyped input by hypothesis: the
project's own error every time, never a ``RecursionError``, ``MemoryError`` or other builtin exception.

The parsers: the bounded JSON reader itself (:mod:`he_cnn.bounded_json`), wire messages
(:func:`he_cnn.wire.decode`), the user's key file, the owner's integer-model file, S1's model summary
on disk, a gallery's labels file, a federation owner's file, S1's gallery summary and S2's gallery
seeds. Over HTTP (Flask test clients; S1 reaches S2 over real HTTP): a deeply nested wire header to
S1's classify and upload and to S2's protocol rounds is a 400 JSON error, a wire body of another
Content-Type a 415, an unknown route a 404 that names the path. On the command line, a deeply nested
key or model file is one ``Error:`` line and exit status 1.
"""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from he_cnn.bounded_json import MAX_DEPTH, JSONLimits, parse_json
from he_cnn.errors import BadRequest, WireFormatError
from he_cnn.graph.integer_model import MODEL_FILE_LIMITS, load_integer_model, save_integer_model
from he_cnn.parties.compute_cloud import ModelSetup, encrypt_model
from he_cnn.protocols.linear import LinearSetup
from he_cnn.servers import s2 as s2_app
from he_cnn.servers.config import S2Config
from he_cnn.servers.http import shutdown_app
from he_cnn.servers.model_store import INFO_FILE, ModelStore, read_info
from he_cnn.servers.storage import DataDirError
from he_cnn.parties.key_cloud import KeyCloud
from he_cnn.user.keys import KEY_FILE_LIMITS, load_user_key
from he_cnn.wire import HEADER_LIMITS, MAGIC, VERSION, Message, decode, encode
from test_service_errors import (AUTH_CLOUD, AUTH_OWNER, CLOUD_TOKEN, OWNER_TOKEN, WIRE, error_of, healthy, make_s1,
                                 start_server, tiny_model)

# the apps here are never shut down: randomness pools filled in their daemon threads would slow every later test
pytestmark = pytest.mark.usefixtures("no_pool_filling")

ROOT = Path(__file__).resolve().parents[1]
HYPOTHESIS = dict(deadline=None, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
#: a stand-in for a node of a document that is replaced by deep JSON text once the document is written
DEEP_MARK = "\u0000deep\u0000"


# -- hostile documents -----------------------------------------------------------------------------

JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(min_value=-2**64, max_value=2**64),
                         st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12),
                         st.sampled_from(['"[[[{{', "\\", '"', "]}"]))
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=5),
                                                                 st.dictionaries(st.text(max_size=6), inner, max_size=5)),
                           max_leaves=25)
CLOSER = {"[": "]", '{"k":': "}"}


@st.composite
def deep_json(draw) -> str:
    """Nesting past MAX_DEPTH: up to 100,000 levels of ``[`` or ``{"k":`` (or both), closed or not."""
    depth = draw(st.one_of(st.integers(MAX_DEPTH + 1, 3000), st.sampled_from([1100, 100_000])))
    kinds = draw(st.sampled_from([["["], ['{"k":'], ["[", '{"k":']]))
    opens = [kinds[i % len(kinds)] for i in range(depth)]
    inner = draw(st.sampled_from(["0", '"x"', "[]", '"]]]}}}"']))
    closes = "".join(CLOSER[o] for o in reversed(opens)) if draw(st.booleans()) else ""
    return "".join(opens) + inner + closes


@st.composite
def truncated_json(draw) -> str:
    text = json.dumps(draw(JSON_VALUES))
    return text[:draw(st.integers(0, max(0, len(text) - 1)))]


NOT_JSON_NUMBERS = st.sampled_from(["NaN", "[Infinity]", '{"a": -Infinity}', "[1e999]", "1" * 5000, "-"])
#: everything but deep nesting, as text: truncated, mistyped (any JSON value), not JSON at all
SHALLOW_HOSTILE = st.one_of(truncated_json(), JSON_VALUES.map(json.dumps), NOT_JSON_NUMBERS)
#: any of it as bytes, random bytes and non-UTF-8 included
HOSTILE_BYTES = st.one_of(deep_json().map(str.encode), SHALLOW_HOSTILE.map(str.encode), st.binary(max_size=200),
                          st.just(b'{"a": "\xff\xfe"}'), st.just('["é"]'.encode("utf-16")))


def wide_json(limits: JSONLimits, values: int | None = None) -> bytes:
    """A list of zeros, in few bytes: ``values`` in all (the list counts), one more than ``limits``
    allow unless said otherwise."""
    count = (limits.max_items + 1 if values is None else values) - 1
    return b"[" + b"0," * (count - 1) + b"0]"


def with_deep(document: object, deep: str) -> bytes:
    """``document`` as JSON text with its :data:`DEEP_MARK` node replaced by ``deep`` (too deep to dump)."""
    return json.dumps(document).replace(json.dumps(DEEP_MARK), deep).encode()


@st.composite
def replaced_node(draw, document: object, values: st.SearchStrategy) -> object:
    """``document`` (a JSON value) with one node, drawn by walking down from the top, replaced by a value."""
    document = json.loads(json.dumps(document))  # a private copy
    parent, key = None, None
    node = document
    while isinstance(node, (dict, list)) and node and draw(st.booleans()):
        parent = node
        key = draw(st.sampled_from(sorted(node) if isinstance(node, dict) else range(len(node))))
        node = node[key]
    value = draw(values)
    if parent is None:
        return value
    parent[key] = value
    return document


#: what a refusal of deep nesting says; a small document's size or value bound may refuse it first
DEPTH_REFUSED = f"deeper than {MAX_DEPTH} levels"
ANY_BOUND_REFUSED = f"{DEPTH_REFUSED}|more than [0-9]+ values|more than the limit"


def assert_depth_refused(call, error: type[Exception] = BadRequest, match: str = DEPTH_REFUSED) -> None:
    with pytest.raises(error, match=match):
        call()


# -- the bounded reader ----------------------------------------------------------------------------

@settings(max_examples=60, **HYPOTHESIS)
@given(deep_json())
def test_deep_json_is_refused_before_it_is_parsed(text):
    assert_depth_refused(lambda: parse_json(text.encode(), HEADER_LIMITS, "doc"))


@settings(max_examples=150, **HYPOTHESIS)
@given(HOSTILE_BYTES, st.integers(1, 4096), st.integers(1, 200))
def test_hostile_json_is_read_or_refused(data, max_bytes, max_items):
    try:
        parse_json(data, JSONLimits(max_bytes=max_bytes, max_items=max_items), "doc")
    except BadRequest as e:
        assert "doc" in str(e) and "\n" not in str(e)


@settings(max_examples=150, **HYPOTHESIS)
@given(JSON_VALUES)
def test_valid_json_reads_as_json_loads_reads_it(value):
    """Strings full of brackets, quotes and backslashes are not structure: nothing valid is refused."""
    text = json.dumps(value)
    assert parse_json(text.encode(), JSONLimits(max_bytes=1 << 20, max_items=1 << 10), "doc") == json.loads(text)


@pytest.mark.parametrize("kind", ["[", '{"k":'])
def test_the_depth_limit_is_exact(kind):
    noise = '"[[{{\\"\\\\]]"'  # a string of brackets, an escaped quote and a backslash
    for depth, ok in ((MAX_DEPTH, True), (MAX_DEPTH + 1, False)):
        text = kind * depth + noise + CLOSER[kind] * depth
        if ok:
            parse_json(text.encode(), HEADER_LIMITS, "doc")
        else:
            assert_depth_refused(lambda: parse_json(text.encode(), HEADER_LIMITS, "doc"))


@pytest.mark.parametrize("limits", [HEADER_LIMITS, KEY_FILE_LIMITS, MODEL_FILE_LIMITS], ids=["header", "key", "model"])
def test_one_value_too_many_is_refused(limits):
    data = wide_json(limits)
    assert len(data) <= limits.max_bytes  # refused for its values, not its size
    with pytest.raises(BadRequest, match=f"more than {limits.max_items} values"):
        parse_json(data, limits, "doc")
    assert len(parse_json(wide_json(limits, limits.max_items), limits, "doc")) == limits.max_items - 1


def test_an_oversized_document_is_refused_before_it_is_scanned():
    with pytest.raises(BadRequest, match="more than the limit of 100"):
        parse_json(b" " * 101, JSONLimits(max_bytes=100, max_items=10), "doc")


# -- wire messages ---------------------------------------------------------------------------------

def wire(header: bytes, payload: bytes = b"") -> bytes:
    return struct.pack(">4sHI", MAGIC, VERSION, len(header)) + header + payload


#: array specs of every wrong shape: wrong types, huge and non-finite numbers, too many dimensions
SPEC_VALUES = st.one_of(JSON_SCALARS, st.lists(st.integers(0, 3), max_size=70), st.just(1e300), st.just(2 ** 70))
ARRAY_SPECS = st.one_of(JSON_VALUES, st.fixed_dictionaries(
    {"name": st.one_of(st.text(max_size=4), SPEC_VALUES), "shape": SPEC_VALUES, "width": SPEC_VALUES,
     "signed": SPEC_VALUES}))


@settings(max_examples=60, **HYPOTHESIS)
@given(deep_json(), st.sampled_from(["bare", "meta", "spec"]))
def test_a_deep_header_is_a_wire_format_error(deep, where):
    header = {"bare": DEEP_MARK, "meta": {"meta": {"a": DEEP_MARK}, "arrays": []},
              "spec": {"meta": {}, "arrays": [{"name": "x", "shape": DEEP_MARK, "width": 1, "signed": True}]}}[where]
    assert_depth_refused(lambda: decode(wire(with_deep(header, deep))), WireFormatError)


def test_a_wide_header_is_a_wire_format_error():
    header = b'{"meta":{"a":' + wide_json(HEADER_LIMITS) + b'},"arrays":[]}'
    with pytest.raises(WireFormatError, match="values"):
        decode(wire(header))


@settings(max_examples=200, **HYPOTHESIS)
@given(st.one_of(
    HOSTILE_BYTES.map(wire),
    st.builds(lambda meta, specs, payload: wire(json.dumps({"meta": meta, "arrays": specs}).encode(), payload),
              JSON_VALUES, st.lists(ARRAY_SPECS, max_size=3), st.binary(max_size=64)),
    st.builds(lambda data, cut: data[:cut], st.just(encode(Message(meta={"a": [1, {"b": "c"}]},
                                                                   arrays={"x": np.arange(6).reshape(2, 3)}))),
              st.integers(0, 80)),
))
def test_hostile_messages_decode_or_are_wire_format_errors(data):
    try:
        decode(data)
    except WireFormatError as e:
        assert "\n" not in str(e)


# -- the user's key file ---------------------------------------------------------------------------

def _valid_key_document() -> dict:
    from gmpy2 import next_prime

    p, q = int(next_prime(2 ** 255 + 12345)), int(next_prime(2 ** 256 + 6789))
    return {"format": "he-cnn-user-key", "version": 1, "n": p * q, "p": p, "q": q}


KEY_DOCUMENT = _valid_key_document()


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("parsers")


def test_a_valid_key_file_loads(scratch):
    (scratch / "key.json").write_text(json.dumps(KEY_DOCUMENT))
    assert load_user_key(scratch / "key.json").public.n == KEY_DOCUMENT["n"]


@settings(max_examples=100, **HYPOTHESIS)
@given(data=st.data())
def test_hostile_key_files_are_bad_requests(scratch, data):
    kind = data.draw(st.sampled_from(["bytes", "field", "deep field"]))
    if kind == "bytes":
        content = data.draw(HOSTILE_BYTES)
    elif kind == "field":
        content = json.dumps(data.draw(replaced_node(KEY_DOCUMENT, st.one_of(JSON_VALUES, st.just(1e300),
                                                                             st.just(2 ** 9000))))).encode()
    else:
        content = with_deep(data.draw(replaced_node(KEY_DOCUMENT, st.just(DEEP_MARK))), data.draw(deep_json()))
    path = scratch / "hostile.key"
    path.write_bytes(content)
    try:
        load_user_key(path)
    except BadRequest as e:
        assert str(path) in str(e) and "\n" not in str(e)
    if kind == "deep field":
        assert_depth_refused(lambda: load_user_key(path), match=ANY_BOUND_REFUSED)


# -- the owner's integer-model file ----------------------------------------------------------------

@pytest.fixture(scope="module")
def model_document(scratch) -> dict:
    save_integer_model(tiny_model(), scratch / "model.json")
    return json.loads((scratch / "model.json").read_text())


@settings(max_examples=100, **HYPOTHESIS)
@given(data=st.data())
def test_hostile_model_files_are_bad_requests(scratch, model_document, data):
    kind = data.draw(st.sampled_from(["bytes", "field", "deep field", "truncated"]))
    if kind == "bytes":
        content = data.draw(HOSTILE_BYTES)
    elif kind == "field":
        content = json.dumps(data.draw(replaced_node(model_document, JSON_VALUES))).encode()
    elif kind == "deep field":
        content = with_deep(data.draw(replaced_node(model_document, st.just(DEEP_MARK))), data.draw(deep_json()))
    else:
        text = json.dumps(model_document, indent=1).encode()
        content = text[:data.draw(st.integers(0, len(text) - 1))]
    path = scratch / "hostile-model.json"
    path.write_bytes(content)
    try:
        load_integer_model(path)
    except BadRequest as e:
        assert "hostile-model.json" in str(e) and "\n" not in str(e)
    if kind == "deep field":
        assert_depth_refused(lambda: load_integer_model(path))


def test_a_model_file_of_too_many_values_is_refused(scratch):
    path = scratch / "wide-model.json"
    path.write_bytes(wide_json(MODEL_FILE_LIMITS))
    with pytest.raises(BadRequest, match="values"):
        load_integer_model(path)


# -- S1's files ------------------------------------------------------------------------------------

@settings(max_examples=100, **HYPOTHESIS)
@given(st.one_of(HOSTILE_BYTES, st.builds(lambda doc: json.dumps(doc).encode(), replaced_node(
    {"model_id": "0123456789abcdef", "key_id": "k" * 16, "created": "2024-01-01T00:00:00Z", "layers": 5,
     "input_shape": [1, 6, 6], "input_max": 15, "classes": ["a"]}, JSON_VALUES))))
def test_hostile_model_summaries_are_bad_requests(scratch, data):
    path = scratch / "model.json"
    path.write_bytes(data)
    try:
        info = read_info(path, "0123456789abcdef", "k" * 16)
    except BadRequest as e:
        assert "\n" not in str(e)
    else:
        assert info["model_id"] == "0123456789abcdef" and isinstance(info["created"], str)


@pytest.mark.parametrize("corrupt", ["summary", "model", "setup"])
def test_a_deep_stored_file_stops_s1_with_its_name(tmp_path, keys1024, corrupt):
    model = encrypt_model(tiny_model(), keys1024.public)
    layers = {name: LinearSetup(np.zeros(layer.weight.shape, dtype=object), layer.weight.add(
        np.zeros(layer.weight.shape, dtype=object))) for name, layer in model.linear.items()}
    stored = ModelStore(tmp_path).add(model.serialize(), model, ModelSetup("s" * 32, layers))
    entry = tmp_path / "models" / stored.model_id
    deep = "[" * 100_000
    if corrupt == "summary":
        (entry / INFO_FILE).write_text(deep)
    else:
        (entry / ("model.hecn" if corrupt == "model" else "setup.hecn")).write_bytes(wire(deep.encode()))
    with pytest.raises(DataDirError, match=f"{stored.model_id}.*deeper than {MAX_DEPTH} levels"):
        ModelStore(tmp_path).load(keys1024.public)


# -- over HTTP -------------------------------------------------------------------------------------



@pytest.fixture(scope="module")
def clouds(keys1024, tmp_path_factory):
    """(S1 test client, S2 test client, a stored model's id, S1's URL): S2 and S1 served by waitress."""
    s2 = s2_app.create_app(S2Config(data_dir=tmp_path_factory.mktemp("s2"), cloud_token=CLOUD_TOKEN,
                                    key_bits=1024), key_cloud=KeyCloud.create(keys1024))
    s2_server = start_server(s2)
    s1 = make_s1(tmp_path_factory.mktemp("s1"), f"http://127.0.0.1:{s2_server.socket.getsockname()[1]}")
    s1_server = start_server(s1)
    client = s1.test_client()
    reply = client.post("/v1/models", data=encrypt_model(tiny_model(), keys1024.public).serialize(), headers=AUTH_OWNER,
                        content_type=WIRE)
    assert reply.status_code == 201, reply.data
    yield client, s2.test_client(), reply.get_json()["model_id"], f"http://127.0.0.1:{s1_server.socket.getsockname()[1]}"
    s1_server.close()
    s2_server.close()
    shutdown_app(s1)
    shutdown_app(s2)


def wire_endpoints(clouds) -> dict[str, tuple[object, str, dict[str, str]]]:
    s1, s2, model_id, _ = clouds
    return {"S1 classify": (s1, f"/v1/models/{model_id}/classify", {}),
            "S1 upload": (s1, "/v1/models", AUTH_OWNER),
            "S2 smp": (s2, "/v1/rounds/smp", AUTH_CLOUD),
            "S2 linear": (s2, "/v1/rounds/linear", AUTH_CLOUD),
            "S1 new gallery": (s1, "/v1/galleries", AUTH_OWNER),
            "S2 identify_masks": (s2, "/v1/rounds/identify_masks", AUTH_CLOUD),
            "S2 to_consortium": (s2, "/v1/rounds/to_consortium", AUTH_CLOUD)}


ENDPOINTS = ["S1 classify", "S1 upload", "S2 smp", "S2 linear", "S1 new gallery", "S2 identify_masks",
             "S2 to_consortium"]


@settings(max_examples=24, **HYPOTHESIS)
@given(deep=deep_json(), endpoint=st.sampled_from(ENDPOINTS))
def test_a_deep_header_is_a_400_at_every_wire_endpoint(clouds, deep, endpoint):
    client, path, headers = wire_endpoints(clouds)[endpoint]
    body = wire(with_deep({"meta": {"a": DEEP_MARK}, "arrays": []}, deep))
    assert f"deeper than {MAX_DEPTH} levels" in error_of(client.post(path, data=body, headers=headers,
                                                                     content_type=WIRE), 400, "wire_format")


def test_the_clouds_serve_after_hostile_headers(clouds):
    s1, s2, model_id, _ = clouds
    healthy(s1)
    healthy(s2)
    assert s1.get(f"/v1/models/{model_id}").status_code == 200


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize("content_type", ["text/plain", "application/json", "multipart/form-data; boundary=x",
                                          "application/x-www-form-urlencoded"])
def test_a_body_of_another_type_is_a_415(clouds, endpoint, content_type):
    client, path, headers = wire_endpoints(clouds)[endpoint]
    message = error_of(client.post(path, data=b"HECN", headers={**headers, "Content-Type": content_type}), 415,
                       "unsupported_media_type")
    assert WIRE in message and content_type.split(";")[0] in message


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize("content_type", [WIRE, "Application/Octet-Stream; charset=binary", None])
def test_the_wire_type_reaches_the_decoder(clouds, endpoint, content_type):
    """The wire media type, with parameters or in capitals, or no Content-Type at all: the body is read."""
    client, path, headers = wire_endpoints(clouds)[endpoint]
    type_header = {} if content_type is None else {"Content-Type": content_type}
    error_of(client.post(path, data=b"HECN-not-a-message", headers={**headers, **type_header}), 400, "wire_format")


@pytest.mark.parametrize("cloud", ["s1", "s2"])
@pytest.mark.parametrize("method, path", [("GET", "/v1/nowhere"), ("POST", "/v2/models"), ("GET", "/"),
                                          ("POST", "/v1/models/0123456789abcdef/classify/again"),
                                          ("GET", "/v1/" + "x" * 5000)])
def test_an_unknown_route_is_a_404_that_names_it(clouds, cloud, method, path):
    client = clouds[0] if cloud == "s1" else clouds[1]
    message = error_of(client.open(path, method=method), 404, "not_found")
    assert repr(path)[:100] in message and "/v1/health" in message


def test_a_wrong_method_names_the_allowed_ones(clouds):
    response = clouds[1].get("/v1/rounds/smp")
    assert "POST" in error_of(response, 405, "method_not_allowed") and "POST" in response.headers["Allow"]


# -- on the command line ---------------------------------------------------------------------------

def run_cli(*args: str, env: dict[str, str] | None = None) -> str:
    """Run ``python -m he_cnn ARGS``, expecting exit status 1; its one ``Error:`` line."""
    done = subprocess.run([sys.executable, "-m", "he_cnn", *args], capture_output=True, text=True, timeout=120,
                          cwd=ROOT, env={**os.environ, "HECNN_RANDOMNESS_POOL": "0", **(env or {})})
    assert done.returncode == 1, (done.stdout[-2000:], done.stderr[-2000:])
    lines = [line for line in done.stderr.splitlines() if line.startswith("Error: ")]
    assert len(lines) == 1 and "Traceback" not in done.stderr + done.stdout, done.stderr[-2000:]
    return lines[0]


@pytest.mark.parametrize("content", ["[" * 50_000, '{"k":' * 5000, "[" + "0," * 100 + "0]"], ids=["deep", "deep object", "wide"])
def test_user_query_with_a_hostile_key_file_is_one_line(tmp_path, content):
    key = tmp_path / "me.key"
    key.write_text(content)
    os.chmod(key, 0o600)
    image = tmp_path / "image.npy"
    np.save(image, np.zeros((6, 6), dtype=np.uint8))
    line = run_cli("user", "query", "--s1", "http://127.0.0.1:9", "--model", "0123456789abcdef", "--key", str(key),
                   str(image))
    assert str(key) in line and ("deeper than" in line or "values" in line)


@pytest.mark.parametrize("content", ["[" * 100_000, '{"format": "he-cnn-integer-model", "layers": ' + "[" * 3000],
                         ids=["deep", "deep layers"])
def test_owner_upload_with_a_deep_model_file_is_one_line(clouds, tmp_path, content):
    model = tmp_path / "model.json"
    model.write_text(content)
    line = run_cli("owner", "upload", "--s1", clouds[3], "--model", str(model), "--quiet",
                   env={"HECNN_OWNER_TOKEN": OWNER_TOKEN})
    assert "model.json" in line and f"deeper than {MAX_DEPTH} levels" in line


def test_a_deep_s2_key_file_stops_the_start_in_one_line(tmp_path):
    """S2's key file is read through the bounded reader: a deeply nested one is a DataDirError."""
    from he_cnn.servers.s2 import KEY_FILE, load_or_create_key_cloud
    from he_cnn.servers.storage import DataDirError

    data = tmp_path / "s2"
    data.mkdir(mode=0o700)
    (data / KEY_FILE).write_text("[" * 100_000)
    with pytest.raises(DataDirError, match="S2 key file"):
        load_or_create_key_cloud(data, 1024)


@settings(max_examples=60, deadline=None)
@given(body=st.one_of(st.binary(max_size=200),
                      st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=5)),
                                   lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                           st.dictionaries(st.text(max_size=5), inner, max_size=3)),
                                   max_leaves=20).map(lambda v: json.dumps({"users": v}).encode()),
                      st.integers(40, 5000).map(lambda depth: b'{"users": ' + b"[" * depth)))
def test_a_hostile_user_file_is_one_clean_error(tmp_path_factory, body):
    """S1's users.json: whatever it holds, reading it gives users or a BadRequest, nothing else."""
    from he_cnn.errors import BadRequest
    from he_cnn.servers.users import USERS_FILE, UserStore

    folder = tmp_path_factory.mktemp("users")
    (folder / USERS_FILE).write_bytes(body)
    try:
        UserStore(folder).all()
    except BadRequest:
        pass


@pytest.mark.parametrize("path", ["/v1/models/0//classify", "/v1//models"])
def test_a_doubled_slash_is_an_unknown_route_not_a_redirect(path):
    """werkzeug would answer 308 to the path with the slashes merged (found by the hostile tier,
    drawing the model id "0/"): both clouds answer 404 JSON naming the path instead."""
    from he_cnn.servers.http import new_app

    app = new_app("probe", 1 << 20)
    app.add_url_rule("/v1/models/<model_id>/classify", "classify", lambda model_id: "", methods=["POST"])
    app.add_url_rule("/v1/health", "health", lambda: "")
    app.add_url_rule("/v1/models", "models", lambda: "")
    reply = app.test_client().post(path) if "classify" in path else app.test_client().get(path)
    assert reply.status_code == 404 and reply.is_json and path in reply.get_json()["message"]


# -- the files of identification and federation -------------------------------------------------------

def hostile_document(data, document: dict, truncate: bool = True) -> tuple[str, bytes]:
    """One hostile variant of a valid JSON document: raw bytes, a field replaced, a deep field, truncated."""
    kind = data.draw(st.sampled_from(["bytes", "field", "deep field"] + (["truncated"] if truncate else [])))
    if kind == "bytes":
        return kind, data.draw(HOSTILE_BYTES)
    if kind == "field":
        return kind, json.dumps(data.draw(replaced_node(document, st.one_of(JSON_VALUES, st.just(2 ** 9000))))).encode()
    if kind == "deep field":
        return kind, with_deep(data.draw(replaced_node(document, st.just(DEEP_MARK))), data.draw(deep_json()))
    text = json.dumps(document, indent=1).encode()
    return kind, text[:data.draw(st.integers(0, len(text) - 1))]


#: these files nest less deep than the default limit, and say their own
OWN_BOUND_REFUSED = "deeper than [0-9]+ levels|more than [0-9]+ values|more than the limit"
LABELS_DOCUMENT = {"gallery_id": "0123456789abcdef", "template_bits": 8, "template_shift": 3,
                   "labels": {"0": "alice", "1": "bob"}}


@settings(max_examples=100, **HYPOTHESIS)
@given(data=st.data())
def test_hostile_labels_files_are_bad_requests(scratch, data):
    from he_cnn.protocols.identify import read_labels_file
    kind, content = hostile_document(data, LABELS_DOCUMENT)
    path = scratch / "hostile.labels.json"
    path.write_bytes(content)
    try:
        book = read_labels_file(path)
    except BadRequest as e:
        assert "\n" not in str(e)
    else:
        assert isinstance(book["labels"], dict) and type(book["template_shift"]) is int
    if kind == "deep field":
        assert_depth_refused(lambda: read_labels_file(path), match=OWN_BOUND_REFUSED)


@pytest.fixture(scope="module")
def owner_document(scratch) -> dict:
    from he_cnn.crypto.paillier import generate_keypair
    from he_cnn.owner import federation_file as ff
    from he_cnn.training.federated import FederatedSettings
    base = ff.OwnerFile("http://127.0.0.1:8601", "0123456789abcdef", 0, "", "fedcba9876543210",
                        FederatedSettings(owners=2, rounds=2, local_epochs=1), (674, 673), "icnn", (1, 16, 16),
                        tuple(str(d) for d in range(10)), generate_keypair(1024))
    ff.prepare_folder(scratch / "federation", 2)
    path = ff.write_owner_files(scratch / "federation", base, ["t" * 32, "u" * 32])[0]
    ff.read_owner_file(path)  # the document is valid as written
    return json.loads(path.read_text())


@settings(max_examples=100, **HYPOTHESIS)
@given(data=st.data())
def test_hostile_federation_owner_files_are_bad_requests(scratch, owner_document, data):
    from he_cnn.owner.federation_file import read_owner_file
    kind, content = hostile_document(data, owner_document)
    path = scratch / "hostile-owner.json"
    path.write_bytes(content)
    try:
        read_owner_file(path)
    except BadRequest as e:
        assert "\n" not in str(e)
    if kind == "deep field":
        assert_depth_refused(lambda: read_owner_file(path), match=OWN_BOUND_REFUSED)


@settings(max_examples=60, **HYPOTHESIS)
@given(data=st.data())
def test_hostile_gallery_summaries_stop_s1_with_the_gallerys_name(tmp_path_factory, keys1024, data):
    """S1's stored gallery summary, corrupted: the store refuses to load with the directory's name
    (DataDirError), never another exception."""
    from he_cnn.servers.galleries import INFO_FILE as GALLERY_INFO, THRESHOLD_FILE, GalleryStore
    from he_cnn.crypto.tensor import EncryptedTensor
    root = tmp_path_factory.mktemp("gallery-store")
    folder = root / "galleries" / "0123456789abcdef"
    folder.mkdir(parents=True)
    (folder / THRESHOLD_FILE).write_bytes(EncryptedTensor.encrypt(keys1024.public, [1]).serialize())
    document = {"gallery_id": "0123456789abcdef", "key_id": keys1024.public.key_id, "model_id": "m" * 16,
                "created": "2026-01-01T00:00:00Z", "features": 6, "template_bits": 8, "embedding_bits": 12,
                "group_size": 5, "committed_chunks": 0}
    _, content = hostile_document(data, document)
    (folder / GALLERY_INFO).write_bytes(content)
    try:
        GalleryStore(root).load(keys1024.public)
    except DataDirError as e:
        assert "0123456789abcdef" in str(e) and "\n" not in str(e)


@pytest.fixture(scope="module")
def bare_s2(keys1024) -> KeyCloud:
    return KeyCloud.create(keys1024)


@settings(max_examples=60, **HYPOTHESIS)
@given(data=st.data())
def test_hostile_s2_gallery_files_stop_s2_with_the_files_name(tmp_path_factory, bare_s2, data):
    """S2's stored seeds, as hostile wire messages: refused with the file's name (DataDirError)."""
    from he_cnn.servers.galleries import S2_FORMAT, install_s2_galleries
    root = tmp_path_factory.mktemp("s2-galleries")
    (root / "galleries").mkdir(mode=0o700)
    meta = data.draw(replaced_node({"format": S2_FORMAT, "gallery_id": "g", "features": 6, "template_bits": 8,
                                    "counts": [3, 2]}, JSON_VALUES))
    msg = Message(meta=meta if isinstance(meta, dict) else {"x": meta})
    msg.arrays["seeds"] = np.array(data.draw(st.lists(st.integers(-2 ** 200, 2 ** 200), max_size=4)), dtype=object)
    path = root / "galleries" / "a.hecn"
    path.write_bytes(data.draw(st.one_of(st.just(encode(msg)), HOSTILE_BYTES)))
    try:
        install_s2_galleries(bare_s2, root)
    except DataDirError as e:
        assert "a.hecn" in str(e) and "\n" not in str(e)
