"""The coordinator: runs sessions as chords of peer `train` tasks and owns their lifecycle in MongoDB.

One `run_session` per session builds the chord (one `train` per claimed peer, routed to that
peer's queue) with `aggregate` as its body. Each header task carries a one-argument errback,
`peer_failed`, which Celery sends as a message to the coordinator's queue the moment that task
fails, so one failing peer ends the session within a second instead of when the slowest peer
finishes. (An errback with more arguments would run inside the failing peer, which has no database.)
"""

from __future__ import annotations

import logging
from functools import cache
from typing import Any

from celery import chord, uuid
from celery.result import AsyncResult

import models
from models import TrainingSession
from models import heartbeat as heartbeats
from models import session as sessions
from models.peer import queue_for
from settings import Settings
from tasks import lifecycle
from tasks.celery import app

log = logging.getLogger(__name__)


@cache
def settings() -> Settings:
    return Settings.from_env()


def _session(session_id: str) -> TrainingSession | None:
    models.ensure_connected(settings().mongodb_uri)
    return TrainingSession.objects(id=session_id).first()


def session_prefix(session: TrainingSession) -> str:
    """Where a session's objects live in storage."""
    return f"users/{session.owner_id}/sessions/{session.id}"


@app.task(name="peertrain.run_session")
def run_session(session_id: str) -> None:
    """Launch a PENDING session's first chord; ends it FAILED if it cannot be launched."""
    session = _session(session_id)
    if session is None or session.status != sessions.PENDING:
        log.info("session %s is gone or no longer pending; nothing to run", session_id)
        return
    try:
        if session.mode == sessions.FEDERATED:
            from tasks import federated

            federated.start(session)
        else:
            launch_round(session, 0, [sweep_spec(session, run) for run in session.peers])
    except Exception as exc:
        lifecycle.end(session_id, sessions.FAILED, f"the coordinator could not start the session: {exc}")
        raise


def sweep_spec(session: TrainingSession, run: models.PeerRun) -> dict[str, Any]:
    """The `train` task's argument for one peer of a sweep: the whole dataset, its own hyperparameters."""
    return {
        "session": str(session.id),
        "peer": run.name,
        "round": 0,
        "data_url": session.dataset.url,
        "target": session.target,
        "features": list(session.features),
        "task": session.task,
        "classes": session.dataset.classes,
        "validation_fraction": 0.2,
        "seed": session.seed,
        "hyperparameters": dict(run.hyperparameters),
        "weights_key": f"{session_prefix(session)}/peers/{run.name}/model.safetensors",
    }


def launch_round(session: TrainingSession, round_: int, specs: list[dict[str, Any]]) -> None:
    """Send one chord: a `train` per spec on its peer's queue, then `aggregate` on the coordinator."""
    task_ids = {spec["peer"]: uuid() for spec in specs}
    if round_ == 0:
        if not sessions.start_running(session.id, task_ids, deadline_seconds=_deadline(session)):
            log.info("session %s was ended before it started", session.id)
            return
    elif not sessions.next_round(session.id, round_, task_ids):
        return
    header = [
        app.signature("peertrain.train", args=[spec], queue=queue_for(spec["peer"]),
                      task_id=task_ids[spec["peer"]]).on_error(peer_failed.s())
        for spec in specs
    ]
    body = aggregate.s(str(session.id), round_).set(queue=settings().coordinator_queue)
    chord(header)(body)


def _deadline(session: TrainingSession) -> int:
    rounds = session.federated.get("rounds", 1) if session.mode == sessions.FEDERATED else 1
    # Each round may use a training task's whole time limit; past that the session cannot succeed.
    return rounds * (settings().train_time_limit + 60)


@app.task(name="peertrain.aggregate")
def aggregate(results: list[dict[str, Any]], session_id: str, round_: int = 0) -> None:
    """The chord's body: every peer finished; record their results and end (or continue) the session."""
    session = _session(session_id)
    if session is None or session.finished:
        return
    if session.mode == sessions.FEDERATED:
        from tasks import federated

        federated.aggregate_round(session, round_, results)
        return
    for result in results:
        record_result(session, result, sessions.COMPLETED)
    summary = compare(session.task, results)
    lifecycle.end(session.id, sessions.COMPLETED, results=summary,
                  model_url=next(r["weights_url"] for r in results if r["peer"] == summary["best_peer"]))


def record_result(session: TrainingSession, result: dict[str, Any], status: str) -> None:
    """Store a peer's returned result: final metrics, where its weights are, and every epoch's heartbeat."""
    final = result["final"]
    progress = {key: final.get(key) for key in ("epoch", "epochs", "loss", "accuracy", "val_loss", "val_accuracy",
                                                  "val_r2", "samples_per_sec") if key in final}
    sessions.record_peer_result(
        session.id, result["peer"], status, final=final, samples=result["samples"], round=result["round"],
        weights_url=result.get("weights_url"), bytes_fetched=result["bytes_fetched"], **progress,
    )
    heartbeats.insert_many(
        {"session_id": session.id, "peer": result["peer"], "round": result["round"],
         **{key: epoch.get(key) for key in heartbeats.METRICS}, "epoch": epoch["epoch"]}
        for epoch in result.get("history", [])
    )


def compare(task: str, results: list[dict[str, Any]]) -> dict[str, Any]:
    """Rank a sweep's peers on validation data: accuracy (classification) or R² (regression)."""
    metric = "val_accuracy" if task == "classification" else "val_r2"

    def score(result: dict[str, Any]) -> tuple[float, float]:
        final = result["final"]
        value = final.get(metric)
        loss = final.get("val_loss")
        return (value if value is not None else float("-inf"), -loss if loss is not None else float("-inf"))

    best = max(results, key=score)
    return {
        "metric": metric,
        "best_peer": best["peer"],
        "best_value": best["final"].get(metric),
        "peers": {r["peer"]: {metric: r["final"].get(metric), "val_loss": r["final"].get("val_loss"),
                              "seconds": r["seconds"], "samples_per_sec": r["final"].get("samples_per_sec")}
                  for r in results},
    }


@app.task(name="peertrain.peer_failed")
def peer_failed(task_id: str) -> None:
    """Errback of a peer's `train` task: end its session FAILED, naming the peer and the error."""
    models.ensure_connected(settings().mongodb_uri)
    session = sessions.by_task_id(task_id)
    if session is None or session.finished:
        return  # already ended (errbacks can fire twice on a hard time limit)
    run = next(r for r in session.peers if r.task_id == task_id)
    error = AsyncResult(task_id, app=app).result
    message = f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else str(error)
    sessions.record_peer_result(session.id, run.name, sessions.FAILED, error=message)
    if session.mode == sessions.FEDERATED:
        from tasks import federated

        if federated.tolerate(session, run.name):
            return
    lifecycle.end(session.id, sessions.FAILED, f"peer {run.name} failed: {message}")


@app.task(name="peertrain.cancel_session")
def cancel_session(session_id: str) -> None:
    """The user cancelled: stop the peers and release them."""
    if _session(session_id) is not None:
        lifecycle.end(session_id, sessions.CANCELLED, "cancelled by the user")
