"""Connecting mongoengine to MongoDB, or to mongomock for the embedded mode and tests."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import bson
import mongoengine

MOCK_SCHEME = "mongomock://"


class Locked:
    """A mongomock object (client, database, collection or cursor) whose every use holds its client's lock.

    mongomock applies updates in place without a lock of its own, so two threads of one process (the
    embedded mode's API, coordinator and monitor) could both win a conditional update, or one could
    copy a document while another changes it ("dictionary changed size during iteration"). A real
    MongoDB serialises each operation on a document; this does the same for the whole mock, through
    its public API only: the objects it hands out are wrapped alike, and a cursor (which reads the
    store lazily, on its first `next`) is iterated under the lock too.
    """

    __slots__ = ("_target", "_lock")

    def __init__(self, target: Any, lock: threading.RLock) -> None:
        object.__setattr__(self, "_target", target)
        object.__setattr__(self, "_lock", lock)

    def _wrap(self, value: Any) -> Any:
        return Locked(value, self._lock) if isinstance(value, _mock_types()) else value

    def _call(self, method: Callable[..., Any]) -> Callable[..., Any]:
        def locked(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                return self._wrap(method(*args, **kwargs))

        return locked

    def __getattr__(self, name: str) -> Any:
        with self._lock:
            value = getattr(self._target, name)
        if isinstance(value, _mock_types()):
            return Locked(value, self._lock)
        return self._call(value) if callable(value) and not isinstance(value, type) else value

    def __setattr__(self, name: str, value: Any) -> None:
        with self._lock:
            setattr(self._target, name, value)

    def __getitem__(self, key: Any) -> Any:
        with self._lock:
            return self._wrap(self._target[key])

    def __iter__(self) -> Any:
        with self._lock:
            it = iter(self._target)
        return self if it is self._target else Locked(it, self._lock)

    def __next__(self) -> Any:
        with self._lock:
            return next(self._target)

    def __eq__(self, other: object) -> bool:
        return self._target == (other._target if isinstance(other, Locked) else other)

    def __hash__(self) -> int:
        return hash(self._target)

    def __repr__(self) -> str:
        return f"Locked({self._target!r})"


@cache
def _mock_types() -> tuple[type, ...]:
    import mongomock
    from mongomock.collection import Cursor
    from mongomock.command_cursor import CommandCursor

    return mongomock.MongoClient, mongomock.Database, mongomock.Collection, Cursor, CommandCursor


def _locked_mongomock(**kwargs: Any) -> Locked:
    import mongomock

    return Locked(mongomock.MongoClient(**kwargs), threading.RLock())


def connect(uri: str, alias: str = mongoengine.DEFAULT_CONNECTION_NAME) -> None:
    """Connect documents to `uri`; `mongomock://host/db` keeps the database inside this process."""
    if uri.startswith(MOCK_SCHEME):
        # mongoengine 0.29 dropped the mongomock:// scheme; the client class is the supported way. Behind
        # one lock: the embedded mode's threads share it (Locked).
        db = urlsplit(uri).path.lstrip("/") or "peertrain"
        mongoengine.connect(
            db=db, host="mongodb://localhost", alias=alias, mongo_client_class=_locked_mongomock,
            uuidRepresentation="standard",
        )
    else:
        mongoengine.connect(host=uri, alias=alias, uuidRepresentation="standard")


def ensure_connected(uri: str) -> None:
    """Connect unless this process already is (workers connect lazily, after they fork)."""
    try:
        mongoengine.get_connection()
    except mongoengine.connection.ConnectionFailure:
        connect(uri)


def disconnect(alias: str = mongoengine.DEFAULT_CONNECTION_NAME) -> None:
    """Drop the connection (tests reconnect to a fresh database)."""
    mongoengine.disconnect(alias=alias)


def ping() -> None:
    """Raise if the database does not answer."""
    db = mongoengine.get_db()
    if is_mock():
        db.list_collection_names()
    else:
        db.command("ping")


def utcnow() -> datetime:
    """Now, as the naive UTC datetime that BSON stores (millisecond precision)."""
    now = datetime.now(UTC).replace(tzinfo=None)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


def is_mock() -> bool:
    """True when the documents live in mongomock (inside this process)."""
    return isinstance(mongoengine.get_connection(), Locked)


def save_snapshot(directory: str | os.PathLike) -> int:
    """Write every collection of the connected database to `directory`, one BSON file each; returns documents.

    For `make run`'s mongomock, which keeps nothing once its process ends: called at a clean stop, when
    nothing writes any more. Each file is written beside its final name and renamed into place.
    """
    db, target = mongoengine.get_db(), Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    written = 0
    for name in db.list_collection_names():
        documents = list(db[name].find())
        part = target / f"{name}.bson.part"
        part.write_bytes(b"".join(bson.encode(document) for document in documents))
        os.replace(part, target / f"{name}.bson")
        written += len(documents)
    return written


def load_snapshot(directory: str | os.PathLike) -> int:
    """Insert what `save_snapshot` wrote into the (empty) connected database; returns documents."""
    db, loaded = mongoengine.get_db(), 0
    for path in sorted(Path(directory).glob("*.bson")):
        documents = bson.decode_all(path.read_bytes())
        if documents:
            db[path.name.removesuffix(".bson")].insert_many(documents)
            loaded += len(documents)
    return loaded
