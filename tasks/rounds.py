"""Sending a round of training: one chord of peer `train` tasks with `aggregate` as its body.

Each header task carries a one-argument errback, `peer_failed`, which Celery sends as a message to
the coordinator's queue the moment that task fails, so one failing peer ends the session within a
second instead of when the slowest peer finishes. (An errback with more arguments would run inside
the failing peer, which has no database.) The body's own errback, `round_failed`, covers the rest.
Tasks are named, not imported: this module is shared by the sweep and federated coordinators.
"""

from __future__ import annotations

import logging
from functools import cache
from typing import Any

from celery import chord, uuid

from models import TrainingSession
from models import heartbeat as heartbeats
from models import session as sessions
from models.peer import queue_for
from settings import Settings
from tasks.celery import app
from tasks.storage import from_settings

log = logging.getLogger(__name__)


@cache
def settings() -> Settings:
    return Settings.from_env()


@cache
def storage():
    return from_settings(settings())


def session_prefix(session: TrainingSession) -> str:
    """Where a session's objects live in storage."""
    return f"users/{session.owner_id}/sessions/{session.id}"


def launch_round(session: TrainingSession, round_: int, specs: list[dict[str, Any]]) -> None:
    """Send one chord: a `train` per spec on its peer's queue, then `aggregate` on the coordinator."""
    task_ids = {spec["peer"]: uuid() for spec in specs}
    if round_ == 0:
        if not sessions.start_running(session.id, task_ids, deadline_seconds=_deadline(session)):
            log.info("session %s was ended before it started", session.id)
            return
    elif not sessions.next_round(session.id, round_, task_ids):
        return
    queue = settings().coordinator_queue
    header = [
        app.signature("peertrain.train", args=[spec], queue=queue_for(spec["peer"]), task_id=task_ids[spec["peer"]])
        .on_error(app.signature("peertrain.peer_failed", queue=queue))
        for spec in specs
    ]
    # The body's id names its session and round, so its errback (which gets only that id) can find them.
    body = app.signature("peertrain.aggregate", args=[str(session.id), round_], queue=queue,
                         task_id=f"aggregate:{session.id}:{round_}:{uuid()}")
    chord(header)(body.on_error(app.signature("peertrain.round_failed", queue=queue)))


def _deadline(session: TrainingSession) -> int:
    rounds = session.federated.get("rounds", 1) if session.mode == sessions.FEDERATED else 1
    # Each round may use a training task's whole time limit; past that the session cannot succeed.
    return rounds * (settings().train_time_limit + 60)


def record_result(session: TrainingSession, result: dict[str, Any], status: str) -> None:
    """Store a peer's returned result: final metrics, where its weights are, and every epoch's heartbeat."""
    final = result["final"]
    progress = {key: final.get(key) for key in ("epoch", "epochs", "loss", "accuracy", "val_loss", "val_accuracy",
                                                  "val_r2", "samples_per_sec") if key in final}
    # The epochs first: the event stream shows a peer's heartbeats before its result.
    heartbeats.insert_many(
        {"session_id": session.id, "peer": result["peer"], "round": result["round"],
         **{key: epoch.get(key) for key in heartbeats.METRICS}, "epoch": epoch["epoch"]}
        for epoch in result.get("history", [])
    )
    sessions.record_peer_result(
        session.id, result["peer"], status, final=final, samples=result["samples"], round=result["round"],
        weights_url=result.get("weights_url"), **progress,
    )
    # A federated peer fetches its shard once and keeps it for later rounds: bytes add up.
    sessions.add_bytes_fetched(session.id, result["peer"], result["bytes_fetched"])
