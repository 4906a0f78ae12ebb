"""Serving a cloud with waitress, or cheroot for HTTPS (production WSGI servers), and the ``he-cnn serve s1|s2`` commands.

Settings come from flags or from ``HECNN_S1_*`` / ``HECNN_S2_*`` environment variables (prefer the
variables for tokens: command lines are visible to other users in ``ps``). The settings and the port
are checked before the cloud touches its data directory (a busy port is one line, exit status 1, and
leaves nothing behind). When the socket is bound, one line ``S1 listening on http://host:port`` goes to
stderr (with the real port when ``--port 0`` asked for a free one), so scripts can wait for it. SIGTERM
and Ctrl-C stop the server cleanly.

``he-cnn serve s1`` also takes ``--comparison {ot,dgk}`` (the comparison protocol of every query; "ot"
by default) and the load limits ``--max-concurrent`` (queries at once, default 2) and ``--max-queue``
(queries waiting, default 4; beyond both, 429 with ``Retry-After``; see :class:`servers.http.QueryGate`).
Classify needs a user API key (``he-cnn admin user add``, :mod:`servers.users`) unless ``--open``.

TLS: with ``--tls-cert/--tls-key`` a cloud serves HTTPS (``... listening on https://...``). waitress has
no TLS, so then the same Flask app runs under cheroot instead: CherryPy's WSGI server, pure Python, TLS
through the standard library's ``ssl`` module (``BuiltinSSLAdapter``), with the same thread count, body
limit and SIGTERM handling. Without the flags waitress serves plain HTTP exactly as before. S2's
``--tls-client-ca`` requires every client to present a certificate that CA signed (mutual TLS: S1's),
refused in the handshake otherwise; S1's ``--peer-ca`` checks S2's certificate and ``--peer-cert/--peer-key``
is the certificate S1 shows S2. The cloud token stays required on the rounds, a second factor.
"""
from __future__ import annotations

import logging
import signal
import socket
import ssl
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Callable

import click
from cheroot.ssl.builtin import BuiltinSSLAdapter
from cheroot.wsgi import Server as CherootServer
from flask import Flask
from waitress.adjustments import Adjustments
from waitress.server import create_server

from he_cnn.errors import HECNNError
from he_cnn.transport.http_channel import DEFAULT_TIMEOUT
from he_cnn.crypto.paillier import DEFAULT_KEY_BITS
from he_cnn.parallel import default_worker_count

from .config import (COMPARISONS, DEFAULT_COMPARISON, DEFAULT_MAX_CONCURRENT, DEFAULT_MAX_QUEUE, DEFAULT_S1_MAX_BODY,
                     DEFAULT_S1_PORT, DEFAULT_S2_MAX_BODY, DEFAULT_S2_PORT, DEFAULT_THREADS, S1Config, S2Config,
                     ServerTLS, server_tls)
from .http import shutdown_app


#: a protocol round carries up to a few MB each way. waitress's defaults (8 KB socket reads and writes,
#: bodies above 512 KB and replies above 1 MB spooled to temporary files) made a localhost round of a
#: 5 MB request and a 2.5 MB reply take 25-29 ms; with these, 11-12 ms. waitress buffers a body per
#: *connection* before the app (and its token check) sees it, so the connections are capped too: at most
#: 32 x 8 MB in memory; larger bodies spool to a temporary file. waitress itself refuses (plain-text 413)
#: bodies above 4x the app's limit; up to that the app answers, with its JSON 413.
WAITRESS_BUFFERS = {"recv_bytes": 1 << 18, "send_bytes": 1 << 18, "inbuf_overflow": 8 << 20,
                    "outbuf_overflow": 8 << 20, "connection_limit": 32}


#: seconds cheroot's worker threads get to finish their requests on SIGTERM (waitress does not wait)
TLS_STOP_GRACE = 5.0


def _max_body(app: Flask) -> int:
    """The server's own body limit: 4x the app's (the app answers up to that, with its JSON 413)."""
    return max(4 * app.config["MAX_CONTENT_LENGTH"], 1 << 20)


def tls_adapter(tls: ServerTLS) -> BuiltinSSLAdapter:
    """cheroot's TLS adapter for ``tls`` (reads the files now: ssl.SSLError or OSError if they are bad)."""
    adapter = BuiltinSSLAdapter(str(tls.cert), str(tls.key))
    adapter.context.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.client_ca is not None:
        adapter.context.verify_mode = ssl.CERT_REQUIRED
        adapter.context.load_verify_locations(str(tls.client_ca))
    return adapter


