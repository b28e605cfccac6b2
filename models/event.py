"""A session's event log: what its event stream (GET /sessions/<id>/events) shows, in the order it happened.

Every event gets the next integer `seq` of its session when it is stored, and the log has no gaps:
an event's key is `<session>:<seq>`, so a writer can only store seq N+1 once N is stored (a writer
that loses the race for a number gets a duplicate-key error and takes the next one). Whoever sees
event N therefore finds every event before it in the database, which is what lets a stream replay
from the database and go on live, or fill a gap, without losing or repeating anything.

Writers store at least once; each event also has a `key` naming the fact it reports
(`heartbeat:<peer>:<round>:<epoch>`, `status:RUNNING`, `end`, ...), and readers show only the first
event of each key. So two writers racing to report one heartbeat (the monitor, and the coordinator
storing the peer's returned history) cost a second log entry, never a second event on a stream.

After storing, the events are handed to the process's announcer (tasks/feed.py publishes them on
the broker, so every API process hears them); the log, not the announcement, is the record.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any

from bson import ObjectId
from mongoengine import DateTimeField, DictField, Document, IntField, ObjectIdField, StringField
from pymongo.errors import BulkWriteError

from models.db import utcnow

log = logging.getLogger(__name__)

DUPLICATE_KEY = 11000
STATUS, HEARTBEAT, ROUND, PEER, END, TRIAL = "status", "heartbeat", "round", "peer", "end", "trial"
HEARTBEAT_FIELDS = ("peer", "round", "epoch", "epochs", "loss", "accuracy", "val_loss", "val_accuracy", "val_r2",
                    "samples_per_sec", "sent_at")


class SessionEvent(Document):
    """One entry of a session's event log: the `kind` of event, its JSON `data`, its place `seq`."""

    id = StringField(primary_key=True)  # "<session id>:<seq, 10 digits>": unique, so the log has no gaps
    session_id = ObjectIdField(required=True)
    seq = IntField(required=True, min_value=1)
    kind = StringField(required=True, choices=(STATUS, HEARTBEAT, ROUND, PEER, END, TRIAL))
    key = StringField(required=True)
    data = DictField()
    at = DateTimeField(default=utcnow)
    attempt = IntField()  # set when the session is resumed: the attempt it belonged to (None: the current one)

    meta = {"collection": "session_events", "indexes": [("session_id", "seq"), ("session_id", "key")]}


Item = tuple[str, str, dict[str, Any]]  # (kind, key, data)

_announcer: Callable[[list[dict[str, Any]]], None] | None = None
_next: OrderedDict[ObjectId, int] = OrderedDict()  # session -> the seq this process expects to write next
_next_lock = threading.Lock()
_REMEMBERED = 10_000
_FEW = 32


def announce_with(announcer: Callable[[list[dict[str, Any]]], None] | None) -> None:
    """Hand every batch of stored events to `announcer` (None: to nobody)."""
    global _announcer
    _announcer = announcer


def event_id(session_id: ObjectId, seq: int) -> str:
    return f"{session_id}:{seq:010d}"


def _collection():
    return SessionEvent._get_collection()


def last_seq(session_id: ObjectId) -> int:
    """The seq of the session's newest event (0 when it has none)."""
    newest = _collection().find({"session_id": session_id}, {"seq": 1}).sort("seq", -1).limit(1)
    return next((doc["seq"] for doc in newest), 0)


def _expected(session_id: ObjectId) -> int:
    with _next_lock:
        seq = _next.get(session_id)
    return seq if seq is not None else last_seq(session_id) + 1


def _expect(session_id: ObjectId, seq: int | None) -> None:
    with _next_lock:
        if seq is None:
            _next.pop(session_id, None)
            return
        _next[session_id] = seq
        _next.move_to_end(session_id)
        while len(_next) > _REMEMBERED:
            _next.popitem(last=False)


def append(session_id: Any, items: Iterable[Item]) -> list[dict[str, Any]]:
    """Store `items` as the session's next events, in order; returns them as stored (with their seq)."""
    session_id = ObjectId(session_id)
    pending = list(items)
    stored: list[dict[str, Any]] = []
    at = utcnow()
    while pending:
        # This process's guess of the next number saves a read; a wrong guess is a duplicate key.
        first = _expected(session_id)
        docs = [{"_id": event_id(session_id, first + i), "session_id": session_id, "seq": first + i, "kind": kind,
                 "key": key, "data": data, "at": at} for i, (kind, key, data) in enumerate(pending)]
        try:
            _collection().insert_many(docs, ordered=True)
            done = len(docs)
            _expect(session_id, first + done)
        except BulkWriteError as exc:
            if any(error["code"] != DUPLICATE_KEY for error in exc.details["writeErrors"]):
                raise
            # Another writer took the next number: read where the log ends and go on from there.
            done = exc.details["nInserted"]
            _expect(session_id, None)
        stored += docs[:done]
        pending = pending[done:]
    if stored and _announcer is not None:
        try:
            _announcer(stored)
        except Exception:  # stored is what counts: streams find what they missed in the log
            log.exception("announcing %d event(s) of session %s failed", len(stored), session_id)
    return stored


