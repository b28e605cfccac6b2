"""Connecting mongoengine to MongoDB, or to mongomock for the embedded mode and tests."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

import bson
import mongoengine

MOCK_SCHEME = "mongomock://"


def connect(uri: str, alias: str = mongoengine.DEFAULT_CONNECTION_NAME) -> None:
    """Connect documents to `uri`; `mongomock://host/db` keeps the database inside this process."""
    if uri.startswith(MOCK_SCHEME):
        # mongoengine 0.29 dropped the mongomock:// scheme; the client class is the supported way.
        import mongomock

        db = urlsplit(uri).path.lstrip("/") or "peertrain"
        mongoengine.connect(
            db=db, host="mongodb://localhost", alias=alias, mongo_client_class=mongomock.MongoClient,
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
    return type(mongoengine.get_db().client).__module__.startswith("mongomock")


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
