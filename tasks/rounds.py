"""Sending a round of training: one chord of peer `train` tasks with `aggregate` as its body.

The chord's header tasks run on peers, which report their outcomes to the coordinator's results
queue (tasks/collector.py) instead of writing the result backend; the collector joins the chord on
the peers' behalf. So it can rebuild each header task's place in the chord from the coordinator's
own records, each round's chord is recorded on the session (`launch`: round, group id, body id, and
the peers in header order), and its body is built by one function (`chord_body`) used by both.
Tasks are named, not imported: this module is shared by the sweep and federated coordinators.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from functools import cache
from typing import Any

from celery import chord, uuid
from celery.canvas import Signature

from models import TrainingSession, utcnow
from models import heartbeat as heartbeats
from models import session as sessions
from settings import Settings
from tasks import protocol
from tasks.celery import app
from tasks.storage import from_settings
from trainer.model import ModelConfig
from trainer.weights import max_state_bytes

log = logging.getLogger(__name__)

# Longest a round's grants stay valid beyond the training time limit (a task may wait in its queue).
GRANT_SLACK_SECONDS = 600


@cache
def settings() -> Settings:
    return Settings.from_env()


@cache
def storage():
    return from_settings(settings())


def session_prefix(session: TrainingSession) -> str:
    """Where a session's objects live in storage."""
    return f"users/{session.owner_id}/sessions/{session.id}"


def grant_seconds() -> int:
    return settings().train_time_limit + GRANT_SLACK_SECONDS


def grants(data_url: str, weights_key: str, config: ModelConfig, initial_url: str | None = None) -> dict[str, Any]:
    """The spec's doors to storage: read the data (and starting weights), write the weights, nothing else."""
    store, seconds = storage(), grant_seconds()
    return {
        "data": store.grant_read(data_url, seconds),
        "data_id": data_url,  # names the object for the peer's cache; opens nothing
        "initial_weights": store.grant_read(initial_url, seconds) if initial_url else None,
        "weights": store.grant_write(weights_key, seconds, max_state_bytes(config)),
    }


def chord_body(session_id: str, round_: int, body_id: str, size: int) -> Signature:
    """A round's `aggregate` (with its errback), exactly as the chord sends it and the collector rebuilds it."""
    queue = settings().coordinator_queue
    body = app.signature("peertrain.aggregate", args=[session_id, round_], queue=queue, task_id=body_id)
    body.on_error(app.signature("peertrain.round_failed", queue=queue))
    body.chord_size = size
    return body


def launch_round(session: TrainingSession, round_: int, specs: list[dict[str, Any]]) -> None:
    """Send one chord: a `train` per spec on its peer's queue, then `aggregate` on the coordinator."""
    names = [spec["peer"] for spec in specs]
    task_ids = {name: uuid() for name in names}
    now = utcnow()
    launch = {"round": round_, "group": uuid(), "body": f"aggregate:{session.id}:{round_}:{uuid()}",
              "peers": names, "started_at": now,
              # Past this, the monitor leaves out the peers that have not reported (tasks/monitor.py).
              "deadline": now + timedelta(seconds=session.round_timeout) if session.round_timeout else None}
    if round_ == 0:
        if not sessions.start_running(session.id, task_ids, launch, deadline_seconds=_deadline(session)):
            log.info("session %s was ended before it started", session.id)
            return
    elif not sessions.next_round(session.id, round_, task_ids, launch):
        return
    header = [
        app.signature("peertrain.train", args=[{k: v for k, v in spec.items() if k != "peer"}],
                      queue=protocol.task_queue(spec["peer"]), task_id=task_ids[spec["peer"]],
                      # Events (task-sent, task-received) carry this instead of the spec's grants.
                      argsrepr=f"(session {session.id}, round {round_}, peer {spec['peer']})", kwargsrepr="{}",
                      expires=grant_seconds())
        for spec in specs
    ]
    body = chord_body(str(session.id), round_, launch["body"], len(header))
    # The chord's own task id is its header group's id (the body keeps its own).
    chord(header, task_id=launch["group"])(body)


def _deadline(session: TrainingSession) -> int:
    rounds = session.federated.get("rounds", 1) if session.mode == sessions.FEDERATED else 1
    # Each round may use a training task's whole time limit; past that the session cannot succeed.
    return rounds * (settings().train_time_limit + 60)


def record_result(session: TrainingSession, result: dict[str, Any], status: str, samples: int) -> None:
    """Store a peer's (collector-checked) result: final metrics, its sample count, every epoch's heartbeat."""
    final = result["final"]
    progress = {key: final.get(key) for key in ("epoch", "epochs", "loss", "accuracy", "val_loss", "val_accuracy",
                                                  "val_r2", "samples_per_sec") if key in final}
    sessions.record_peer_result(session.id, result["peer"], status, final=final, samples=samples,
                                round=result["round"], **progress)
    # A federated peer fetches its shard once and keeps it for later rounds: bytes add up.
    sessions.add_bytes_fetched(session.id, result["peer"], result["bytes_fetched"])
    heartbeats.insert_many(
        {"session_id": session.id, "peer": result["peer"], "round": result["round"],
         **{key: epoch.get(key) for key in heartbeats.METRICS}, "epoch": epoch["epoch"]}
        for epoch in result["history"]
    )
