"""The clouds' settings as frozen dataclasses (filled from CLI flags or ``HECNN_S1_*`` / ``HECNN_S2_*``).

Tokens are excluded from ``repr`` so a config can be logged safely. S1's load limits must leave a
request thread free (``max_concurrent + max_queue < threads``): a waiting query holds a thread. ``validate`` raises
:class:`~he_cnn.errors.BadRequest` with what is wrong, which the CLI shows as one line.
A cloud serves HTTPS when given a :class:`ServerTLS` (``--tls-cert/--tls-key``); S2's ``client_ca``
makes it accept only clients whose certificate that CA signed (S1's, for mutual TLS on the S1-S2 link),
and S1's ``peer_ca`` / ``peer_cert`` / ``peer_key`` are its side of that link.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from he_cnn.ray_workers import head_address
from he_cnn.errors import BadRequest
from he_cnn.transport.http_channel import DEFAULT_TIMEOUT
from he_cnn.crypto.paillier import DEFAULT_KEY_BITS, MIN_KEY_BITS

MIB = 1 << 20
MIN_TOKEN_CHARS = 16
DEFAULT_S1_PORT = 8601
DEFAULT_S2_PORT = 8602
#: a 2048-bit encrypted digits ICNN is about 6 MiB; the limit leaves room for larger models
DEFAULT_S1_MAX_BODY = 64 * MIB
#: the largest protocol round (DGK bit ciphertexts of a whole ReLU layer) is tens of MiB
DEFAULT_S2_MAX_BODY = 256 * MIB
DEFAULT_THREADS = 8
#: comparison protocols S1 can run (``S1Context.comparison``): oblivious-transfer millionaires' or DGK/Veugen
COMPARISONS = ("ot", "dgk")
DEFAULT_COMPARISON = "ot"
#: queries S1 runs at once. Two, whatever the worker count: a query alternates between S1 and S2 (each
#: round waits for the other cloud), so a second query in flight keeps both clouds' workers busy while
#: the first waits; a third only splits the same workers (and the one GIL of S1's request threads) three
#: ways, which makes every query slower without raising throughput, and holds one more query's
#: ciphertexts and prepared masks in memory
DEFAULT_MAX_CONCURRENT = 2
#: queries that may wait for a place (first come, first served); any more get 429 with Retry-After.
#: Four waiting behind two running is two to three query times of waiting, and with the default 8
#: request threads leaves two threads for health checks, model lists and uploads
DEFAULT_MAX_QUEUE = 4
#: request threads a cloud keeps free of queries (health checks, uploads, the model list)
SPARE_THREADS = 1


def _check_files(role: str, files: dict[str, Path | str | None]) -> None:
    for name, path in files.items():
        if path is not None and not Path(path).is_file():
            raise BadRequest(f"{role}: the {name} {path} is not a readable file")


@dataclass(frozen=True)
class ServerTLS:
    """A cloud's TLS settings: its certificate chain and private key (PEM), and optionally the CA (a
    bundle, or the client's self-signed certificate) that a client's certificate must chain to; with
    ``client_ca`` a client without such a certificate is refused during the handshake."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    def validate(self, role: str) -> None:
        _check_files(role, {"TLS certificate": self.cert, "TLS key": self.key, "TLS client CA": self.client_ca})


def server_tls(role: str, cert: Path | None, key: Path | None, client_ca: Path | None = None) -> ServerTLS | None:
    """The flags ``--tls-cert/--tls-key[/--tls-client-ca]`` as settings: None for plain HTTP."""
    if cert is None and key is None:
        if client_ca is not None:
            raise BadRequest(f"{role}: a TLS client CA needs TLS itself: pass --tls-cert and --tls-key too")
        return None
    if cert is None or key is None:
        raise BadRequest(f"{role}: TLS needs both a certificate and its key (--tls-cert and --tls-key)")
    return ServerTLS(Path(cert), Path(key), Path(client_ca) if client_ca is not None else None)


def _check_ray_address(role: str, address: str | None) -> None:
    if address is not None:
        try:
            head_address(address)
        except BadRequest as e:
            raise BadRequest(f"{role}: {e}") from e


def _check_common(role: str, host: str, port: int, max_body_bytes: int, threads: int, workers: int,
                  tokens: dict[str, str], tls: ServerTLS | None = None) -> None:
    if tls is not None:
        tls.validate(role)
    if not host:
        raise BadRequest(f"{role}: host must not be empty")
    if not 0 <= port <= 65535:
        raise BadRequest(f"{role}: port must be in 0..65535, got {port}")
    if max_body_bytes < 1024:
        raise BadRequest(f"{role}: max body bytes must be at least 1024, got {max_body_bytes}")
    if threads < 1 or workers < 1:
        raise BadRequest(f"{role}: threads and workers must be at least 1, got {threads} and {workers}")
    for name, token in tokens.items():
        if len(token) < MIN_TOKEN_CHARS:
            raise BadRequest(f"{role}: the {name} must have at least {MIN_TOKEN_CHARS} characters "
                             f"(got {len(token)}); generate one with: python -c 'import secrets; print(secrets.token_urlsafe())'")


