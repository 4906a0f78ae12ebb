"""S1's users: the API keys the operator issues, stored hashed, and each key's query limits.

A key is ``hecnn_`` + 32 random bytes (URL-safe base64); S1 keeps only its SHA-256 in ``users.json`` in
its data directory (written atomically, read through :mod:`he_cnn.bounded_json`), so a copy of the data
directory cannot query. The store re-reads the file whenever it changed on disk (size, mtime or inode:
an atomic write always makes a new inode), so ``he-cnn admin user revoke`` on the data directory takes
effect at the next request of a running S1, as the owner-token endpoint does. Read-modify-write of the
file holds an exclusive lock on ``users.lock``, so the CLI and a running S1 never lose each other's
changes. :class:`KeyQuotas` enforces per key a token bucket (queries per minute, bursts up to a
minute's worth) and a limit of queries at once; beyond either, :class:`~he_cnn.errors.ServiceBusy`
(429 with ``Retry-After``).
"""
from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import math
import os
import re
import secrets
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from he_cnn.bounded_json import JSONLimits, read_json_file
from he_cnn.errors import BadRequest, ServiceBusy
from he_cnn.files import atomic_write

USERS_FILE = "users.json"
LOCK_FILE = "users.lock"
KEY_PREFIX = "hecnn_"
#: 10,000 users of ~200 bytes each; the file holds one object of user objects of five fields
MAX_USERS = 10_000
USERS_LIMITS = JSONLimits(max_bytes=4 << 20, max_items=8 * MAX_USERS, max_depth=4)
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
DEFAULT_RATE_PER_MINUTE = 30
DEFAULT_CONCURRENT = 1
MAX_RATE_PER_MINUTE = 100_000
MAX_CONCURRENT = 256


class UnknownUser(BadRequest):
    """No user of this name holds a key."""

    code = "unknown_user"
    status = 404


