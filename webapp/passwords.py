"""Password hashing with bcrypt, a bounded number of hashes at a time."""

from __future__ import annotations

import base64
import hashlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import bcrypt


class Busy(Exception):
    """Every hashing slot is taken: the caller should answer 503 with a Retry-After."""


def _prehash(password: str) -> bytes:
    # bcrypt reads at most 72 bytes (bcrypt 5 refuses more); a SHA-256 digest, base64-encoded so it
    # holds no NUL byte, lets a long passphrase count in full.
    return base64.b64encode(hashlib.sha256(password.encode()).digest())


class Passwords:
    """Hashes and checks passwords, at most `slots` at once in this process.

    A hash costs ~220 ms of CPU at cost 12. bcrypt releases the GIL while it works, so other requests
    go on in the process's other app threads, but only if hashing cannot take them all: a sign-in that
    finds every slot busy is refused at once (Busy) rather than queued on a thread the rest of the API
    needs. The server must therefore run the app on more threads than `slots` (bench/signin.py).
    """

    def __init__(self, rounds: int, slots: int = 1) -> None:
        self.rounds = rounds
        self._slots = threading.BoundedSemaphore(slots)
        self._dummy: str | None = None

    @contextmanager
    def slot(self) -> Iterator[None]:
        """Hold one hashing slot, or raise Busy without waiting."""
        if not self._slots.acquire(blocking=False):
            raise Busy
        try:
            yield
        finally:
            self._slots.release()

    def hash(self, password: str) -> str:
        """A new bcrypt hash of `password`."""
        with self.slot():
            return bcrypt.hashpw(_prehash(password), bcrypt.gensalt(self.rounds)).decode()

    def check(self, password: str, hashed: str) -> bool:
        """Whether `password` matches `hashed`."""
        with self.slot():
            return bcrypt.checkpw(_prehash(password), hashed.encode())

    def dummy_check(self, password: str) -> None:
        """Spend the time a real check would, so a wrong email answers as slowly as a wrong password."""
        if self._dummy is None:
            self._dummy = self.hash("peertrain-dummy")
        self.check(password, self._dummy)
