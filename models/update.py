"""Asynchronous sessions' updates: every `train` task handed to a peer, from dispatch to its fold.

An update is made when its task is sent (TRAINING, with the global version it starts from), and
moves once: to BUFFERED when the peer's usable weights came back, REJECTED when they did not, or
LOST when the peer was given up on; a BUFFERED update becomes FOLDED when the coordinator folds it
into a new global version, with the staleness and weight it was folded with. Each move is one
conditional update, so a redelivered result or a second fold changes nothing.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from bson import ObjectId
from mongoengine import (
    BooleanField,
    DateTimeField,
    DictField,
    Document,
    FloatField,
    IntField,
    ObjectIdField,
    StringField,
)
from pymongo.errors import BulkWriteError

from models.db import utcnow

DUPLICATE_KEY = 11000

TRAINING = "TRAINING"
BUFFERED = "BUFFERED"
FOLDED = "FOLDED"
REJECTED = "REJECTED"
LOST = "LOST"
STATUSES = (TRAINING, BUFFERED, FOLDED, REJECTED, LOST)


class Update(Document):
    """One task of an asynchronous session and what became of its weights."""

    session_id = ObjectIdField(required=True)
    seq = IntField(required=True, min_value=0)  # the session's n-th task, also the task's `round`
    peer = StringField(required=True)
    task_id = StringField(required=True)
    base_version = IntField(required=True, min_value=0)
    status = StringField(choices=STATUSES, default=TRAINING)
    sent = BooleanField(default=False)  # handed to the broker (a redelivered dispatch sends it otherwise)
    dispatched_at = DateTimeField(default=utcnow)
    received_at = DateTimeField()
    samples = IntField()
    metrics = DictField()  # the peer's last local epoch
    seconds = FloatField()
    version = IntField()  # the global version it was folded into
    staleness = IntField()
    weight = FloatField()
    reason = StringField()

    meta = {
        "collection": "updates",
        "indexes": [{"fields": ["session_id", "seq"], "unique": True}, ("session_id", "status")],
        "ordering": ["seq"],
    }


def dispatched(session_id: ObjectId, tasks: list[dict[str, Any]], at: datetime | None = None) -> None:
    """Record tasks about to be sent: {seq, peer, task_id, base_version} each; a task number recorded already
    (a dispatch run again after a crash) keeps its first record."""
    try:
        Update._get_collection().insert_many(
            [{"session_id": ObjectId(session_id), "status": TRAINING, "sent": False,
              "dispatched_at": at or utcnow(), **task} for task in tasks], ordered=False)
    except BulkWriteError as exc:
        if any(error["code"] != DUPLICATE_KEY for error in exc.details["writeErrors"]):
            raise


def mark_sent(session_id: ObjectId, seqs: list[int]) -> None:
    Update.objects(session_id=session_id, seq__in=seqs).update(set__sent=True)


def unsent(session_id: ObjectId) -> list[Update]:
    """Tasks recorded but not known to have reached the broker (their sender died in between)."""
    return list(Update.objects(session_id=session_id, status=TRAINING, sent=False).order_by("seq"))


def of_task(session_id: ObjectId, seq: int) -> Update | None:
    return Update.objects(session_id=session_id, seq=seq).first()


def settle(session_id: ObjectId, seq: int, status: str, at: datetime | None = None, **fields: Any) -> bool:
    """TRAINING → BUFFERED / REJECTED / LOST, once; False if it had moved already."""
    assert status in (BUFFERED, REJECTED, LOST)
    return bool(Update.objects(session_id=session_id, seq=seq, status=TRAINING).update_one(
        set__status=status, set__received_at=at or utcnow(), **{f"set__{k}": v for k, v in fields.items()}))


def buffered(session_id: ObjectId) -> list[Update]:
    return list(Update.objects(session_id=session_id, status=BUFFERED).order_by("seq"))


def buffered_of(session_id: ObjectId, peer: str) -> int:
    """How many of `peer`'s updates wait to be folded."""
    return Update.objects(session_id=session_id, peer=peer, status=BUFFERED).count()


def count(session_id: ObjectId, status: str) -> int:
    return Update.objects(session_id=session_id, status=status).count()


def folded(session_id: ObjectId, seq: int, version: int, staleness: int, weight: float) -> None:
    Update.objects(session_id=session_id, seq=seq, status=BUFFERED).update_one(
        set__status=FOLDED, set__version=version, set__staleness=staleness, set__weight=weight)


def reject(session_id: ObjectId, seq: int, reason: str) -> bool:
    """A buffered update whose weights did not hold up when they were read to be folded; False if it had moved."""
    return bool(Update.objects(session_id=session_id, seq=seq, status=BUFFERED).update_one(
        set__status=REJECTED, set__reason=reason))


def busy_peers(session_id: ObjectId) -> set[str]:
    """Peers with a task out."""
    return set(Update.objects(session_id=session_id, status=TRAINING).distinct("peer"))


def sent_after(session_id: ObjectId, peer: str, seq: int) -> bool:
    """True if `peer` was handed a task after task `seq` (its answer to `seq` has been acted on)."""
    return Update.objects(session_id=session_id, peer=peer, seq__gt=seq).count() > 0


def lose_training(session_id: ObjectId, peer: str, reason: str) -> int:
    """The peer's tasks still out are given up on; returns how many."""
    return Update.objects(session_id=session_id, peer=peer, status=TRAINING).update(
        set__status=LOST, set__reason=reason, set__received_at=utcnow())


def give_up_all(session_id: ObjectId, reason: str) -> int:
    """The session ended: every task still out is LOST; returns how many."""
    return Update.objects(session_id=session_id, status=TRAINING).update(
        set__status=LOST, set__reason=reason, set__received_at=utcnow())


def for_session(session_id: ObjectId) -> Any:
    return Update.objects(session_id=session_id).order_by("seq")