@dataclass(frozen=True)
class S2Config:
    """Settings of the key cloud."""

    data_dir: Path
    cloud_token: str = field(repr=False)
    host: str = "127.0.0.1"
    port: int = DEFAULT_S2_PORT
    key_bits: int = DEFAULT_KEY_BITS
    max_body_bytes: int = DEFAULT_S2_MAX_BODY
    threads: int = DEFAULT_THREADS
    #: processes for the heavy loops of each protocol round (1 = inline, in the request thread)
    workers: int = 1
    #: HTTPS (None: plain HTTP); with ``tls.client_ca``, mutual TLS: only S1's certificate gets in
    tls: ServerTLS | None = None
    #: run the heavy loops on this Ray cluster of S2's own ("auto" or HOST:PORT) instead of ``workers`` processes
    ray_address: str | None = None

    def validate(self) -> "S2Config":
        _check_common("S2", self.host, self.port, self.max_body_bytes, self.threads, self.workers,
                      {"cloud token": self.cloud_token}, self.tls)
        _check_ray_address("S2", self.ray_address)
        if self.key_bits < MIN_KEY_BITS:
            raise BadRequest(f"S2: key size {self.key_bits} bits is too small: expected at least {MIN_KEY_BITS}")
        return self


@dataclass(frozen=True)
class S1Config:
    """Settings of the compute cloud."""

    data_dir: Path
    peer_url: str
    owner_token: str = field(repr=False)
    cloud_token: str = field(repr=False)
    host: str = "127.0.0.1"
    port: int = DEFAULT_S1_PORT
    max_body_bytes: int = DEFAULT_S1_MAX_BODY
    threads: int = DEFAULT_THREADS
    peer_timeout: float = DEFAULT_TIMEOUT
    #: processes for the heavy loops of each protocol round (1 = inline, in the request thread)
    workers: int = 1
    #: prepare each model's next query (its query-independent part) in the background
    precompute: bool = True
    #: comparison protocol of every query (``S1Context.comparison``): "ot" or "dgk"
    comparison: str = DEFAULT_COMPARISON
    #: queries run at once, and queries that may wait for a place (beyond both: 429 with Retry-After)
    max_concurrent: int = DEFAULT_MAX_CONCURRENT
    max_queue: int = DEFAULT_MAX_QUEUE
    #: classify only with a user API key (``he-cnn admin user add``); False is the open service
    #: (``he-cnn serve s1 --open``), which a program must ask for here too
    require_user_keys: bool = True
    #: HTTPS for S1's clients (None: plain HTTP)
    tls: ServerTLS | None = None
    #: run the heavy loops on this Ray cluster of S1's own ("auto" or HOST:PORT) instead of ``workers`` processes
    ray_address: str | None = None
    #: S1's side of the TLS link to S2: the CA S2's certificate must chain to (None: the system's), and
    #: the client certificate and key S1 presents to S2 (mutual TLS)
    peer_ca: Path | None = None
    peer_cert: Path | None = None
    peer_key: Path | None = None

    @property
    def peer_client_cert(self) -> tuple[str, str] | None:
        """``(certificate, key)`` for requests' ``cert``, or None without mutual TLS."""
        return (str(self.peer_cert), str(self.peer_key)) if self.peer_cert is not None else None

    def validate(self) -> "S1Config":
        _check_common("S1", self.host, self.port, self.max_body_bytes, self.threads, self.workers,
                      {"owner token": self.owner_token, "cloud token": self.cloud_token}, self.tls)
        _check_ray_address("S1", self.ray_address)
        if not self.peer_url.startswith(("http://", "https://")):
            raise BadRequest(f"S1: peer URL must start with http:// or https://, got {self.peer_url!r}")
        if (self.peer_cert is None) != (self.peer_key is None):
            raise BadRequest("S1: a client certificate for S2 needs both --peer-cert and --peer-key")
        if (self.peer_cert is not None or self.peer_ca is not None) and not self.peer_url.startswith("https://"):
            raise BadRequest(f"S1: --peer-ca/--peer-cert need an https:// peer URL, got {self.peer_url!r}")
        _check_files("S1", {"peer CA": self.peer_ca, "peer certificate": self.peer_cert, "peer key": self.peer_key})
        if self.peer_timeout <= 0:
            raise BadRequest(f"S1: peer timeout must be positive, got {self.peer_timeout}")
        if self.owner_token == self.cloud_token:
            raise BadRequest("S1: the owner token and the cloud token must differ")
        if self.comparison not in COMPARISONS:
            raise BadRequest(f"S1: comparison must be one of {', '.join(COMPARISONS)}, got {self.comparison!r}")
        if self.max_concurrent < 1 or self.max_queue < 0:
            raise BadRequest(f"S1: max concurrent queries must be at least 1 and the queue at least 0, got "
                             f"{self.max_concurrent} and {self.max_queue}")
        if self.max_concurrent + self.max_queue + SPARE_THREADS > self.threads:
            # a waiting query holds a request thread: with no thread left, further requests would wait in
            # the WSGI server's own queue, unbounded and unanswered, health checks included
            raise BadRequest(f"S1: {self.max_concurrent} running + {self.max_queue} waiting queries need at "
                             f"least {self.max_concurrent + self.max_queue + SPARE_THREADS} request threads "
                             f"(one left for health checks and uploads), got {self.threads}; raise --threads "
                             "or lower --max-concurrent / --max-queue")
        return self