def append_new(session_id: Any, items: Iterable[Item]) -> list[dict[str, Any]]:
    """Append the items whose key the log does not hold yet (a repeated report adds nothing)."""
    session_id = ObjectId(session_id)
    items = list(items)
    if not items:
        return []
    present = keys(session_id, [key for _, key, _ in items])
    fresh, seen = [], set(present)
    for item in items:
        if item[1] not in seen:
            seen.add(item[1])
            fresh.append(item)
    return append(session_id, fresh)


def keys(session_id: ObjectId, among: list[str] | None = None, upto: int | None = None,
         any_attempt: bool = False) -> set[str]:
    """The keys the session's log holds for its current attempt: of `among` only, or of the events up to seq
    `upto`. `any_attempt`: those an earlier attempt of a resumed session logged count too."""
    query: dict[str, Any] = {"session_id": session_id}
    if upto is not None:
        query["seq"] = {"$lte": upto}
    if not any_attempt:
        query["attempt"] = None
    if among is not None and len(among) > _FEW:
        # Many keys (a round's heartbeats, every peer's status): the session's keys of those kinds,
        # matched here, rather than a long $in list.
        query["kind"] = {"$in": sorted({key.split(":", 1)[0] for key in among})}
        wanted = set(among)
        return {doc["key"] for doc in _collection().find(query, {"key": 1, "_id": 0}) if doc["key"] in wanted}
    if among is not None:
        query["key"] = {"$in": among}
    return {doc["key"] for doc in _collection().find(query, {"key": 1, "_id": 0})}


def begin_attempt(session_id: Any) -> int:
    """A resumed session starts a new attempt: the events its log holds so far are marked with the attempt they
    belong to (one update), so the new attempt's status, peer and end events are shown again, and a stream that
    reads the log from the start shows the earlier end as a step, not the end. Returns the attempt ended."""
    session_id = ObjectId(session_id)
    newest = _collection().find({"session_id": session_id, "attempt": {"$ne": None}}, {"attempt": 1}).sort(
        "attempt", -1).limit(1)
    attempt = 1 + next((doc["attempt"] for doc in newest), 0)
    _collection().update_many({"session_id": session_id, "attempt": None}, {"$set": {"attempt": attempt}})
    return attempt


def superseded(event: dict[str, Any]) -> bool:
    """An earlier attempt's end: the session was resumed after it."""
    return event["kind"] == END and event.get("attempt") is not None


def seen_as(event: dict[str, Any]) -> tuple[int | None, str]:
    """What makes two events one fact: their key, within one attempt."""
    return event.get("attempt"), event["key"]


def seq_of(session_id: ObjectId, key: str) -> int:
    """The seq of the first event with `key` of the session's current attempt (0: none)."""
    first = _collection().find({"session_id": session_id, "key": key, "attempt": None}, {"seq": 1}).sort(
        "seq", 1).limit(1)
    return next((doc["seq"] for doc in first), 0)


def after(session_id: ObjectId, seq: int) -> list[dict[str, Any]]:
    """The session's events after `seq`, oldest first."""
    query = {"session_id": session_id, "seq": {"$gt": seq}}
    return list(_collection().find(query, {"seq": 1, "kind": 1, "key": 1, "data": 1, "attempt": 1, "_id": 0})
                .sort("seq", 1))


# --- the events, as the stream shows them ----------------------------------------------------------


def iso(value: datetime | None) -> str | None:
    """A naive UTC datetime (BSON's) as ISO 8601 with its offset, milliseconds precision."""
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.isoformat(timespec="milliseconds")


def status(status: str, reason: str | None = None, at: datetime | None = None) -> Item:
    return STATUS, f"status:{status}", {"status": status, "reason": reason, "at": iso(at or utcnow())}


def end(status: str, reason: str | None = None) -> Item:
    return END, "end", {"status": status, "reason": reason}


def peer(name: str, status: str, error: str | None = None) -> Item:
    return PEER, f"peer:{name}:{status}", {"peer": name, "status": status, "error": error}


def heartbeat(doc: dict[str, Any]) -> Item:
    """The event of a stored heartbeat document."""
    data = {name: doc.get(name) for name in HEARTBEAT_FIELDS}
    data["sent_at"] = iso(data["sent_at"])
    return HEARTBEAT, f"heartbeat:{doc['peer']}:{doc['round']}:{doc['epoch']}", data


def round_(number: int, metrics: dict[str, Any], peers: list[str], rejected: dict[str, Any],
           outliers: dict[str, Any]) -> Item:
    return ROUND, f"round:{number}", {"round": number, "metrics": metrics, "peers": list(peers),
                                      "rejected": dict(rejected), "outliers": dict(outliers)}


def trial(view: dict[str, Any]) -> Item:
    """A searching sweep's trial changed (begun, scored at a rung, ended): its view (models/trial.py)."""
    return TRIAL, f"trial:{view['number']}:{view['status']}:{view['epochs_done']}", view


def record_round(session_id: Any, round_doc: Any) -> None:
    """Append the event of a federated round the coordinator aggregated (a models.Round)."""
    append_new(session_id, [round_(round_doc.round, dict(round_doc.metrics), list(round_doc.peers),
                                   dict(round_doc.rejected), dict(round_doc.outliers))])