@dataclass(frozen=True)
class User:
    """One issued key: its holder's name, the key's SHA-256 (hex), and its limits."""

    name: str
    key_sha256: str
    rate_per_minute: int
    concurrent: int
    created: float

    def public(self) -> dict[str, Any]:
        """What the operator may see: everything but the key's hash."""
        return {"name": self.name, "rate_per_minute": self.rate_per_minute, "concurrent": self.concurrent,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.created))}


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def check_limits(name: str, rate_per_minute: int, concurrent: int) -> None:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise BadRequest("a user name is 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
    for what, value, top in (("rate", rate_per_minute, MAX_RATE_PER_MINUTE), ("concurrent", concurrent, MAX_CONCURRENT)):
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= top:
            raise BadRequest(f"{what} must be an integer in 1..{top}, got {value!r}")


def _user(name: str, fields: Any) -> User:
    if not isinstance(fields, dict):
        raise BadRequest(f"user {name!r} is not an object")
    try:
        user = User(name=name, key_sha256=fields["key_sha256"], rate_per_minute=fields["rate_per_minute"],
                    concurrent=fields["concurrent"], created=float(fields["created"]))
    except (KeyError, TypeError, ValueError) as e:
        raise BadRequest(f"user {name!r} is malformed: {type(e).__name__}: {e}") from e
    check_limits(name, user.rate_per_minute, user.concurrent)
    if not isinstance(user.key_sha256, str) or not re.fullmatch(r"[0-9a-f]{64}", user.key_sha256):
        raise BadRequest(f"user {name!r} has no valid key hash")
    return user


class UserStore:
    """``users.json`` of one data directory: the issued keys by user name."""

    def __init__(self, data_dir: Path):
        self.path = Path(data_dir) / USERS_FILE
        self._lock_path = Path(data_dir) / LOCK_FILE
        self._lock = threading.Lock()
        self._seen: tuple[int, int, int] | None = None
        self._users: dict[str, User] = {}

    def _read_locked(self) -> dict[str, User]:
        """The users on disk, re-read only if the file changed since the last read."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._seen, self._users = None, {}
            return self._users
        seen = (st.st_ino, st.st_size, st.st_mtime_ns)
        if seen != self._seen:
            data = read_json_file(self.path, USERS_LIMITS, f"the user file {self.path}")
            if not isinstance(data, dict) or not isinstance(data.get("users"), dict):
                raise BadRequest(f"the user file {self.path} does not hold {{\"users\": {{...}}}}")
            self._users = {name: _user(name, fields) for name, fields in data["users"].items()}
            self._seen = seen
        return self._users

    @contextmanager
    def _editing(self) -> Iterator[dict[str, User]]:
        """The users, to change in place and write back, under the file lock (other processes too)."""
        with self._lock, open(self._lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._seen = None  # another process may have written within one mtime tick
            users = dict(self._read_locked())
            yield users
            body = {"users": {n: {k: v for k, v in asdict(u).items() if k != "name"} for n, u in users.items()}}
            atomic_write(self.path, json.dumps(body, indent=1).encode())
            self._seen = None

    def all(self) -> list[User]:
        with self._lock:
            return sorted(self._read_locked().values(), key=lambda u: u.name)

    def add(self, name: str, rate_per_minute: int = DEFAULT_RATE_PER_MINUTE,
            concurrent: int = DEFAULT_CONCURRENT) -> tuple[User, str]:
        """Issue a key to ``name``: the user and the key, which is shown this once and stored only hashed."""
        check_limits(name, rate_per_minute, concurrent)
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        with self._editing() as users:
            if name in users:
                raise BadRequest(f"user {name!r} already has a key; revoke it first to issue a new one")
            if len(users) >= MAX_USERS:
                raise BadRequest(f"S1 holds the most users it may ({MAX_USERS})")
            users[name] = user = User(name, hash_key(key), rate_per_minute, concurrent, time.time())
        return user, key

    def revoke(self, name: str) -> None:
        with self._editing() as users:
            if users.pop(name, None) is None:
                raise UnknownUser(f"no user {name!r} holds a key")

    def find(self, key: str) -> User | None:
        """The user holding ``key`` (None for an unknown or revoked key), from the file as it is now."""
        digest = hash_key(key)
        with self._lock:
            users = list(self._read_locked().values())
        found = None
        for user in users:  # every hash compared, in constant time each
            if hmac.compare_digest(user.key_sha256, digest):
                found = user
        return found


class KeyQuotas:
    """Per key: a token bucket of ``rate_per_minute`` (full at first, refilled continuously) and at most
    ``concurrent`` queries at once; :class:`ServiceBusy` with the seconds to wait beyond either."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._lock = threading.Lock()
        #: by key hash: a re-issued key starts afresh, a revoked one's state is dropped with it
        self._buckets: dict[str, tuple[float, float]] = {}
        self._running: dict[str, int] = {}

    @contextmanager
    def admit(self, user: User) -> Iterator[None]:
        key = user.key_sha256
        with self._lock:
            now = self._clock()
            tokens, last = self._buckets.get(key, (float(user.rate_per_minute), now))
            tokens = min(float(user.rate_per_minute), tokens + (now - last) * user.rate_per_minute / 60.0)
            if self._running.get(key, 0) >= user.concurrent:
                self._buckets[key] = (tokens, now)
                raise ServiceBusy(f"user {user.name} already runs {user.concurrent} queries at once, the key's "
                                  "limit; retry when one has finished", retry_after=1)
            if tokens < 1.0:
                self._buckets[key] = (tokens, now)
                wait = max(1, math.ceil((1.0 - tokens) * 60.0 / user.rate_per_minute))
                raise ServiceBusy(f"user {user.name} has used the key's {user.rate_per_minute} queries per "
                                  f"minute; retry in {wait} s", retry_after=wait)
            self._buckets[key] = (tokens - 1.0, now)
            self._running[key] = self._running.get(key, 0) + 1
        try:
            yield
        finally:
            with self._lock:
                self._running[key] -= 1
                if not self._running[key]:
                    del self._running[key]
