"""Connecting mongoengine to MongoDB, or to mongomock for the embedded mode and tests."""

from __future__ import annotations

from datetime import UTC, datetime
from urllib.parse import urlsplit

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
    if type(db.client).__module__.startswith("mongomock"):
        db.list_collection_names()
    else:
        db.command("ping")


def utcnow() -> datetime:
    """Now, as the naive UTC datetime that BSON stores (millisecond precision)."""
    now = datetime.now(UTC).replace(tzinfo=None)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)
