"""The ``he-cnn`` command line: every command has help, expected failures are one line and exit 1."""
from __future__ import annotations

import json
import stat

import pytest
from click.testing import CliRunner

from he_cnn.servers.cli import main
from he_cnn.user.keys import load_user_key, public_path

COMMANDS = [[], ["serve"], ["serve", "s1"], ["serve", "s2"], ["owner"], ["owner", "train"], ["owner", "upload"],
            ["user"], ["user", "keygen"], ["user", "query"], ["demo"]]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "he-cnn")
def test_every_command_has_help(command):
    result = CliRunner().invoke(main, [*command, "--help"])
    assert result.exit_code == 0 and result.output.startswith("Usage: ")


def run(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(main, list(args), env=env)


def one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_keygen_writes_a_private_key_and_refuses_to_clobber_it(tmp_path):
    key = tmp_path / "me.key"
    assert run("user", "keygen", "--out", str(key), "--bits", "1024").exit_code == 0
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert json.loads(public_path(key).read_text())["n"] == load_user_key(key).public.n
    assert "p" not in json.loads(public_path(key).read_text())
    one_line_error(run("user", "keygen", "--out", str(key), "--bits", "1024"), "already exists", "--force")


def test_query_errors_are_one_line(tmp_path):
    key = tmp_path / "me.key"
    run("user", "keygen", "--out", str(key), "--bits", "1024")
    image = tmp_path / "x.npy"
    image.write_bytes(b"not numpy")
    one_line_error(run("user", "query", "--s1", "http://127.0.0.1:9", "--model", "0" * 16, "--key", str(key),
                       str(image)), "S1 at http://127.0.0.1:9 is unreachable")
    one_line_error(run("user", "query", "--model", "0" * 16, "--key", str(public_path(key)), str(image)),
                   "public part")
    one_line_error(run("user", "query", "--model", "0" * 16, "--key", str(tmp_path / "none.key"), str(image)),
                   "does not exist", "keygen")


def test_owner_errors_are_one_line(tmp_path):
    model = tmp_path / "model.json"
    model.write_text("{}")
    one_line_error(run("owner", "upload", "--model", str(model), "--token", "t" * 20), "invalid")
    not_a_folder = tmp_path / "empty"
    not_a_folder.mkdir()
    one_line_error(run("owner", "train", "--images", str(not_a_folder), "--save-model", str(tmp_path / "m.json")),
                   "sub-folder per class")


def test_serve_refuses_bad_settings(tmp_path):
    one_line_error(run("serve", "s2", "--data-dir", str(tmp_path), "--cloud-token", "short"), "at least 16")
    (tmp_path / "keys.json").write_text("{broken")
    one_line_error(run("serve", "s2", "--data-dir", str(tmp_path), "--cloud-token", "c" * 20), "S2 key file",
                   "not JSON")
    one_line_error(run("serve", "s1", "--data-dir", str(tmp_path / "s1"), "--cloud-token", "c" * 20,
                       "--owner-token", "c" * 20), "must differ")
