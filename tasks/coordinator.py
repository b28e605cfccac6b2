"""The coordinator: Celery tasks that dispatch to the session's strategy (tasks/strategy.py), and its app.

    celery -A tasks worker -Q coordinator        # (tasks.app is this module's `app`)

`create_app(settings, storage=None, clock=None)` makes the coordinator's app: the platform's app
(tasks/celery.py) with the tasks below and the result collector (tasks/collector.py), all given one
`Services` (settings, storage, clock), so an in-process platform or a test hands its own. The tasks are
thin: they load the session and call its strategy's `start`, `on_result`, `on_lost` or `on_deadline`.
Only the platform's own processes can send them: peers cannot publish to the coordinator's queue.

Every task here is acknowledged after it ran and runs again when its worker died mid-way; the
strategies make that safe (conditional updates: a round is recorded once, launched once, a session
ends once). Storage and broker errors are retried with backoff before a session fails.
"""

from __future__ import annotations

import logging
from typing import Any

from bson import ObjectId
from celery import Celery
from celery.result import AsyncResult
from celery.signals import worker_init, worker_process_init, worker_ready
from kombu.exceptions import OperationalError

import models
from models import assignment as assignments
from models import peer as peers
from models import session as sessions
from settings import Settings
from tasks import celery as platform
from tasks import collector, feed, lifecycle, protocol, relay
from tasks.gate import Outcome
from tasks.services import Clock, Services
from tasks.storage import Storage, StorageError, from_settings
from tasks.strategy import Strategy, strategy_for

log = logging.getLogger(__name__)

# What a coordinator task needs: run again if its worker dies, retried a few times on a passing fault.
RELIABLE = {"shared": False, "acks_late": True, "reject_on_worker_lost": True}
TRANSIENT = {"autoretry_for": (StorageError, OperationalError), "retry_backoff": 1, "retry_backoff_max": 30,
             "retry_jitter": True, "max_retries": 5}


def create_app(settings: Settings, storage: Storage | None = None, clock: Clock | None = None) -> Celery:
    """The coordinator's app: the platform's, with the coordinator's tasks and the result collector."""
    app = platform.create_app(settings)
    services = Services(app, settings, storage if storage is not None else from_settings(settings),
                        clock or Clock())
    app.services = services
    feed.install(app)  # the events the coordinator stores are announced to every API process
    register(app, services)
    app.steps["consumer"].add(collector.step(services))
    _connect_signals(app, services)
    return app


