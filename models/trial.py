"""A searching sweep's trials: one configuration each, trained a stretch at a time on one peer.

A trial is made when a peer is free for it (WAITING until its first task is sent), RUNNING while its
stretches train, and ends once: COMPLETED (all its epochs trained), PRUNED (the pruner stopped it at a
rung, or the session's time ran out), or FAILED (its task failed, or its model could not be used). Its
`scores` are the coordinator's own, on the held-out rows, one per rung; `curve` is what the peer reported
per epoch (drawn, never decided on). `value` is its best score, at `best_epoch`. Every move is a
conditional update on the task it answers (`seq`), so a redelivered result changes nothing. These
documents are the search's study: the coordinator rebuilds the sampler's view from them (tasks/search.py).
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
    ListField,
    NotUniqueError,
    ObjectIdField,
    StringField,
)
from pymongo import ReturnDocument

from models.db import utcnow

WAITING = "WAITING"
RUNNING = "RUNNING"
COMPLETED = "COMPLETED"
PRUNED = "PRUNED"
FAILED = "FAILED"
STATUSES = (WAITING, RUNNING, COMPLETED, PRUNED, FAILED)
OPEN = (WAITING, RUNNING)


class Trial(Document):
    """One configuration of a searching sweep and what became of it."""

    session_id = ObjectIdField(required=True)
    number = IntField(required=True, min_value=0)
    peer = StringField(required=True)
    params = DictField()  # what the sampler chose (the space's fixed settings are on the session)
    hyperparameters = DictField()  # all the settings the peer trains with
    status = StringField(choices=STATUSES, default=WAITING)
    epochs = IntField(required=True, min_value=1)
    until = IntField()  # the epoch its current task pauses after
    epochs_done = IntField(default=0)  # epochs trained and scored
    seq = IntField(required=True)  # its current task's number in the session (also the task's `round`)
    task_id = StringField(required=True)
    sent = BooleanField(default=False)
    tasks = IntField(default=1)
    scores = ListField(DictField())  # [{epoch, value, val_loss}] on the held-out rows, by the coordinator
    value = FloatField()
    val_loss = FloatField()  # at its best score: the tie-breaker
    best_epoch = IntField()
    curve = ListField(DictField())  # [{epoch, loss, val_loss, metric}] as its peer reported them
    seconds = FloatField(default=0.0)  # its peer's training time, all its tasks
    system_attrs = DictField()  # the pruner's own notes on the trial (successive halving's rungs)
    model_url = StringField()  # its model at its best score
    reason = StringField()
    started_at = DateTimeField(default=utcnow)
    finished_at = DateTimeField()

    meta = {"collection": "trials",
            "indexes": [{"fields": ["session_id", "number"], "unique": True}, ("session_id", "seq")]}


def _collection():
    return Trial._get_collection()


def create(session_id: ObjectId, number: int, peer: str, params: dict[str, Any], hyperparameters: dict[str, Any],
           epochs: int, until: int, seq: int, task_id: str) -> bool:
    """Record trial `number`, WAITING for its first task; False if it exists (a run again of the same step)."""
    try:
        Trial(session_id=session_id, number=number, peer=peer, params=params, hyperparameters=hyperparameters,
              epochs=epochs, until=until, seq=seq, task_id=task_id).save(force_insert=True)
    except NotUniqueError:  # the (session, number) index: this number was taken
        return False
    return True


def of_session(session_id: ObjectId) -> list[dict[str, Any]]:
    """The session's trials, by number, as stored."""
    return list(_collection().find({"session_id": session_id}).sort("number", 1))


def of_task(session_id: ObjectId, seq: int) -> dict[str, Any] | None:
    """The trial whose current task is task `seq`."""
    return _collection().find_one({"session_id": session_id, "seq": seq})


def open_of(session_id: ObjectId, peer: str) -> dict[str, Any] | None:
    """The trial `peer` is training now, if any."""
    return _collection().find_one({"session_id": session_id, "peer": peer, "status": {"$in": list(OPEN)}})


def count_open(session_id: ObjectId) -> int:
    return _collection().count_documents({"session_id": session_id, "status": {"$in": list(OPEN)}})