def _serve_plain(app: Flask, role: str, host: str, port: int, threads: int) -> tuple[tuple[str, int], Callable[[], None], Callable[[], None]]:
    """waitress, bound: (address, run, close)."""
    server = create_server(app, host=host, port=port, threads=threads, ident=f"he-cnn {role}",
                           clear_untrusted_proxy_headers=True, **WAITRESS_BUFFERS, max_request_body_size=_max_body(app))
    return server.socket.getsockname()[:2], server.run, server.close  # type: ignore[union-attr]


def _serve_tls(app: Flask, role: str, host: str, port: int, threads: int,
               adapter: BuiltinSSLAdapter) -> tuple[tuple[str, int], Callable[[], None], Callable[[], None]]:
    """cheroot with TLS, bound: (address, run, close)."""
    server = CherootServer((host, port), app, numthreads=threads, max=threads, server_name=f"he-cnn {role}",
                    shutdown_timeout=TLS_STOP_GRACE)
    server.ssl_adapter = adapter
    server.max_request_body_size = _max_body(app)
    # threads inherit daemon status from the thread that starts them: workers started from a daemon
    # thread, like waitress's, do not hold the process after SIGTERM while a long query is in flight
    failed: list[BaseException] = []

    def prepare() -> None:
        try:
            server.prepare()  # binds, listens, starts the workers
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            failed.append(e)

    starter = threading.Thread(target=prepare, name=f"{role}-start", daemon=True)
    starter.start()
    starter.join()
    if failed:
        raise failed[0]

    def close() -> None:
        stopper = threading.Thread(target=server.stop, name=f"{role}-stop", daemon=True)
        stopper.start()
        stopper.join(TLS_STOP_GRACE + 1)

    return server.socket.getsockname()[:2], server.serve, close


def run_server(app: Flask, role: str, host: str, port: int, threads: int,
               tls: ServerTLS | BuiltinSSLAdapter | None = None) -> None:
    """Serve ``app`` until SIGTERM/SIGINT; announce the bound address on stderr. With ``tls`` (settings, or
    an adapter made from them by :func:`tls_adapter`), HTTPS under cheroot; else plain HTTP under waitress."""
    if tls is None:
        (bound_host, bound_port), run, close = _serve_plain(app, role, host, port, threads)
    else:
        adapter = tls_adapter(tls) if isinstance(tls, ServerTLS) else tls
        (bound_host, bound_port), run, close = _serve_tls(app, role, host, port, threads, adapter)
    shown = f"[{bound_host}]" if ":" in str(bound_host) else bound_host

    def stop(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    click.echo(f"{role} listening on {'https' if tls is not None else 'http'}://{shown}:{bound_port}", err=True)
    sys.stderr.flush()
    try:
        run()
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        close()
        shutdown_app(app)
        click.echo(f"{role} stopped", err=True)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # waitress logs one warning per queued request under load; keep those
    logging.getLogger("waitress").setLevel(logging.WARNING)


PEM_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)


def _cloud_options(role: str, port: int, max_body: int) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """The flags both clouds share, with this cloud's environment variable names (HECNN_S1_* or HECNN_S2_*)."""
    env = f"HECNN_{role}_"
    options = [
        click.option("--host", envvar=env + "HOST", default="127.0.0.1", show_default=True,
                     help="Interface to bind (0.0.0.0 for all; then serve HTTPS with --tls-cert/--tls-key)."),
        click.option("--port", envvar=env + "PORT", type=click.IntRange(0, 65535), default=port, show_default=True,
                     help="TCP port (0 picks a free one and prints it)."),
        click.option("--data-dir", envvar=env + "DATA_DIR", type=click.Path(file_okay=False, path_type=Path),
                     default=Path("data") / role.lower(), show_default=True, help="Where this cloud keeps its state."),
        click.option("--cloud-token", envvar=env + "CLOUD_TOKEN", required=True, show_envvar=True,
                     help="Shared secret of S1 and S2 for the protocol rounds (prefer the env var)."),
        click.option("--max-body-bytes", envvar=env + "MAX_BODY_BYTES", type=click.IntRange(1024), default=max_body,
                     show_default=True, help="Largest request body accepted (413 above)."),
        click.option("--threads", envvar=env + "THREADS", type=click.IntRange(1, 256), default=DEFAULT_THREADS,
                     show_default=True, help="Request threads (concurrent requests)."),
        click.option("--workers", envvar=env + "WORKERS", type=click.IntRange(1, 256), default=default_worker_count(),
                     show_default="all cores", help="Processes for the heavy loops of each protocol round."),
        click.option("--ray-address", envvar=env + "RAY_ADDRESS", default=None,
                     help=f"Run the heavy loops on a Ray cluster of {role}'s own ('auto' or HEAD:PORT; "
                          "needs he-cnn[ray]) instead of --workers processes."),
        click.option("--verbose/--quiet", default=True, show_default=True, help="Log start-up, set-ups and errors."),
        click.option("--tls-cert", envvar=env + "TLS_CERT", type=PEM_FILE, default=None,
                     help="Serve HTTPS with this certificate (PEM, chain allowed); needs --tls-key."),
        click.option("--tls-key", envvar=env + "TLS_KEY", type=PEM_FILE, default=None,
                     help="The private key of --tls-cert (PEM, unencrypted)."),
    ]

    def decorate(f: Callable[..., None]) -> Callable[..., None]:
        for option in reversed(options):
            f = option(f)
        return f

    return decorate


