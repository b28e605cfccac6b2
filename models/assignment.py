"""Assignments: every `train` task the coordinator sent, to whom, for what and until when; and its one outcome.

The record is made before the task is sent, and is what the platform believes about the task: a
result or a heartbeat counts only if it names a task recorded here for the peer that sent it. Its
outcome is taken once (`claim`: a conditional update, so two consumers of one result, a result racing
a "left out" verdict, or a replayed message change nothing after the first), and for a round's chord
it is then passed on once (into the chord, or to the coordinator): whoever takes the delivery lease
(`take_delivery`) passes it on and marks it settled. A session that ends closes its open assignments.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

from bson import ObjectId
from mongoengine import (
    BooleanField,
    DateTimeField,
    DictField,
    Document,
    EmbeddedDocument,
    EmbeddedDocumentField,
    IntField,
    ObjectIdField,
    StringField,
)
from pymongo.errors import BulkWriteError

DUPLICATE_KEY = 11000


class ChordPlace(EmbeddedDocument):
    """Where a task's outcome counts in its round's chord: the group, its place in it, the body it joins into."""

    group = StringField(required=True)
    index = IntField(required=True, min_value=0)
    size = IntField(required=True, min_value=1)
    body = StringField(required=True)


class Assignment(Document):
    """One task the coordinator sent (its Celery task id is the key)."""

    id = StringField(primary_key=True)
    session_id = ObjectIdField(required=True)
    peer = StringField(required=True)
    round = IntField(required=True, min_value=0)  # the session's round, or an asynchronous session's task number
    epochs = IntField(required=True, min_value=1)  # it trains this many: heartbeats of other epochs are not its own
    position = IntField(required=True, min_value=0)  # its peer's place among the session's runs
    chord = EmbeddedDocumentField(ChordPlace)  # None for tasks that are not part of a chord
    sent_at = DateTimeField(required=True)
    deadline = DateTimeField()  # past this, its peer is left out
    fixed = BooleanField(default=False)  # the deadline is the user's (round_timeout), not one the platform measures
    outcome = DictField(default=None)  # what was decided about it, once (tasks/gate.py makes these)
    reported_at = DateTimeField()
    delivering = DateTimeField()  # since when a coordinator has been passing the outcome on (a lease)
    settled = BooleanField(default=False)  # passed on: counted in its chord, or handed to the coordinator

    meta = {"collection": "assignments",
            "indexes": [("session_id", "peer"), ("outcome", "deadline")]}


def _collection():
    return Assignment._get_collection()


def record(assignments: Iterable[dict[str, Any]]) -> None:
    """Record tasks about to be sent ({_id, session_id, peer, round, epochs, position, chord, sent_at, deadline});
    ones recorded already (a launch run again after a crash) are kept as they were."""
    docs = [{"outcome": None, "settled": False, **doc} for doc in assignments]
    if not docs:
        return
    try:
        _collection().insert_many(docs, ordered=False)
    except BulkWriteError as exc:
        if any(error["code"] != DUPLICATE_KEY for error in exc.details["writeErrors"]):
            raise


def get(task_id: str) -> dict[str, Any] | None:
    """The assignment of task `task_id` as stored, or None (a task the coordinator never sent)."""
    if not isinstance(task_id, str):
        return None
    return _collection().find_one({"_id": task_id})


def claim(task_id: str, outcome: dict[str, Any], at: datetime) -> bool:
    """Decide task `task_id`'s outcome, unless it was decided already; True if this call decided it."""
    return bool(_collection().update_one({"_id": task_id, "outcome": None},
                                         {"$set": {"outcome": outcome, "reported_at": at}}).modified_count)


def take_delivery(task_id: str, now: datetime, lease: timedelta) -> bool:
    """The right to pass task `task_id`'s decided outcome on, for one coordinator at a time (a lease its holder
    lets go of by settling; one left by a coordinator that died expires after `lease`)."""
    return bool(_collection().update_one(
        {"_id": task_id, "settled": False, "outcome": {"$ne": None},
         "$or": [{"delivering": None}, {"delivering": {"$lt": now - lease}}]},
        {"$set": {"delivering": now}}).modified_count)


def settle(task_id: str) -> None:
    """Its outcome was passed on."""
    _collection().update_one({"_id": task_id}, {"$set": {"settled": True, "delivering": None}})


def open_of(session_id: ObjectId, peer: str | None = None) -> list[dict[str, Any]]:
    """The session's tasks (of `peer`) whose outcome is not decided yet."""
    query: dict[str, Any] = {"session_id": ObjectId(session_id), "outcome": None}
    if peer is not None:
        query["peer"] = peer
    return list(_collection().find(query))


def of_round(session_id: ObjectId, round_: int, peer: str) -> dict[str, Any] | None:
    return _collection().find_one({"session_id": ObjectId(session_id), "round": round_, "peer": peer})


def close(session_id: ObjectId, outcome: dict[str, Any], at: datetime, peer: str | None = None) -> int:
    """Decide every open task of the session (of `peer`) as `outcome`, with nothing left to pass on (whoever
    closes them has acted on it); returns how many."""
    query: dict[str, Any] = {"session_id": ObjectId(session_id), "outcome": None}
    if peer is not None:
        query["peer"] = peer
    return _collection().update_many(
        query, {"$set": {"outcome": outcome, "reported_at": at, "settled": True}}).modified_count


def tighten(factor: float, floor: float) -> int:
    """Give open tasks whose deadline is not the user's a deadline from what the platform measured of the
    finished tasks they wait with (a round's, or an asynchronous session's): `factor` times the slowest one's
    time per epoch, times their own epochs, and at least `floor` seconds after they were sent; never later than
    they had. Returns how many deadlines moved."""
    groups: dict[tuple[Any, Any], list[dict[str, Any]]] = {}
    for task in _collection().find({"outcome": None, "fixed": {"$ne": True}},
                                   {"session_id": 1, "round": 1, "chord": 1, "sent_at": 1, "epochs": 1, "deadline": 1}):
        groups.setdefault((task["session_id"], task["round"] if task.get("chord") else None), []).append(task)
    moved = 0
    for (session_id, round_), waiting in groups.items():
        query: dict[str, Any] = {"session_id": session_id, "outcome.kind": "trained"}
        if round_ is not None:
            query["round"] = round_
        finished = list(_collection().find(query, {"sent_at": 1, "reported_at": 1, "epochs": 1}))
        if not finished:
            continue
        per_epoch = max((a["reported_at"] - a["sent_at"]).total_seconds() / a["epochs"] for a in finished)
        for task in waiting:
            deadline = task["sent_at"] + timedelta(seconds=max(floor, factor * per_epoch * task["epochs"]))
            if task.get("deadline") is None or deadline < task["deadline"]:
                moved += _collection().update_one({"_id": task["_id"], "outcome": None},
                                                  {"$set": {"deadline": deadline}}).modified_count
    return moved


def overdue(now: datetime) -> list[dict[str, Any]]:
    """Open tasks past their deadline."""
    return list(_collection().find({"outcome": None, "deadline": {"$lt": now}},
                                   {"session_id": 1, "peer": 1, "round": 1, "sent_at": 1, "deadline": 1}))


def for_session(session_id: ObjectId) -> list[dict[str, Any]]:
    return list(_collection().find({"session_id": ObjectId(session_id)}).sort([("sent_at", 1), ("_id", 1)]))