def unsent(session_id: ObjectId) -> list[dict[str, Any]]:
    """Trials whose current task was recorded and not handed to the broker (its sender died in between)."""
    return list(_collection().find({"session_id": session_id, "status": {"$in": list(OPEN)}, "sent": False}))


def mark_sent(session_id: ObjectId, seq: int) -> None:
    _collection().update_one({"session_id": session_id, "seq": seq},
                             {"$set": {"sent": True, "status": RUNNING}})


def scored(session_id: ObjectId, number: int, seq: int, epoch: int, score: dict[str, Any], curve: list[dict[str, Any]],
           seconds: float, best: dict[str, Any] | None) -> dict[str, Any] | None:
    """Record task `seq`'s stretch (scored `score` at `epoch`; `best`: its new best, if it is one); the trial
    after it, or None if that task was recorded already."""
    sets: dict[str, Any] = {"epochs_done": epoch}
    if best is not None:
        sets.update(best)
    return _collection().find_one_and_update(
        {"session_id": session_id, "number": number, "seq": seq, "status": RUNNING, "epochs_done": {"$lt": epoch}},
        {"$set": sets, "$push": {"scores": score, "curve": {"$each": curve}}, "$inc": {"seconds": seconds}},
        return_document=ReturnDocument.AFTER)


def next_task(session_id: ObjectId, number: int, seq: int, next_seq: int, task_id: str, until: int,
              system_attrs: dict[str, Any]) -> bool:
    """Move trial `number` from task `seq` to its next one (recorded, not yet sent); False if done already."""
    return bool(_collection().update_one(
        {"session_id": session_id, "number": number, "seq": seq, "status": {"$in": list(OPEN)}},
        {"$set": {"seq": next_seq, "task_id": task_id, "until": until, "sent": False, "system_attrs": system_attrs},
         "$inc": {"tasks": 1}}).modified_count)


def end(session_id: ObjectId, number: int, status: str, at: datetime, reason: str | None = None,
        seq: int | None = None, system_attrs: dict[str, Any] | None = None) -> bool:
    """End trial `number` (while it is open, and on task `seq` if given) once; False if it had ended."""
    query: dict[str, Any] = {"session_id": session_id, "number": number, "status": {"$in": list(OPEN)}}
    if seq is not None:
        query["seq"] = seq
    sets: dict[str, Any] = {"status": status, "finished_at": at, "reason": reason}
    if system_attrs is not None:
        sets["system_attrs"] = system_attrs
    return bool(_collection().update_one(query, {"$set": sets}).modified_count)


def end_open(session_id: ObjectId, status: str, at: datetime, reason: str) -> int:
    """End every open trial of a session (it ended); how many."""
    return _collection().update_many({"session_id": session_id, "status": {"$in": list(OPEN)}},
                                     {"$set": {"status": status, "finished_at": at, "reason": reason}}).modified_count


def failures_of(session_id: ObjectId, peer: str) -> int:
    """How many of a session's trials failed on `peer`."""
    return _collection().count_documents({"session_id": session_id, "peer": peer, "status": FAILED})


def best(session_id: ObjectId) -> dict[str, Any] | None:
    """The trial with the best score (then the lowest held-out loss at it, then the fewest epochs, then the
    first): the session's winner."""
    found = [t for t in of_session(session_id) if t.get("value") is not None]
    return min(found, key=rank) if found else None


def rank(trial: dict[str, Any]) -> tuple[float, float, int, int]:
    """A trial's place: best score first; ties go to the lower held-out loss, then fewer epochs, then the first."""
    value = trial.get("value")
    loss = trial.get("val_loss")
    return (-value if value is not None else float("inf"), loss if loss is not None else float("inf"),
            trial.get("best_epoch") or 0, trial["number"])


def view(trial: dict[str, Any]) -> dict[str, Any]:
    """A trial as the API, the event stream and the CLI show it."""
    return {"number": trial["number"], "peer": trial["peer"], "params": dict(trial.get("params") or {}),
            "hyperparameters": dict(trial.get("hyperparameters") or {}), "status": trial["status"],
            "value": trial.get("value"), "val_loss": trial.get("val_loss"), "best_epoch": trial.get("best_epoch"),
            "epochs_done": trial.get("epochs_done", 0), "epochs": trial["epochs"],
            "scores": list(trial.get("scores") or []), "seconds": trial.get("seconds"), "reason": trial.get("reason")}
