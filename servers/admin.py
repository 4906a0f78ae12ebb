"""``he-cnn admin user add|list|revoke``: the operator issues and revokes S1's user API keys.

Either on S1's data directory (``--data-dir``, as ``he-cnn serve s1``; a running S1 re-reads the user
file before each query, so a revocation holds at once) or, with ``--s1 URL``, through S1's owner-token
endpoints (``HECNN_OWNER_TOKEN``). A new key is printed once, on stdout; S1 keeps only its hash.
Each command prints one line per result; a failure is one line on stderr and exit status 1.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import click

from he_cnn.console import run_step
from he_cnn.transport.http_channel import http_request

from .users import DEFAULT_CONCURRENT, DEFAULT_RATE_PER_MINUTE, MAX_CONCURRENT, UserStore

ADMIN_TIMEOUT = 10.0


def _rate(value: str | int) -> int:
    """``30``, ``30/min`` -> 30."""
    text = str(value).strip().lower().removesuffix("/min")
    if not text.isdigit() or int(text) < 1:
        raise click.BadParameter(f"expected queries per minute as N or N/min, got {value!r}")
    return int(text)


def _where(f: Callable[..., None]) -> Callable[..., None]:
    f = click.option("--tls-ca", envvar="HECNN_TLS_CA", show_envvar=True, type=click.Path(exists=True, dir_okay=False),
                     default=None, help="With an https:// --s1: the CA (or self-signed certificate) S1's certificate "
                                        "must chain to [default: the system's CAs].")(f)
    f = click.option("--token", envvar="HECNN_OWNER_TOKEN", show_envvar=True, default=None,
                     help="The owner token, with --s1 (prefer the env var).")(f)
    f = click.option("--s1", "s1_url", default=None, help="S1's base URL: go through its owner-token endpoints.")(f)
    return click.option("--data-dir", envvar="HECNN_S1_DATA_DIR", type=click.Path(file_okay=False, path_type=Path),
                        default=Path("data") / "s1", show_default=True,
                        help="S1's data directory (without --s1).")(f)


def _remote(method: str, s1_url: str, token: str | None, path: str, body: dict[str, Any] | None = None,
            tls_ca: str | None = None) -> Any:
    if not token:
        raise click.ClickException("--s1 needs the owner token: set HECNN_OWNER_TOKEN or pass --token")
    data = json.dumps(body).encode() if body is not None else None
    return run_step(lambda: http_request(method, f"{s1_url.rstrip('/')}/v1/users{path}", "S1", ADMIN_TIMEOUT,
                                         token=token, data=data, content_type="application/json",
                                         tls_ca=tls_ca).json())


def _store(data_dir: Path) -> UserStore:
    if not data_dir.is_dir():
        raise click.ClickException(f"no S1 data directory at {data_dir} (start S1 once, or pass --data-dir)")
    return UserStore(data_dir)


def _line(user: dict[str, Any]) -> str:
    return f"{user['name']}: {user['rate_per_minute']}/min, {user['concurrent']} at once, since {user['created']}"


@click.group("admin")
def admin() -> None:
    """The operator of S1: user API keys."""


@admin.group("user")
def user() -> None:
    """Issue, list and revoke user API keys."""


@user.command("add")
@click.argument("name")
@click.option("--rate", default=str(DEFAULT_RATE_PER_MINUTE), show_default=True,
              help="Queries per minute (N or N/min; bursts up to a minute's worth).")
@click.option("--concurrent", type=click.IntRange(1, MAX_CONCURRENT), default=DEFAULT_CONCURRENT, show_default=True,
              help="Queries the key may run at once.")
@_where
def add(name: str, rate: str, concurrent: int, data_dir: Path, s1_url: str | None, token: str | None,
        tls_ca: str | None) -> None:
    """Issue a key to NAME; the key is printed this once (S1 stores only its hash)."""
    per_minute = _rate(rate)
    if s1_url:
        info = _remote("POST", s1_url, token, "", {"name": name, "rate_per_minute": per_minute, "concurrent": concurrent},
                       tls_ca)
        key = info.get("key")
    else:
        user_, key = run_step(lambda: _store(data_dir).add(name, per_minute, concurrent))
        info = user_.public()
    click.echo(f"{_line(info)}; key (shown once): {key}")


@user.command("list")
@_where
def list_(data_dir: Path, s1_url: str | None, token: str | None, tls_ca: str | None) -> None:
    """The users and their limits, one per line (never their keys)."""
    users = (_remote("GET", s1_url, token, "", tls_ca=tls_ca).get("users", []) if s1_url
             else [u.public() for u in run_step(lambda: _store(data_dir).all())])
    for info in users:
        click.echo(_line(info))
    if not users:
        click.echo("no users", err=True)


@user.command("revoke")
@click.argument("name")
@_where
def revoke(name: str, data_dir: Path, s1_url: str | None, token: str | None, tls_ca: str | None) -> None:
    """Revoke NAME's key; S1 refuses it from its next request on."""
    if s1_url:
        _remote("DELETE", s1_url, token, f"/{name}", tls_ca=tls_ca)
    else:
        run_step(lambda: _store(data_dir).revoke(name))
    click.echo(f"{name}: key revoked")
