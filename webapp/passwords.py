"""Password hashing with bcrypt, a bounded number of hashes at a time."""

from __future__ import annotations

import base64
import hashlib
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, TypeVar

import bcrypt

T = TypeVar("T")
# Nice value of the hashing threads (0 is normal; 19 the lowest priority).
HASHING_NICENESS = 10


class Busy(Exception):
    """Every hashing slot is taken: the caller should answer 503 with a Retry-After."""


def _prehash(password: str) -> bytes:
    # bcrypt reads at most 72 bytes (bcrypt 5 refuses more); a SHA-256 digest, base64-encoded so it
    # holds no NUL byte, lets a long passphrase count in full.
    return base64.b64encode(hashlib.sha256(password.encode()).digest())


def _lower_priority() -> None:
    # Linux gives each thread its own nice value: hashing yields the CPU to the threads serving requests.
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), HASHING_NICENESS)
    except OSError:
        pass  # not Linux: hashing keeps the process's priority


class Passwords:
    """Hashes and checks passwords, at most `slots` at once in this process.

    A hash costs ~220 ms of CPU at cost 12. It runs on a hashing thread of low CPU priority while the
    request's thread waits without holding the GIL (bcrypt releases it), so the other app threads keep
    serving, and keep the CPU, meanwhile. A sign-in that finds every slot busy is refused at once (Busy)
    rather than queued on a thread the rest of the API needs: the server must run the app on more threads
    than `slots`.
    """

    def __init__(self, rounds: int, slots: int = 1) -> None:
        self.rounds = rounds
        self._slots = threading.BoundedSemaphore(slots)
        self._hashers = ThreadPoolExecutor(slots, thread_name_prefix="bcrypt", initializer=_lower_priority)
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

    def _run(self, work: Callable[..., T], *args: Any) -> T:
        with self.slot():
            return self._hashers.submit(work, *args).result()

    def hash(self, password: str) -> str:
        """A new bcrypt hash of `password`."""
        return self._run(bcrypt.hashpw, _prehash(password), bcrypt.gensalt(self.rounds)).decode()

    def check(self, password: str, hashed: str) -> bool:
        """Whether `password` matches `hashed`."""
        return self._run(bcrypt.checkpw, _prehash(password), hashed.encode())

    def dummy_check(self, password: str) -> None:
        """Spend the time a real check would, so a wrong email answers as slowly as a wrong password."""
        if self._dummy is None:
            self._dummy = self.hash("peertrain-dummy")
        self.check(password, self._dummy)
