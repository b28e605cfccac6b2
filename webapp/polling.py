"""A short-lived cache of the polled views' responses, per bearer token (API_CACHE_SECONDS).

Dashboards and scripts poll `GET /sessions/<id>` and `GET /sessions/training-status` in loops; each
answer costs a token check, a user lookup and a session read, while the session changes at most once
per epoch. A response is kept for `API_CACHE_SECONDS` under the exact Authorization header and path
that produced it, so a repeat skips all three:

- It was built for that token after the full check (signature, expiry, user), and is never served
  past the token's own expiry.
- Any write to a session made in this process drops the answers that show it: a start or cancel
  through this API, and under `make run` the coordinator's and the monitor's writes (announced by
  models.changes). An answer computed while such a write happened is not kept.
- Writes made by other processes (a deployment's coordinator and monitor, other API workers) show
  within `API_CACHE_SECONDS`.
- Only 200 answers are kept, within a byte budget per process; errors are always computed afresh.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from functools import wraps
from typing import Any

from flask import Flask, Response, current_app, request
from flask_jwt_extended import current_user, get_jwt

from models import changes

EXTENSION = "peertrain.polling"
_BUDGET = 32 << 20  # bytes of kept bodies per process; the least recently used go first
_LARGEST = _BUDGET >> 6  # a body over 512 KB is not kept: it would crowd out everyone else's
_SESSIONS = 100_000  # session id -> owner pairs remembered (~10 MB at most), the least recently kept go first


@dataclass(frozen=True)
class _Entry:
    expires: float  # on the monotonic clock
    token_expires: float  # on the wall clock (the token's "exp")
    owner: str
    generation: int
    body: bytes
    mimetype: str


class ResponseCache:
    """(Authorization header, path) -> a recent 200 response, invalidated per owner."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        if not (math.isfinite(seconds) and seconds >= 0):
            raise ValueError(f"API_CACHE_SECONDS must be a finite number of seconds >= 0, got {seconds}")
        self.seconds = seconds
        self.clock, self.wall = clock, wall
        self._entries: OrderedDict[tuple[str, str], _Entry] = OrderedDict()
        self._bytes = 0
        self._generations: dict[str, int] = {}
        self._owners: OrderedDict[str, str] = OrderedDict()  # session id -> owner, of the kept answers
        self._changes = 0  # every invalidation counts: an answer computed across one is not kept
        self._lock = threading.Lock()

    def get(self, key: tuple[str, str]) -> _Entry | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            if (entry.expires <= self.clock() or entry.token_expires <= self.wall()
                    or entry.generation != self._generations.get(entry.owner, 0)):
                self._drop(key)
                return None
            self._entries.move_to_end(key)
            return entry

    def ticket(self) -> int:
        """Take before computing an answer, give to `put`: a change in between means the answer may
        predate it (the view read the database before a write this process announced)."""
        with self._lock:
            return self._changes

    def put(self, key: tuple[str, str], owner: str, token_expires: float, body: bytes, mimetype: str,
            session: str | None = None, ticket: int | None = None) -> bool:
        """Keep a 200 answer for `owner`; `session` is the session it shows, whose changes drop it."""
        with self._lock:
            if (ticket is not None and ticket != self._changes) or len(body) > _LARGEST:
                return False
            if session:
                self._owners[session] = owner
                self._owners.move_to_end(session)
                while len(self._owners) > _SESSIONS:
                    self._owners.popitem(last=False)
            # Each entry lives a random 50-100% of the period: entries filled together (many users'
            # dashboards opened at once, a restart) would otherwise expire together and queue their misses.
            expires = self.clock() + self.seconds * (0.5 + 0.5 * random.random())
            if key in self._entries:
                self._drop(key)
            self._entries[key] = _Entry(expires, token_expires, owner, self._generations.get(owner, 0), body,
                                        mimetype)
            self._bytes += len(body)
            while self._bytes > _BUDGET:
                self._drop(next(iter(self._entries)))
            return True

    def _drop(self, key: tuple[str, str]) -> None:
        self._bytes -= len(self._entries.pop(key).body)

    def changed(self, owner: str) -> None:
        """Something of `owner`'s changed here: none of their kept responses may be served again."""
        with self._lock:
            self._generations[owner] = self._generations.get(owner, 0) + 1
            self._changes += 1

    def session_changed(self, session: str | None) -> None:
        """A session was written in this process (None: some session, which one unknown): drop the kept
        answers that may show it."""
        with self._lock:
            self._changes += 1
            if session is None:
                self._entries.clear()
                self._bytes = 0
                return
            owner = self._owners.get(session)
            if owner is not None:
                self._generations[owner] = self._generations.get(owner, 0) + 1


def init_app(app: Flask, seconds: float) -> None:
    cache = ResponseCache(seconds)
    app.extensions[EXTENSION] = cache
    changes.subscribe(cache.session_changed)


def changed(owner: Any) -> None:
    """Call after a write through this process that alters what `owner` sees when polling."""
    cache: ResponseCache | None = current_app.extensions.get(EXTENSION)
    if cache is not None:
        cache.changed(str(owner))


def polled(view: Callable[..., Any]) -> Callable[..., Any]:
    """Serve repeats of `view` (a JWT-protected GET whose 200 answer depends on its path, token and the
    caller's data) from the cache. Goes outside `jwt_required`, which it skips on a hit."""

    @wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        cache: ResponseCache | None = current_app.extensions.get(EXTENSION)
        authorization = request.headers.get("Authorization")
        if cache is None or cache.seconds <= 0 or not authorization:
            return view(*args, **kwargs)
        # The path only: neither view reads a query string, and `?x=1`, `?x=2`... must not make new entries.
        key = (authorization, request.path)
        entry = cache.get(key)
        if entry is not None:
            return Response(entry.body, status=200, mimetype=entry.mimetype)
        ticket = cache.ticket()
        response = current_app.make_response(view(*args, **kwargs))
        if response.status_code == 200 and not response.is_streamed:
            expires = float(get_jwt().get("exp", math.inf))  # no "exp" when tokens are set never to expire
            # The session shown, as the database spells its id: the detail's "id", training-status's one.
            body = response.get_json(silent=True) or {}
            session = body.get("id") or body.get("session_id")
            cache.put(key, str(current_user.id), expires, response.get_data(), response.mimetype, session, ticket)
        return response

    return wrapper