def check_port(host: str, port: int) -> None:
    """Bind every address ``host:port`` stands for, as waitress will, and let go: OSError if the port is
    taken or the address is not this machine's.

    A probe, not the server's own socket: while it builds, a cloud forks its worker processes, which
    would inherit a socket bound before (and keep the port after a crashed cloud). The port may still
    be taken between the probe and waitress's bind; :func:`_start` reports that the same way.
    """
    try:
        addresses = Adjustments(host=host, port=port).listen
    except ValueError as e:  # waitress's word for a host name that does not resolve
        raise OSError(f"cannot resolve {host!r}") from e
    for family, kind, proto, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as waitress: a TIME_WAIT port is free
            probe.bind(address)


def _start(role: str, build: Callable[[], Flask], config: S1Config | S2Config) -> None:
    """Check the settings, the TLS files and the port (nothing on disk yet), then build the app and serve it."""
    def cannot_listen(e: OSError) -> click.ClickException:
        return click.ClickException(f"{role} cannot listen on {config.host}:{config.port}: {e.strerror or e}")

    adapter = None
    try:
        config.validate()
        if config.tls is not None:
            adapter = tls_adapter(config.tls)
        check_port(config.host, config.port)
    except HECNNError as e:
        raise click.ClickException(f"{role} cannot start: {e}") from e
    except ssl.SSLError as e:  # before OSError: its subclass
        raise click.ClickException(f"{role} cannot start: the TLS certificate, key or client CA is not usable "
                                   f"(expected PEM files, the key unencrypted and matching the certificate): "
                                   f"{e.reason or e}") from e
    except OSError as e:
        raise cannot_listen(e) from e
    try:
        app = build()
    except HECNNError as e:
        raise click.ClickException(f"{role} cannot start: {e}") from e
    except OSError as e:
        raise click.ClickException(f"{role} cannot start: {e.strerror or e}: {e.filename or ''}") from e
    try:
        run_server(app, role, config.host, config.port, config.threads, adapter)
    except OSError as e:  # the port was taken after the check
        raise cannot_listen(e) from e


def _tls_settings(role: str, cert: Path | None, key: Path | None, client_ca: Path | None = None) -> ServerTLS | None:
    try:
        return server_tls(role, cert, key, client_ca)
    except HECNNError as e:
        raise click.ClickException(f"{role} cannot start: {e}") from e


@click.group("serve")
def serve() -> None:
    """Run one of the two clouds (S1 compute, S2 key cloud) with the waitress WSGI server (cheroot for HTTPS)."""


@serve.command("s2")
@_cloud_options("S2", DEFAULT_S2_PORT, DEFAULT_S2_MAX_BODY)
@click.option("--key-bits", envvar="HECNN_S2_KEY_BITS", type=click.IntRange(1024), default=DEFAULT_KEY_BITS,
              show_default=True, help="Size of the cloud Paillier key, generated on first start only.")
@click.option("--tls-client-ca", envvar="HECNN_S2_TLS_CLIENT_CA", type=PEM_FILE, default=None,
              help="Mutual TLS: accept only clients (S1) whose certificate this CA, or this self-signed "
                   "certificate, signed; needs --tls-cert/--tls-key.")
@click.pass_obj
def serve_s2(build_app: Callable[[S2Config], Flask] | None, host: str, port: int, data_dir: Path, cloud_token: str,
             max_body_bytes: int, threads: int, workers: int, ray_address: str | None, verbose: bool,
             tls_cert: Path | None, tls_key: Path | None, key_bits: int, tls_client_ca: Path | None) -> None:
    """Start S2, the key cloud: holds the cloud key pair, answers S1's protocol rounds."""
    # build_app is the click context's obj: None from the he-cnn command; a program that runs
    # serve.main(..., obj=f) gets S2 built by f(config), e.g. create_app around a wrapped key cloud
    from .s2 import create_app

    _setup_logging(verbose)
    tls = _tls_settings("S2", tls_cert, tls_key, tls_client_ca)
    config = S2Config(data_dir=data_dir, cloud_token=cloud_token, host=host, port=port, key_bits=key_bits,
                      max_body_bytes=max_body_bytes, threads=threads, workers=workers, tls=tls,
                      ray_address=ray_address)
    _start("S2", lambda: (build_app or create_app)(config), config)


