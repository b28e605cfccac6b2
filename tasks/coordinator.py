"""The coordinator: runs sessions as chords of peer `train` tasks and owns their lifecycle in MongoDB.

`run_session` launches a session's first round (tasks/rounds.py builds the chord: one `train` per
claimed peer, routed to that peer's queue, with `aggregate` as its body); `aggregate` ends a sweep
(tasks/sweep.py) or hands a federated round to tasks/federated.py. When a peer is lost — its task
reports a failure (the result collector), or the monitor finds it gone or past the round's deadline —
`peer_lost` counts a `left_out` marker for it in the chord and leaves it out while the session's
quorum (`min_peers`) allows, or fails the session at once; the round then closes with the results it
has. `round_failed` (the body's errback) covers an `aggregate` that itself failed.
Only the platform's own processes can send these tasks: peers cannot publish to the coordinator's queue.

Every task here is acknowledged after it ran and runs again when its worker died mid-way, so each is
safe to run twice: they act through conditional updates (a round is recorded once, launched once, a
session ends once). Storage and broker errors are retried with backoff before a session fails.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from celery.result import AsyncResult
from celery.signals import worker_init, worker_process_init, worker_ready
from kombu.exceptions import OperationalError

import models
from models import TrainingSession
from models import session as sessions
from tasks import buffered, federated, lifecycle, sweep
from tasks.celery import app
from tasks.collector import Collector, left_out
from tasks.rounds import launch_round, settings
from tasks.storage import StorageError
from trainer.warmup import warm_up

log = logging.getLogger(__name__)

# What a coordinator task needs: run again if its worker dies, retried a few times on a passing fault.
RELIABLE = {"shared": False, "acks_late": True, "reject_on_worker_lost": True}
TRANSIENT = {"autoretry_for": (StorageError, OperationalError), "retry_backoff": 1, "retry_backoff_max": 30,
             "retry_jitter": True, "max_retries": 5}


@worker_process_init.connect
def _reconnect(**_: Any) -> None:
    # A forked pool process must not share the parent's MongoDB sockets: connect afresh. (The solo
    # pool sends this signal too, in the worker's own process: mongomock's data lives in its client.)
    uri = settings().mongodb_uri
    if not uri.startswith(models.db.MOCK_SCHEME):
        models.disconnect()
        models.connect(uri)


@worker_ready.connect
def _reconcile(sender: Any = None, **_: Any) -> None:
    """A coordinator that starts gives back the peers held for sessions that ended while it was away."""
    if sender is None or sender.app is not app:
        return
    models.ensure_connected(settings().mongodb_uri)
    active = list(TrainingSession.objects(status__in=sessions.ACTIVE).scalar("id"))
    if released := models.peer.release_orphans(active):
        log.info("released %d peer(s) held for sessions that had ended", released)


@worker_init.connect
def _warm_up(**_: Any) -> None:
    # Before the pool forks: every pool process starts with torch and pandas warm, so the first
    # session's first aggregate is as fast as the next session's.
    warm_up()
    # A round's work here is small (averaging, one evaluation) and shares its machine with peers:
    # torch's default of a thread per core made it 5-50x slower whenever peers were training.
    torch.set_num_threads(1)


def _session(session_id: str) -> TrainingSession | None:
    models.ensure_connected(settings().mongodb_uri)
    return TrainingSession.objects(id=session_id).first()


@app.task(name="peertrain.run_session", **RELIABLE, **TRANSIENT)
def run_session(session_id: str) -> None:
    """Launch a PENDING session's first chord; ends it FAILED if it cannot be launched."""
    session = _session(session_id)
    if session is None or session.status != sessions.PENDING:
        log.info("session %s is gone or no longer pending; nothing to run", session_id)
        return
    try:
        if buffered.is_async(session):
            buffered.start(session)
        elif session.mode == sessions.FEDERATED:
            federated.start(session)
        else:
            launch_round(session, 0, sweep.specs(session))
            # While the peers train: read the validation rows the models will be scored on.
            sweep.prepared(session)
    except (StorageError, OperationalError):
        raise  # retried
    except Exception as exc:
        lifecycle.end(session_id, sessions.FAILED, f"the coordinator could not start the session: {exc}")
        raise


