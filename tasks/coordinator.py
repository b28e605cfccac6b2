"""The coordinator: runs sessions as chords of peer `train` tasks and owns their lifecycle in MongoDB.

`run_session` launches a session's first round (tasks/rounds.py builds the chord: one `train` per
claimed peer, routed to that peer's queue, with `aggregate` as its body); `aggregate` ends a sweep
(tasks/sweep.py) or hands a federated round to tasks/federated.py. When a peer is lost — its task
reports a failure (`peer_failed`, sent by the result collector), or the monitor finds it gone or past
the round's deadline (`peer_lost`) — it is left out while the session's quorum (`min_peers`) allows,
and the session fails otherwise; `round_failed` then finishes the round with the results it has.
Only the platform's own processes can send these tasks: peers cannot publish to the coordinator's queue.

Every task here is acknowledged after it ran and runs again when its worker died mid-way, so each is
safe to run twice: they act through conditional updates (a round is recorded once, launched once, a
session ends once). Storage and broker errors are retried with backoff before a session fails.
"""

from __future__ import annotations

import logging
from typing import Any

from celery.exceptions import ChordError
from celery.result import AsyncResult
from celery.signals import worker_process_init
from kombu.exceptions import OperationalError

import models
from models import TrainingSession
from models import session as sessions
from tasks import federated, lifecycle, sweep
from tasks.celery import app
from tasks.collector import Collector, PeerTaskError
from tasks.rounds import launch_round, settings
from tasks.storage import StorageError

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
        if session.mode == sessions.FEDERATED:
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
    """The chord's body: every peer finished; record their results and end (or continue) the session."""
    session = _session(session_id)
    if session is None or session.finished:
        return
    if session.mode == sessions.FEDERATED:
        federated.aggregate_round(session, round_, results)
    elif session.launch.get("round") == round_:
        sweep.finish(session, results)


def give_up_on(session: TrainingSession, run: models.PeerRun, reason: str) -> bool:
    """Leave `run`'s peer out (FAILED with `reason`), or end the session if it cannot go on; True if ended."""
    sessions.record_peer_result(session.id, run.name, sessions.FAILED, error=reason)
    lifecycle.request_stop(str(session.id), [run.name], reason)
    if session.can_lose(run.name):
        log.warning("session %s goes on without peer %s: %s", session.id, run.name, reason)
        run.status = sessions.FAILED
        return False
    return lifecycle.end(session.id, sessions.FAILED, f"peer {run.name} {reason}")


@app.task(name="peertrain.peer_failed", **RELIABLE)
def peer_failed(task_id: str) -> None:
    """A peer reported its `train` task failed: leave it out, or end the session naming it and the error."""
    models.ensure_connected(settings().mongodb_uri)
    session = sessions.by_task_id(task_id)
    if session is None or session.finished:
        return  # already ended
    run = sessions.run_of_task(session, task_id)
    if run is not None and run.status != sessions.FAILED:
        give_up_on(session, run, f"failed: {_error(run)}")


@app.task(name="peertrain.peer_lost", **RELIABLE)
def peer_lost(session_id: str, peer: str, round_: int, reason: str) -> None:
    """The monitor's evidence that a peer will not report this round (gone offline, past the deadline)."""
    session = _session(session_id)
    if session is None or session.finished or session.launch.get("round") != round_:
        return
    run = next((r for r in session.peers if r.name == peer), None)
    if run is None or run.status == sessions.FAILED or peer not in session.launch.get("peers", []):
        return
    if AsyncResult(run.task_id, app=app).ready():
        return  # it reported meanwhile
    # Count its part of the chord as failed, so the round closes when the others have reported; its
    # late result, if it ever comes, finds the task settled and is dropped.
    Collector(app).settle(session, run, error=reason)
    if not give_up_on(session, run, reason):
        return
    log.info("session %s ended: peer %s %s", session_id, peer, reason)


def _error(run: models.PeerRun) -> str:
    error = AsyncResult(run.task_id, app=app).result
    if isinstance(error, PeerTaskError):
        return str(error)  # the peer's own account: "ValueError: ..."
    return f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else str(error)


@app.task(name="peertrain.round_failed", **RELIABLE)
def round_failed(task_id: str) -> None:
    """Errback of a chord's body: a peer was left out (the body never ran) or aggregating itself failed."""
    _, session_id, round_, _ = task_id.split(":")
    session = _session(session_id)
    if session is None or session.finished or session.launch.get("round") != int(round_):
        return  # the common case: the failing peer ended it already
    result = AsyncResult(task_id, app=app)
    # A body that ran and raised has its failure stored before its errbacks are sent; a chord whose
    # header failed calls them before storing anything.
    if result.state == "FAILURE" and not isinstance(result.result, ChordError):
        error = result.result
        lifecycle.end(session.id, sessions.FAILED,
                      f"aggregating round {round_} failed: {type(error).__name__}: {error}")
        return
    # The failed peer's report (peer_failed) may still be on its way: this one can come first.
    for run in session.peers:
        if run.task_id and run.status != sessions.FAILED and AsyncResult(run.task_id, app=app).failed():
            if give_up_on(session, run, f"failed: {_error(run)}"):
                return
    session.reload()
    results = [AsyncResult(run.task_id, app=app).result for run in session.peers
               if run.status != sessions.FAILED and run.task_id and AsyncResult(run.task_id, app=app).successful()]
    if len(results) < session.quorum:
        lifecycle.end(session.id, sessions.FAILED, f"round {round_}: {len(results)} peer(s) finished, "
                                                   f"{session.quorum} needed")
        return
    try:
        if session.mode == sessions.FEDERATED:
            federated.aggregate_round(session, int(round_), results)
        else:
            sweep.finish(session, results)
    except Exception as exc:
        lifecycle.end(session.id, sessions.FAILED, f"round {round_} could not be aggregated: {exc}")
        raise


@app.task(name="peertrain.cancel_session", **RELIABLE)
def cancel_session(session_id: str) -> None:
    """The user cancelled: stop the peers and release them."""
    if _session(session_id) is not None:
        lifecycle.end(session_id, sessions.CANCELLED, "cancelled by the user")
