"""A short-lived cache of the polled views' responses, per bearer token (API_CACHE_SECONDS).

Dashboards and scripts poll `GET /sessions/<id>` and `GET /sessions/training-status` in loops; each
answer costs a token check, a user lookup and a session read, while the session changes at most once
per epoch. A response is kept for `API_CACHE_SECONDS` under the exact Authorization header and path
that produced it, so a repeat skips all three:

- It was built for that token after the full check (signature, expiry, user), and is never served
  past the token's own expiry.
- A start or cancel made through this process drops the owner's entries at once, so a client sees
  its own actions immediately; so does any write to a session made in this process (the coordinator
  and monitor of `make run`), announced by models.changes. Progress written by the monitor and the
  coordinator in other processes (a deployment) shows up within `API_CACHE_SECONDS`.
- Only 200 answers are kept; errors are always computed afresh.
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
_ENTRIES = 10_000  # at ~2 KB each, ~20 MB at most; the least recently used go first


@dataclass(frozen=True)
class _Entry:
    expires: float
    owner: str
    generation: int
    body: bytes
    mimetype: str


class ResponseCache:
    """(Authorization header, path) -> a recent 200 response, invalidated per owner."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.time) -> None:
        self.seconds = seconds
        self.clock = clock
        self._entries: OrderedDict[tuple[str, str], _Entry] = OrderedDict()
        self._generations: dict[str, int] = {}
        self._owners: OrderedDict[str, str] = OrderedDict()  # session id -> owner, of the kept answers
        self._lock = threading.Lock()

    def get(self, key: tuple[str, str]) -> _Entry | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            if entry.expires <= self.clock() or entry.generation != self._generations.get(entry.owner, 0):
                del self._entries[key]
                return None
            self._entries.move_to_end(key)
            return entry

    def put(self, key: tuple[str, str], owner: str, token_expires: float, body: bytes, mimetype: str,
            session: str | None = None) -> None:
        """Keep a 200 answer for `owner`; `session` is the session it shows, whose changes drop it."""
        with self._lock:
            if session:
                self._owners[session] = owner
                self._owners.move_to_end(session)
                while len(self._owners) > _ENTRIES:
                    self._owners.popitem(last=False)
            # Each entry lives a random 50-100% of the period: entries filled together (many users'
            # dashboards opened at once, a restart) would otherwise expire together and queue their misses.
            expires = min(self.clock() + self.seconds * (0.5 + 0.5 * random.random()), token_expires)
            self._entries[key] = _Entry(expires, owner, self._generations.get(owner, 0), body, mimetype)
            self._entries.move_to_end(key)
            while len(self._entries) > _ENTRIES:
                self._entries.popitem(last=False)

    def changed(self, owner: str) -> None:
        """Something of `owner`'s changed here: none of their kept responses may be served again."""
        with self._lock:
            self._generations[owner] = self._generations.get(owner, 0) + 1

    def session_changed(self, session: str) -> None:
        """A session was written in this process: drop its owner's kept answers, if any are kept."""
        with self._lock:
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
        key = (authorization, request.full_path)
        entry = cache.get(key)
        if entry is not None:
            return Response(entry.body, status=200, mimetype=entry.mimetype)
        response = current_app.make_response(view(*args, **kwargs))
        if response.status_code == 200 and not response.is_streamed:
            expires = float(get_jwt().get("exp", math.inf))  # no "exp" when tokens are set never to expire
            # The session shown: the detail route's argument, or the one training-status names.
            shown = (request.view_args or {}).get("session_id")
            session = shown or (response.get_json(silent=True) or {}).get("session_id")
            cache.put(key, str(current_user.id), expires, response.get_data(), response.mimetype, session)
        return response

    return wrapper
