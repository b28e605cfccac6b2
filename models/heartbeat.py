"""Per-epoch heartbeats, persisted once each however often they arrive."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from bson import ObjectId
from mongoengine import DateTimeField, Document, FloatField, IntField, ObjectIdField, StringField
from pymongo.errors import BulkWriteError

from models import event as events
from models.db import utcnow

DUPLICATE_KEY = 11000


def heartbeat_id(session_id: object, peer: str, round: int, epoch: int) -> str:
    """The primary key: one heartbeat per session, peer, round and epoch."""
    return f"{session_id}:{peer}:{round}:{epoch}"


class Heartbeat(Document):
    """What a peer reported at the end of one epoch.

    The (session, peer, round, epoch) key is the primary key itself rather than a unique compound
    index: the same guarantee on MongoDB, and mongomock checks a unique index by scanning every
    document (5,000 inserts took 58 s) while it finds an _id by hash (70 ms).
    """

    id = StringField(primary_key=True)
    session_id = ObjectIdField(required=True)
    peer = StringField(required=True)
    round = IntField(required=True, default=0)
    epoch = IntField(required=True)
    epochs = IntField()
    loss = FloatField()
    accuracy = FloatField()
    val_loss = FloatField()
    val_accuracy = FloatField()
    val_r2 = FloatField()
    samples_per_sec = FloatField()
    seconds = FloatField()
    sent_at = DateTimeField()
    received_at = DateTimeField(default=utcnow)

    meta = {
        "collection": "heartbeats",
        "indexes": [
            ("session_id", "peer", "round", "epoch"),
        ],
        "ordering": ["round", "epoch", "peer"],
    }


# When the peer finished the epoch (Unix seconds, the trainer's `finished_at`): stored as `sent_at`, so a
# heartbeat has it whichever writer stores it (the monitor from the event, the coordinator from the history).
FINISHED_AT = "finished_at"
# The numbers a heartbeat keeps: the document's own numeric fields, less its key (what a peer may send
# is tasks/protocol.py's; this is what is stored of it).
_NUMBERS = {name: type(f) for name, f in Heartbeat._fields.items()
            if isinstance(f, FloatField | IntField) and name not in ("round", "epoch")}


def _moment(seconds: Any) -> datetime | None:
    # A peer's clock, or its lie: a time no datetime can hold is no time at all.
    try:
        return datetime.fromtimestamp(float(seconds), UTC).replace(tzinfo=None)
    except (OverflowError, OSError, ValueError):
        return None


def _document(hb: dict[str, Any], received_at: datetime) -> dict[str, Any]:
    # The stored form, built directly: a mongoengine Document per heartbeat was the monitor's largest
    # cost under a burst (building them halved its throughput). Types are fixed here instead.
    session_id = ObjectId(hb["session_id"])
    round_, epoch = int(hb.get("round") or 0), int(hb["epoch"])
    doc: dict[str, Any] = {"_id": heartbeat_id(session_id, hb["peer"], round_, epoch), "session_id": session_id,
                           "peer": str(hb["peer"]), "round": round_, "epoch": epoch}
    for name, kind in _NUMBERS.items():
        value = hb.get(name)
        if value is not None:
            doc[name] = int(value) if kind is IntField else float(value)
    if hb.get(FINISHED_AT) is not None:
        doc["sent_at"] = _moment(hb[FINISHED_AT])
    elif hb.get("sent_at") is not None:
        doc["sent_at"] = hb["sent_at"]
    doc["received_at"] = received_at
    return doc


def insert_many(heartbeats: Iterable[dict[str, Any]]) -> int:
    """Insert heartbeats in one round trip; ones already stored are skipped. Returns how many were new.

    Each heartbeat gets its event in its session's log (models/event.py): the new ones at once, and
    the ones already stored if their event is missing (a writer stopped between the two writes, or
    another writer stored the heartbeat and has not logged it yet: the log keeps the first).
    """
    now = utcnow()
    docs = [_document(hb, now) for hb in heartbeats]
    if not docs:
        return 0
    try:
        Heartbeat._get_collection().insert_many(docs, ordered=False)
        repeated: set[int] = set()
    except BulkWriteError as exc:
        if any(error["code"] != DUPLICATE_KEY for error in exc.details["writeErrors"]):
            raise
        repeated = {error["index"] for error in exc.details["writeErrors"]}
    _log_events(docs, repeated)
    return len(docs) - len(repeated)


def _log_events(docs: list[dict[str, Any]], repeated: set[int]) -> None:
    by_session: dict[ObjectId, tuple[list[events.Item], list[events.Item]]] = {}
    for i, doc in enumerate(docs):
        new, old = by_session.setdefault(doc["session_id"], ([], []))
        (old if i in repeated else new).append(events.heartbeat(doc))
    for session_id, (new, old) in by_session.items():
        # Only repeats need the log read (rare but for the coordinator's copy of a peer's history).
        events.append(session_id, _unlogged(session_id, new, old) if old else new)


def _unlogged(session_id: ObjectId, new: list[events.Item], old: list[events.Item]) -> list[events.Item]:
    # A heartbeat an interrupted attempt logged is not logged again when the resumed one repeats it.
    logged = events.keys(session_id, [key for _, key, _ in old], any_attempt=True)
    missing, seen = [], logged | {key for _, key, _ in new}
    for item in old:
        if item[1] not in seen:
            seen.add(item[1])
            missing.append(item)
    return new + missing