@serve.command("s1")
@_cloud_options("S1", DEFAULT_S1_PORT, DEFAULT_S1_MAX_BODY)
@click.option("--peer-url", envvar="HECNN_S1_PEER_URL", default=f"http://127.0.0.1:{DEFAULT_S2_PORT}",
              show_default=True, help="Base URL of S2.")
@click.option("--owner-token", envvar="HECNN_S1_OWNER_TOKEN", required=True, show_envvar=True,
              help="Secret the data owner presents to upload models (prefer the env var).")
@click.option("--peer-timeout", envvar="HECNN_S1_PEER_TIMEOUT", type=click.FloatRange(min=0.1),
              default=DEFAULT_TIMEOUT, show_default=True, help="Seconds to wait for one protocol round at S2.")
@click.option("--precompute/--no-precompute", envvar="HECNN_S1_PRECOMPUTE", default=True, show_default=True,
              help="Prepare each model's next query (the image-independent work) in the background.")
@click.option("--comparison", envvar="HECNN_S1_COMPARISON", type=click.Choice(COMPARISONS), default=DEFAULT_COMPARISON,
              show_default=True, help="Comparison protocol of ReLU and max-pooling: oblivious-transfer millionaires' "
                                      "(ot) or DGK/Veugen (dgk, public-key work per compared bit).")
@click.option("--max-concurrent", envvar="HECNN_S1_MAX_CONCURRENT", type=click.IntRange(1, 256),
              default=DEFAULT_MAX_CONCURRENT, show_default=True,
              help="Queries classified at once (two keep both clouds busy: each query alternates between them).")
@click.option("--max-queue", envvar="HECNN_S1_MAX_QUEUE", type=click.IntRange(0, 256), default=DEFAULT_MAX_QUEUE,
              show_default=True, help="Queries that may wait for a place, first come first served; any more get "
                                      "429 with Retry-After. Running + waiting must stay below --threads.")
@click.option("--open", "open_service", envvar="HECNN_S1_OPEN", is_flag=True,
              help="Open service: anyone may classify, without a user API key (by default every query needs "
                   "a key issued with: he-cnn admin user add).")
@click.option("--peer-ca", envvar="HECNN_S1_PEER_CA", type=PEM_FILE, default=None,
              help="Check S2's certificate against this CA (or S2's self-signed certificate) [default: the system's CAs].")
@click.option("--peer-cert", envvar="HECNN_S1_PEER_CERT", type=PEM_FILE, default=None,
              help="Mutual TLS: the client certificate S1 presents to S2 (S2's --tls-client-ca must accept it).")
@click.option("--peer-key", envvar="HECNN_S1_PEER_KEY", type=PEM_FILE, default=None,
              help="The private key of --peer-cert (PEM, unencrypted).")
def serve_s1(host: str, port: int, data_dir: Path, cloud_token: str, max_body_bytes: int, threads: int,
             workers: int, ray_address: str | None, verbose: bool, tls_cert: Path | None, tls_key: Path | None,
             peer_url: str,
             owner_token: str, peer_timeout: float, precompute: bool, comparison: str, max_concurrent: int,
             max_queue: int, open_service: bool, peer_ca: Path | None, peer_cert: Path | None,
             peer_key: Path | None) -> None:
    """Start S1, the compute cloud: stores encrypted models, classifies encrypted images with S2."""
    from .s1 import create_app

    _setup_logging(verbose)
    config = S1Config(data_dir=data_dir, peer_url=peer_url, owner_token=owner_token, cloud_token=cloud_token,
                      host=host, port=port, max_body_bytes=max_body_bytes, threads=threads, peer_timeout=peer_timeout,
                      workers=workers, precompute=precompute, comparison=comparison,
                      max_concurrent=max_concurrent, max_queue=max_queue, require_user_keys=not open_service,
                      tls=_tls_settings("S1", tls_cert, tls_key), peer_ca=peer_ca, peer_cert=peer_cert,
                      peer_key=peer_key, ray_address=ray_address)
    _start("S1", lambda: create_app(config), config)
