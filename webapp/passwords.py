"""Password hashing with bcrypt."""

from __future__ import annotations

import base64
import hashlib

import bcrypt


def _prehash(password: str) -> bytes:
    # bcrypt reads at most 72 bytes (bcrypt 5 refuses more); a SHA-256 digest, base64-encoded so it
    # holds no NUL byte, lets a long passphrase count in full.
    return base64.b64encode(hashlib.sha256(password.encode()).digest())


def hash_password(password: str, rounds: int) -> str:
    return bcrypt.hashpw(_prehash(password), bcrypt.gensalt(rounds)).decode()


def check_password(password: str, hashed: str) -> bool:
    return bcrypt.checkpw(_prehash(password), hashed.encode())


def dummy_check(password: str, rounds: int) -> None:
    """Spend the time a real check would, so a wrong email answers as slowly as a wrong password."""
    bcrypt.checkpw(_prehash(password), _dummy_hash(rounds))


_DUMMIES: dict[int, bytes] = {}


def _dummy_hash(rounds: int) -> bytes:
    if rounds not in _DUMMIES:
        _DUMMIES[rounds] = bcrypt.hashpw(b"peertrain-dummy", bcrypt.gensalt(rounds))
    return _DUMMIES[rounds]
