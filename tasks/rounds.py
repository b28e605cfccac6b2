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


def grants(data_url: str, weights_key: str, config: ModelConfig, initial_url: str | None = None,
           initial_grant: str | None = None) -> dict[str, Any]:
    """The spec's doors to storage: read the data (and starting weights), write the weights, nothing else.

    `initial_grant`: a read grant of the starting weights made once for every peer of a round (they
    all start from the same global weights), instead of one per peer from `initial_url`."""
    store, seconds = storage(), grant_seconds()
    if initial_grant is None and initial_url:
        initial_grant = store.grant_read(initial_url, seconds)
    return {
        "data": store.grant_read(data_url, seconds),
        "data_id": data_url,  # names the object for the peer's cache; opens nothing
        "initial_weights": initial_grant,
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
    # Named after their session, so the collector reads one session by its id for each result.
    task_ids = {name: f"{session.id}:{round_}:{uuid()}" for name in names}
    position = sessions.positions(session)
    now = utcnow()
    launch = {"round": round_, "group": uuid(), "body": f"aggregate:{session.id}:{round_}:{uuid()}",
              "peers": names, "started_at": now,
              # Past this, the monitor leaves out the peers that have not reported (tasks/monitor.py).
              "deadline": now + timedelta(seconds=session.round_timeout) if session.round_timeout else None}
    if round_ == 0:
        if not sessions.start_running(session.id, task_ids, launch, deadline_seconds=_deadline(session),
                                      position=position):
            log.info("session %s was ended before it started", session.id)
            return
    elif not sessions.next_round(session.id, round_, task_ids, launch, position):
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
    # The chord's own task id is its header group's id (the body keeps its own); its group sends every
    # header task through one producer.
    chord(header, task_id=launch["group"])(body)


def _deadline(session: TrainingSession) -> int:
    rounds = session.federated.get("rounds", 1) if session.mode == sessions.FEDERATED else 1
    # Each round may use a training task's whole time limit; past that the session cannot succeed.
    return rounds * (settings().train_time_limit + 60)


PROGRESS = ("epoch", "epochs", "loss", "accuracy", "val_loss", "val_accuracy", "val_r2", "samples_per_sec")


def record_results(session: TrainingSession, results: list[dict[str, Any]], status: str,
                   samples: dict[str, int]) -> None:
    """Store peers' (collector-checked) results: final metrics, sample counts, every epoch's heartbeat.

    A round's results in one insert of heartbeats and one update of the session, however many peers."""
    if not results:
        return
    # The epochs first: the event stream shows a peer's heartbeats before its result.
    heartbeats.insert_many(
        {"session_id": session.id, "peer": result["peer"], "round": result["round"],
         **{key: epoch.get(key) for key in heartbeats.METRICS}, "epoch": epoch["epoch"]}
        for result in results for epoch in result["history"]
    )
    changes = {}
    for result in results:
        final = result["final"]
        changes[result["peer"]] = {"status": status, "final": final, "samples": samples[result["peer"]],
                                   "round": result["round"], **{k: final.get(k) for k in PROGRESS if k in final}}
    # A federated peer fetches its shard once and keeps it for later rounds: bytes add up.
    sessions.record_runs(session.id, sessions.positions(session), changes,
                         before={run.name: run.status for run in session.peers},
                         added={r["peer"]: {"bytes_fetched": r["bytes_fetched"]} for r in results})
