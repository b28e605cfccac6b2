"""A round is a Celery chord: a `train` task on each peer's queue, joined into `aggregate` on the coordinator.

Peers cannot write the result backend (they hold no Redis credentials), so they report to the
coordinator's results queue instead (tasks/collector.py), and the coordinator joins the chord on their
behalf: `settle` stores a task's outcome and counts it towards its chord with the backend's own
`mark_as_done`, given the task's place in the chord (group, index, body), as Celery's worker would when
the task returned. When the last one is counted, the backend sends the body with every outcome, in
header order. That is the one Celery behaviour this module relies on beyond its public canvas API;
tests/tasks/test_relay.py pins it, for the in-memory backend and for Redis's.

What is counted is the coordinator's `Outcome` (tasks/gate.py), taken once per task (models/assignment.py
`claim`), never what a peer sent. `deliver` passes it on under a lease on the assignment and records
that it did (`settled`): two coordinators never both pass one on, and an outcome decided by one that
died before passing it on is passed on by the next once the lease has expired (`peertrain.deliver`).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from celery import Celery, chord
from celery.app.task import Context
from celery.canvas import Signature

from models import assignment as assignments
from tasks import protocol
from tasks.gate import Outcome

# A coordinator passing an outcome on that has not settled it after this long died doing so.
LEASE = timedelta(seconds=30)


def body(app: Celery, queue: str, session_id: str, round_: int, body_id: str, size: int) -> Signature:
    """A round's `aggregate` (with its errback), exactly as the chord sends it and `settle` rebuilds it."""
    signature = app.signature("peertrain.aggregate", args=[session_id, round_], queue=queue, task_id=body_id)
    # Called with the body's id alone (an id naming its session and round: protocol.TaskId).
    signature.on_error(app.signature("peertrain.round_failed", queue=queue))
    signature.chord_size = size
    return signature


def train(app: Celery, peer: str, task_id: str, spec: dict[str, Any], seconds: int, describe: str) -> Signature:
    """One `train` task for peer `peer`, through the platform's tasks exchange to that peer's queue (never an
    exchange a peer could have declared); its events show `describe` instead of the spec (which holds grants)."""
    return app.signature("peertrain.train", args=[spec], exchange=protocol.TASKS_EXCHANGE,
                         routing_key=protocol.task_queue(peer), task_id=task_id, argsrepr=f"({describe})",
                         kwargsrepr="{}", expires=seconds)



def send(app: Celery, header: list[Signature], group: str, body_: Signature) -> None:
    """Send one round's chord: every header task through one producer, the body when the last is counted."""
    # The chord's own task id is its header group's id (the body keeps its own).
    chord(header, task_id=group)(body_)


def settle(app: Celery, queue: str, assignment: dict[str, Any], outcome: Outcome) -> None:
    """Count `outcome` as the result of `assignment`'s task in its round's chord."""
    place = assignment["chord"]
    session_id = str(assignment["session_id"])
    request = Context(id=assignment["_id"], group=place["group"], group_index=place["index"],
                      chord=dict(body(app, queue, session_id, assignment["round"], place["body"], place["size"])))
    app.backend.mark_as_done(assignment["_id"], outcome.to_message(), request=request)


def deliver(app: Celery, queue: str, assignment: dict[str, Any], outcome: Outcome, now: datetime,
            report_lost: bool = True) -> bool:
    """Pass a decided outcome on (it is stored on its assignment), unless another coordinator is doing so or
    did; True if this call did. A round's chord counts it; an asynchronous task's result goes to the
    coordinator's `update` (which reads it from the assignment); a task left out goes to `peer_lost` at once
    (unless `report_lost` is False: the caller is handling that loss), so a session that cannot go on
    without its peer fails now, not when the round closes."""
    if not assignments.take_delivery(assignment["_id"], now, LEASE):
        return False
    session_id = str(assignment["session_id"])
    if assignment.get("chord"):
        settle(app, queue, assignment, outcome)
    elif not outcome.left_out:
        app.send_task("peertrain.update", args=[session_id, assignment["_id"]], queue=queue)
    if outcome.left_out and report_lost:
        app.send_task("peertrain.peer_lost", args=[session_id, outcome.peer, outcome.reason], queue=queue)
    assignments.settle(assignment["_id"])
    return True


def hand_on(app: Celery, queue: str, assignment: dict[str, Any], outcome: Outcome, now: datetime,
            report_lost: bool = True) -> bool:
    """`deliver`, or, when another coordinator holds the delivery (it may have died holding it), have the
    coordinator look again once its lease has expired (`peertrain.deliver`). True if this call delivered."""
    if deliver(app, queue, assignment, outcome, now, report_lost):
        return True
    app.send_task("peertrain.deliver", args=[assignment["_id"]], queue=queue, countdown=LEASE.total_seconds())
    return False