def register(app: Celery, services: Services) -> None:
    """Add the coordinator's tasks to `app`."""

    def strategy(session_id: str) -> Strategy | None:
        models.ensure_connected(services.settings.mongodb_uri)
        session = sessions.load(session_id)
        if session is None or session.finished:
            log.info("session %s is gone or over; nothing to do", session_id)
            return None
        return strategy_for(session, services)

    @app.task(name="peertrain.run_session", **RELIABLE, **TRANSIENT)
    def run_session(session_id: str) -> None:
        """Start a session (its first round, or its first tasks); ends it FAILED if it cannot start."""
        found = strategy(session_id)
        if found is None:
            return
        try:
            found.start()
        except (StorageError, OperationalError):
            raise  # retried
        except Exception as exc:
            found.end(sessions.FAILED, f"the coordinator could not start the session: {exc}")
            raise

    @app.task(name="peertrain.aggregate", **RELIABLE, **TRANSIENT)
    def aggregate(results: list[dict[str, Any]], session_id: str, round_: int = 0) -> None:
        """A round's chord joined: every peer's task was decided (trained, or left out)."""
        found = strategy(session_id)
        if found is not None:
            found.on_result(round_, [Outcome.from_message(result) for result in results])

    @app.task(name="peertrain.update", bind=True, **RELIABLE, **TRANSIENT)
    def update(self, session_id: str, task_id: str) -> None:
        """An asynchronous session's task was decided (tasks/collector.py stored its outcome)."""
        found = strategy(session_id)
        assignment = assignments.get(task_id)
        outcome = Outcome.of(assignment) if assignment is not None else None
        if found is None or outcome is None or str(assignment["session_id"]) != session_id:
            return
        try:
            found.on_result(assignment["round"], [outcome])
        except (StorageError, OperationalError):
            raise  # retried
        except Exception as exc:
            found.end(sessions.FAILED, f"the coordinator could not take an update: {type(exc).__name__}: {exc}")
            raise
        if found.stalled():
            # Whoever holds the fold lease looks again when it lets go; if it died holding it, this run
            # comes back once the lease has expired and does the work itself.
            raise self.retry(countdown=found.retry_after, max_retries=12)

    @app.task(name="peertrain.peer_lost", **RELIABLE)
    def peer_lost(session_id: str, peer: str, reason: str) -> None:
        """A peer will not report (its task failed, it went offline)."""
        found = strategy(session_id)
        if found is not None:
            found.on_lost(peer, reason)

    @app.task(name="peertrain.deadline", **RELIABLE)
    def deadline(session_id: str, task_ids: list[str]) -> None:
        """Tasks of the session ran past their deadline (the monitor saw it)."""
        found = strategy(session_id)
        if found is None:
            return
        # Still open, or decided by a run of this task that died before passing its verdict on.
        overdue = [a for a in map(assignments.get, task_ids)
                   if a is not None and not a.get("settled") and a.get("deadline") is not None
                   and a["deadline"] < services.clock.now() and str(a["session_id"]) == session_id]
        if overdue:
            found.on_deadline(overdue)

    @app.task(name="peertrain.deliver", bind=True, **RELIABLE)
    def deliver(self, task_id: str) -> None:
        """Pass on a decided outcome whose delivery another coordinator held (and may have died holding)."""
        models.ensure_connected(services.settings.mongodb_uri)
        assignment = assignments.get(task_id)
        outcome = Outcome.of(assignment) if assignment is not None else None
        if outcome is None or assignment.get("settled"):
            return
        # It may stand in for a result collector that died: a peer left out is reported again (harmless).
        if not relay.deliver(app, services.queue, assignment, outcome, services.clock.now()):
            raise self.retry(countdown=relay.LEASE.total_seconds(), max_retries=5)

    @app.task(name="peertrain.round_failed", **RELIABLE)
    def round_failed(task_id: str) -> None:
        """Errback of a chord's body (its id names the session and round): aggregating the round failed."""
        body = protocol.TaskId.parse(task_id)
        found = strategy(body.session) if body is not None else None
        if found is None:
            return
        error = AsyncResult(task_id, app=app).result
        found.end(sessions.FAILED, f"aggregating round {body.round} failed: {type(error).__name__}: {error}")

    @app.task(name="peertrain.recruit", **RELIABLE, **TRANSIENT)
    def recruit(session_id: str, names: list[str]) -> None:
        """Peers that came online were claimed for a running elastic session: it gives them work (or, ended
        meanwhile, lets them go)."""
        found = strategy(session_id)
        if found is None:
            peers.release(ObjectId(session_id), names)
            return
        found.on_joined(names)

    @app.task(name="peertrain.cancel_session", **RELIABLE)
    def cancel_session(session_id: str) -> None:
        """The user cancelled: stop the peers and release them."""
        models.ensure_connected(services.settings.mongodb_uri)
        lifecycle.end(app, session_id, sessions.CANCELLED, "cancelled by the user", at=services.clock.now())


def _connect_signals(app: Celery, services: Services) -> None:
    uid = f"peertrain.coordinator.{id(app)}"

    def reconnect(**_: Any) -> None:
        # A forked pool process must not share the parent's MongoDB sockets: connect afresh. (The solo
        # pool sends this signal too, in the worker's own process: mongomock's data lives in its client.)
        uri = services.settings.mongodb_uri
        if not uri.startswith(models.db.MOCK_SCHEME):
            models.disconnect()
            models.connect(uri)

    def reconcile(sender: Any = None, **_: Any) -> None:
        """A coordinator that starts gives back the peers held for sessions that ended while it was away."""
        if sender is None or sender.app is not app:
            return
        models.ensure_connected(services.settings.mongodb_uri)
        active = list(sessions.TrainingSession.objects(status__in=sessions.ACTIVE).scalar("id"))
        if released := models.peer.release_orphans(active):
            log.info("released %d peer(s) held for sessions that had ended", released)

    worker_process_init.connect(reconnect, weak=False, dispatch_uid=f"{uid}.reconnect")
    worker_ready.connect(reconcile, weak=False, dispatch_uid=f"{uid}.reconcile")
    worker_init.connect(_warm_up, weak=False, dispatch_uid="peertrain.coordinator.warm_up")


def _warm_up(**_: Any) -> None:
    import torch

    from trainer.warmup import warm_up

    # Before the pool forks: every pool process starts with torch and pandas warm, so the first
    # session's first aggregate is as fast as the next session's.
    warm_up()
    # A round's work here is small (averaging, one evaluation) and shares its machine with peers:
    # torch's default of a thread per core made it 5-50x slower whenever peers were training.
    torch.set_num_threads(1)


# `celery -A tasks worker -Q coordinator` (tasks.app is this `app`).
__getattr__ = platform.command_line_app(create_app)