@app.task(name="peertrain.aggregate", **RELIABLE, **TRANSIENT)
def aggregate(results: list[dict[str, Any]], session_id: str, round_: int = 0) -> None:
    """The chord's body: every peer reported or was left out; record the round and end (or continue) the session."""
    session = _session(session_id)
    if session is None or session.finished or session.launch.get("round") != round_:
        return
    kept = []
    for result in results:
        if "left_out" in result:
            run = session.peer(result["peer"])
            if run.status != sessions.FAILED and give_up_on(session, run, result["left_out"]):
                return
        else:
            kept.append(result)
    if len(kept) < session.quorum:
        lifecycle.end(session.id, sessions.FAILED, f"round {round_}: {len(kept)} peer(s) finished, "
                                                   f"{session.quorum} needed")
        return
    if session.mode == sessions.FEDERATED:
        federated.aggregate_round(session, round_, kept)
    else:
        sweep.finish(session, kept)


def give_up_on(session: TrainingSession, run: models.PeerRun, reason: str) -> bool:
    """Leave `run`'s peer out (FAILED with `reason`), or end the session if it cannot go on; True if ended."""
    sessions.record_peer_result(session.id, run.name, sessions.FAILED, error=reason)
    lifecycle.request_stop(str(session.id), [run.name], reason)
    if session.can_lose(run.name):
        log.warning("session %s goes on without peer %s: %s", session.id, run.name, reason)
        run.status = sessions.FAILED
        return False
    return lifecycle.end(session.id, sessions.FAILED, f"peer {run.name} {reason}")


@app.task(name="peertrain.peer_lost", **RELIABLE)
def peer_lost(session_id: str, peer: str, round_: int, reason: str) -> None:
    """A peer will not report this round (its task failed, it went offline, it is past the deadline)."""
    session = _session(session_id)
    if session is not None and not session.finished and buffered.is_async(session):
        run = next((r for r in session.peers if r.name == peer), None)
        # No rounds: whatever task it had out is given up on, its share of the budget goes to the others.
        if run is not None and run.status != sessions.FAILED and not give_up_on(session, run, reason):
            buffered.lost(session, peer, reason)
        return
    if session is None or session.finished or session.launch.get("round") != round_:
        return
    run = next((r for r in session.peers if r.name == peer), None)
    if run is None or run.status == sessions.FAILED or peer not in session.launch.get("peers", []):
        return
    reported = AsyncResult(run.task_id, app=app)
    if not reported.ready():
        # Its part of the chord, so the round closes when the others have reported; a late result
        # finds the task settled and is dropped.
        Collector(app).settle(session.id, session.launch, run.task_id, peer, left_out(peer, round_, reason))
    elif "left_out" not in (reported.result or {}):
        return  # it reported in time after all
    give_up_on(session, run, reason)


@app.task(name="peertrain.update", bind=True, **RELIABLE, **TRANSIENT)
def update(self, session_id: str, task_id: str, result: dict[str, Any]) -> None:
    """An asynchronous session's peer reported (the collector checked it): buffer, fold, hand it its next task."""
    session = _session(session_id)
    if session is None or session.finished:
        return
    try:
        buffered.receive(session, task_id, result)
    except (StorageError, OperationalError):
        raise  # retried
    except Exception as exc:
        lifecycle.end(session_id, sessions.FAILED, f"the coordinator could not take an update: "
                                                   f"{type(exc).__name__}: {exc}")
        raise
    if buffered.stalled(session.id):
        # Whoever holds the fold lease looks again when it lets go; if it died holding it, this run
        # comes back once the lease has expired and does the work itself.
        raise self.retry(countdown=buffered.LEASE_SECONDS / 2, max_retries=12)


@app.task(name="peertrain.round_failed", **RELIABLE)
def round_failed(task_id: str) -> None:
    """Errback of a chord's body: aggregating the round failed."""
    _, session_id, round_, _ = task_id.split(":")
    session = _session(session_id)
    if session is None or session.finished:
        return
    error = AsyncResult(task_id, app=app).result
    lifecycle.end(session.id, sessions.FAILED, f"aggregating round {round_} failed: {type(error).__name__}: {error}")


@app.task(name="peertrain.cancel_session", **RELIABLE)
def cancel_session(session_id: str) -> None:
    """The user cancelled: stop the peers and release them."""
    if _session(session_id) is not None:
        lifecycle.end(session_id, sessions.CANCELLED, "cancelled by the user")
