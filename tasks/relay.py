"""A round is a Celery chord: a `train` task on each peer's queue, joined into `aggregate` on the coordinator.

Peers cannot write the result backend (they hold no Redis credentials), so they report to the
coordinator's results queue instead (tasks/collector.py), and the coordinator joins the chord on their
behalf: `settle` stores a task's outcome and counts it towards its chord with the backend's own
`mark_as_done`, given the task's place in the chord (group, index, body), as Celery's worker would when
the task returned. When the last one is counted, the backend sends the body with every outcome, in
header order. That is the one Celery behaviour this module relies on beyond its public canvas API;
tests/tasks/test_relay.py pins it, for the in-memory backend and for Redis's.

What is counted is the coordinator's `Outcome` (tasks/gate.py), taken once per task (models/assignment.py
`claim`), never what a peer sent; `deliver` passes it on and records that it did (`settled`), so an
outcome decided by a run that died before passing it on is passed on by the next.
"""

from __future__ import annotations

from typing import Any

from celery import Celery, chord
from celery.app.task import Context
from celery.canvas import Signature

from models import assignment as assignments
from tasks.gate import Outcome


def body(app: Celery, queue: str, session_id: str, round_: int, body_id: str, size: int) -> Signature:
    """A round's `aggregate` (with its errback), exactly as the chord sends it and `settle` rebuilds it."""
    signature = app.signature("peertrain.aggregate", args=[session_id, round_], queue=queue, task_id=body_id)
    # Called with the body's id alone (an id naming its session and round: protocol.TaskId).
    signature.on_error(app.signature("peertrain.round_failed", queue=queue))
    signature.chord_size = size
    return signature


def train(app: Celery, queue: str, task_id: str, spec: dict[str, Any], seconds: int, describe: str) -> Signature:
    """One `train` task for one peer's queue; its events show `describe` instead of the spec (which holds grants)."""
    return app.signature("peertrain.train", args=[spec], queue=queue, task_id=task_id, argsrepr=f"({describe})",
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


def deliver(app: Celery, queue: str, assignment: dict[str, Any], outcome: Outcome) -> None:
    """Pass a decided outcome on, once it is stored on its assignment: a round's chord counts it; an
    asynchronous task's result goes to the coordinator's `update` (which reads it from the assignment)."""
    if assignment.get("chord"):
        settle(app, queue, assignment, outcome)
    elif not outcome.left_out:
        app.send_task("peertrain.update", args=[str(assignment["session_id"]), assignment["_id"]], queue=queue)
    assignments.settle(assignment["_id"])
