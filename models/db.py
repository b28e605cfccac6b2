"""Connecting mongoengine to MongoDB, or to mongomock for the embedded mode and tests."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import bson
import mongoengine
from pymongo.errors import BulkWriteError

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
        if not callable(value) or isinstance(value, type):
            return value
        journal = _journal
        if journal is not None and name in WRITES and isinstance(self._target, _mock_types()[2]):
            return self._call(journal.noting(self._target, name, value))
        return self._call(value)

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


# The collection methods that change documents; each call is noted by the journal, if one is kept.
WRITES = frozenset({"insert_one", "insert_many", "update_one", "update_many", "replace_one", "delete_one",
                    "delete_many", "find_one_and_update", "find_one_and_replace", "find_one_and_delete", "bulk_write",
                    "drop"})
_journal: Journal | None = None


# Updates: the documents they name by `_id`, or that their filter matches before they run, are appended as
# they are after; any other write (a delete, an upsert not by `_id`) has its collection written whole.
UPDATES = frozenset({"update_one", "update_many", "replace_one", "find_one_and_update", "find_one_and_replace"})
# A collection's file is written whole again once the versions in it that later ones replaced pass both this
# and what it held whole (so that writing it whole, which holds the lock while it is read, stays rare).
COMPACT_BYTES = 1 << 20


class Journal:
    """mongomock's durability for `make run`: what changed is written to a directory every `interval` seconds,
    so a hard kill (or a power cut) loses at most that much.

    Each collection's file is a log of BSON documents where a later one with the same `_id` replaces an
    earlier one. Documents inserted since the last flush (heartbeats, event logs: most of what grows) are
    appended as they were inserted; documents an update names by `_id` (a session's progress, a task's
    outcome), or that its filter matches before it runs, are read again and appended as they are now; a
    collection changed any other way (a delete, an upsert not by `_id`) is written whole, beside its file
    and renamed into place, as is one whose file holds more replaced versions than COMPACT_BYTES and than
    it held whole. Files are synced before they count; a torn append at a file's end is cut off when
    `load_snapshot` reads it back. Real MongoDB has a journal of its own: this is never used with it.
    """

    def __init__(self, directory: str | os.PathLike, interval: float) -> None:
        self.directory = Path(directory)
        self.interval = interval
        self.changed: set[str] = set()  # collections written whole at the next flush
        self.inserted: dict[str, list[bytes]] = {}  # collection -> documents to append, encoded
        self.updated: dict[str, set[Any]] = {}  # collection -> ids of documents to append as they are then
        self.replaced: dict[str, int] = {}  # collection -> bytes of versions appended since it was written whole
        self.whole: dict[str, int] = {}  # collection -> bytes its file held when it was last written whole
        self.flushes = 0
        self.written_bytes = 0
        self.longest_hold = 0.0  # seconds a flush held the database's lock, at most (everyone else waits)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def noting(self, target: Any, method: str, call: Callable[..., Any]) -> Callable[..., Any]:
        """`call` (a write `method` of mongomock collection `target`, run under the client's lock), noted for the
        next flush."""
        collection = target.name

        def noted(*args: Any, **kwargs: Any) -> Any:
            if method == "insert_many":  # a generator is read once: by the insert, then by the journal
                args = (list(args[0]), *args[1:]) if args else args
                kwargs = {**kwargs, "documents": list(kwargs["documents"])} if "documents" in kwargs else kwargs
            ids = None
            if method in UPDATES:
                query = args[0] if args else kwargs.get("filter")
                ids = _named(query)
                if ids is None and isinstance(query, dict) and not kwargs.get("upsert"):
                    # The documents it may change, found before it changes the fields they were found by:
                    # only those are appended, not the whole collection.
                    ids = [document["_id"] for document in target.find(query, {"_id": 1})]
            try:
                result = call(*args, **kwargs)
            except BulkWriteError as exc:
                # Some went in (duplicates are the usual reason, and they are skipped): those are noted.
                if method != "insert_many":
                    self._rewrite(collection)
                    raise
                documents = args[0] if args else kwargs["documents"]
                failed = {error.get("index") for error in exc.details.get("writeErrors", [])}
                ordered = kwargs.get("ordered", args[1] if len(args) > 1 else True)
                stop = min(failed) if ordered and failed else len(documents)
                self._append(collection, [d for i, d in enumerate(documents[:stop]) if i not in failed])
                raise
            except Exception:
                self._rewrite(collection)  # whatever failed part-way may have written some of it
                raise
            if method == "insert_one":
                self._append(collection, [args[0] if args else kwargs["document"]])
            elif method == "insert_many":
                self._append(collection, args[0] if args else kwargs["documents"])
            elif ids is not None:
                if collection not in self.changed:
                    self.updated.setdefault(collection, set()).update(ids)
            else:
                self._rewrite(collection)
            return result

        return noted

    def _append(self, collection: str, documents: list[Any]) -> None:
        if collection not in self.changed:  # written whole anyway
            self.inserted.setdefault(collection, []).extend(bson.encode(document) for document in documents)

    def _rewrite(self, collection: str) -> None:
        self.changed.add(collection)
        self.inserted.pop(collection, None)
        self.updated.pop(collection, None)

    def start(self, every_collection: bool = False) -> None:
        """Flush every `interval` s in a thread. The files must hold what the database does (it was read from
        them, `load_snapshot`, or both are empty); `every_collection`: note every collection as changed, so
        that the first flush writes them all."""
        global _journal
        if every_collection:
            self.changed.update(mongoengine.get_db().list_collection_names())
        _journal = self
        if self.interval > 0:
            self._thread = threading.Thread(target=self._run, name="journal", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.flush()
            except Exception:  # the next flush writes what this one could not: nothing is forgotten by failing once
                logging.getLogger(__name__).exception("writing the database to %s failed", self.directory)

    def stop(self) -> None:
        """Flush what is left and stop noting."""
        global _journal
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        self.flush()
        if _journal is self:
            _journal = None

    def flush(self) -> int:
        """Write what changed since the last flush; returns bytes written."""
        db = mongoengine.get_db()
        lock = mongoengine.get_connection()._lock
        with lock:  # one consistent cut: what changes from here on is the next flush's
            began = time.perf_counter()
            self.changed |= {name for name, size in self.replaced.items()
                             if size > max(COMPACT_BYTES, self.whole.get(name, 0))}
            changed, inserted, updated = self.changed, self.inserted, self.updated
            self.changed, self.inserted, self.updated = set(), {}, {}
            whole = {name: list(db[name].find()) for name in changed}
            now = {name: list(db[name].find({"_id": {"$in": list(ids)}})) for name, ids in updated.items()
                   if name not in whole}
            self.longest_hold = max(self.longest_hold, time.perf_counter() - began)
        try:
            written = self._write(whole, inserted, now)
        except BaseException:
            with lock:  # whatever this flush should have written is written whole by the next one
                for name in {*whole, *inserted, *now}:
                    self._rewrite(name)
            raise
        self.flushes += 1
        self.written_bytes += written
        return written

    def _write(self, whole: dict[str, list[Any]], inserted: dict[str, list[bytes]],
               now: dict[str, list[Any]]) -> int:
        self.directory.mkdir(parents=True, exist_ok=True)
        written = 0
        for name, documents in whole.items():
            data = b"".join(bson.encode(document) for document in documents)
            part = self.directory / f"{name}.bson.part"
            with part.open("wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(part, self.directory / f"{name}.bson")
            self.replaced[name], self.whole[name] = 0, len(data)
            written += len(data)
        for name in {*inserted, *now} - set(whole):
            versions = b"".join(bson.encode(document) for document in now.get(name, []))
            data = b"".join(inserted.get(name, [])) + versions  # the versions read now come last: they win
            path = self.directory / f"{name}.bson"
            if name not in self.whole:  # as it was read at the start
                self.whole[name] = path.stat().st_size if path.exists() else 0
            with path.open("ab") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            self.replaced[name] = self.replaced.get(name, 0) + len(versions)
            written += len(data)
        if whole:
            _sync_directory(self.directory)  # the renames themselves
        return written


def _named(query: Any) -> list[Any] | None:
    """The ids a filter names, when it names them (`{"_id": x, ...}`, `{"_id": {"$in": [...]}, ...}`); else None."""
    if not isinstance(query, dict) or "_id" not in query:
        return None
    value = query["_id"]
    if isinstance(value, dict):
        return list(value["$in"]) if set(value) == {"$in"} else None
    return [value]


def _sync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _key(value: Any) -> Any:
    return bson.encode({"k": value}) if isinstance(value, dict | list) else value


def _documents(data: bytes, path: Path) -> list[dict[str, Any]]:
    """The BSON documents of a file, up to a torn one at its end (a hard kill mid-append), which is cut off the
    file (the next append starts where the last whole document ends)."""
    documents, at = [], 0
    while at + 4 <= len(data):
        size = int.from_bytes(data[at:at + 4], "little", signed=True)
        if size < 5 or at + size > len(data):
            break
        try:
            documents.append(bson.decode(data[at:at + size]))
        except bson.errors.InvalidBSON:
            break
        at += size
    if at < len(data):
        logging.getLogger(__name__).warning("%s: %d byte(s) at its end were cut off by a hard stop; dropped",
                                            path, len(data) - at)
        os.truncate(path, at)
    return documents


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
        # A later version of a document replaces an earlier one (Journal); each keeps its first place.
        documents = list({_key(d["_id"]): d for d in _documents(path.read_bytes(), path)}.values())
        if documents:
            db[path.name.removesuffix(".bson")].insert_many(documents)
            loaded += len(documents)
    return loaded
