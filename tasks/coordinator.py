"""The coordinator: runs sessions as chords of peer `train` tasks and owns their lifecycle in MongoDB.

`run_session` launches a session's first round (tasks/rounds.py builds the chord: one `train` per
claimed peer, routed to that peer's queue, with `aggregate` as its body); `aggregate` ends a sweep
(tasks/sweep.py) or hands a federated round to tasks/federated.py; `peer_failed` (sent by the result
collector when a peer reports a failure) and `round_failed` turn failures into a FAILED session (or,
in a federated session with peers to spare, a peer left out). Only the platform's own processes can
send these tasks: peers cannot publish to the coordinator's queue.
"""

from __future__ import annotations

import logging
from typing import Any

from celery.exceptions import ChordError
from celery.result import AsyncResult
from celery.signals import worker_process_init

import models
from models import TrainingSession
from models import session as sessions
from tasks import federated, lifecycle, sweep
from tasks.celery import app
from tasks.collector import PeerTaskError
from tasks.rounds import launch_round, settings

log = logging.getLogger(__name__)


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


@app.task(name="peertrain.run_session", shared=False)
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
    except Exception as exc:
        lifecycle.end(session_id, sessions.FAILED, f"the coordinator could not start the session: {exc}")
        raise


@app.task(name="peertrain.aggregate", shared=False)
def aggregate(results: list[dict[str, Any]], session_id: str, round_: int = 0) -> None:
    """The chord's body: every peer finished; record their results and end (or continue) the session."""
    session = _session(session_id)
    if session is None or session.finished:
        return
    if session.mode == sessions.FEDERATED:
        federated.aggregate_round(session, round_, results)
        return
    sweep.finish(session, results)


def peer_failure(session: TrainingSession, run: models.PeerRun) -> bool:
    """Record that `run`'s task failed and end the session, unless a federated one can go on; True if ended."""
    error = AsyncResult(run.task_id, app=app).result
    if isinstance(error, PeerTaskError):
        message = str(error)  # the peer's own account: "ValueError: ..."
    else:
        message = f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else str(error)
    sessions.record_peer_result(session.id, run.name, sessions.FAILED, error=message)
    run.status = sessions.FAILED
    if session.mode == sessions.FEDERATED:
        if federated.tolerate(session, run.name):
            log.warning("session %s goes on without peer %s: %s", session.id, run.name, message)
            return False
    return lifecycle.end(session.id, sessions.FAILED, f"peer {run.name} failed: {message}")


@app.task(name="peertrain.peer_failed", shared=False)
def peer_failed(task_id: str) -> None:
    """A peer reported its `train` task failed: end its session FAILED, naming the peer and the error."""
    models.ensure_connected(settings().mongodb_uri)
    session = sessions.by_task_id(task_id)
    if session is None or session.finished:
        return  # already ended
    run = sessions.run_of_task(session, task_id)
    if run is not None and run.status != sessions.FAILED:
        peer_failure(session, run)


@app.task(name="peertrain.round_failed", shared=False)
def round_failed(task_id: str) -> None:
    """Errback of a chord's body: a peer failed (the body never ran) or aggregating itself failed."""
    _, session_id, round_, _ = task_id.split(":")
    session = _session(session_id)
    if session is None or session.finished:
        return  # the common case: peer_failed ended it already
    result = AsyncResult(task_id, app=app)
    # A body that ran and raised has its failure stored before its errbacks are sent; a chord whose
    # header failed calls them before storing anything.
    if result.state != "FAILURE" or isinstance(result.result, ChordError):
        # The failed peer's own errback (peer_failed) may still be on its way: this one can come first.
        for run in session.peers:
            if run.task_id and run.status != sessions.FAILED and AsyncResult(run.task_id, app=app).failed():
                if peer_failure(session, run):
                    return
        if session.mode == sessions.FEDERATED:
            try:
                federated.recover_round(session, int(round_))
            except Exception as exc:
                lifecycle.end(session.id, sessions.FAILED, f"round {round_} could not be aggregated: {exc}")
                raise
            return
        lifecycle.end(session.id, sessions.FAILED, "a peer's task ended without a result")
        return
    error = result.result
    lifecycle.end(session.id, sessions.FAILED, f"aggregating round {round_} failed: {type(error).__name__}: {error}")


@app.task(name="peertrain.cancel_session", shared=False)
def cancel_session(session_id: str) -> None:
    """The user cancelled: stop the peers and release them."""
    if _session(session_id) is not None:
        lifecycle.end(session_id, sessions.CANCELLED, "cancelled by the user")
