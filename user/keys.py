"""The user's own Paillier key pair on disk.

The secret key file is JSON ``{"format": "he-cnn-user-key", "version": 1, "n", "p", "q"}`` created
with mode 0600 (never world-readable, not even briefly) and written atomically; the public part is
stored alongside as ``<file>.pub`` (``{"format": "he-cnn-user-public-key", "version": 1, "n"}``) for
sharing. The secret key only ever leaves this file inside the user's own process. Reading a key file
bounds its size, values and nesting before it is parsed (:data:`KEY_FILE_LIMITS`) and checks every
field, so a damaged or hostile file is one :class:`BadRequest`, never a traceback.
"""
from __future__ import annotations

import json
import stat
from pathlib import Path

from he_cnn.bounded_json import JSONLimits, read_json_file
from he_cnn.errors import BadRequest, HECNNError
from he_cnn.files import atomic_write
from he_cnn.crypto.paillier import (DEFAULT_KEY_BITS, MAX_USER_KEY_BITS, KeyPair, generate_keypair,
                                    keypair_from_primes)

KEY_FORMAT = "he-cnn-user-key"
PUBLIC_FORMAT = "he-cnn-user-public-key"
VERSION = 1
#: a key file holds six fields, its numbers at most MAX_USER_KEY_BITS (~2,500 decimal digits) each:
#: about 5 KB at the largest key size
KEY_FILE_LIMITS = JSONLimits(max_bytes=64 << 10, max_items=64)


def public_path(path: Path) -> Path:
    return path.with_name(path.name + ".pub")


def create_user_key(path: Path, bits: int = DEFAULT_KEY_BITS, overwrite: bool = False) -> KeyPair:
    """Generate a key pair and write it to ``path`` (0600) and ``path.pub``; refuse to clobber a key."""
    if path.exists() and not overwrite:
        raise BadRequest(f"{path} already exists; pass --force to replace it (the old key is then lost)")
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = generate_keypair(bits)
    secret = {"format": KEY_FORMAT, "version": VERSION, "key_id": keys.public.key_id, "n": int(keys.public.n),
              "p": int(keys.private.p), "q": int(keys.private.q)}
    public = {"format": PUBLIC_FORMAT, "version": VERSION, "key_id": keys.public.key_id, "n": int(keys.public.n)}
    atomic_write(path, json.dumps(secret).encode(), 0o600)
    atomic_write(public_path(path), json.dumps(public).encode(), 0o644)
    return keys


def load_user_key(path: Path) -> KeyPair:
    """The key pair in ``path``; :class:`BadRequest` with the reason if it is missing or malformed."""
    try:
        doc = read_json_file(path, KEY_FILE_LIMITS, f"key file {path}")
    except FileNotFoundError as e:
        raise BadRequest(f"key file {path} does not exist; create one with: he-cnn user keygen --out {path}") from e
    except OSError as e:
        raise BadRequest(f"key file {path} is not readable: {e.strerror or e}") from e
    if not isinstance(doc, dict) or doc.get("format") != KEY_FORMAT:
        hint = " (that is the public part; pass the secret key file)" if isinstance(doc, dict) and \
            doc.get("format") == PUBLIC_FORMAT else ""
        raise BadRequest(f"{path} is not a he-cnn user key file{hint}")
    if doc.get("version") != VERSION:
        raise BadRequest(f"key file {path} has version {str(doc.get('version'))[:40]!r}; expected {VERSION}")
    try:
        p, q, n = doc["p"], doc["q"], doc.get("n")
        if not all(type(v) is int and 1 < v < 1 << MAX_USER_KEY_BITS for v in (p, q)) \
                or not (n is None or type(n) is int):
            raise TypeError(f"p and q must be integers of at most {MAX_USER_KEY_BITS} bits, and n an integer")
        keys = keypair_from_primes(p, q)
    except (KeyError, TypeError, ValueError, ArithmeticError, HECNNError) as e:  # ArithmeticError: no inverse
        raise BadRequest(f"key file {path} is corrupt: {e}") from e
    if n is not None and n != keys.public.n:
        raise BadRequest(f"key file {path} is corrupt: n does not equal p * q")
    return keys


def is_private_file(path: Path) -> bool:
    """True when no one but the owner may read ``path``."""
    return stat.S_IMODE(path.stat().st_mode) & 0o077 == 0
