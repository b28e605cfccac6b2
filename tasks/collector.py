"""The coordinator's side of the trust boundary: peers' results in, checked, into the chord.

Peers publish each task's outcome to the results exchange, stamped with their broker user (which
RabbitMQ verifies). `ResultCollector`, a consumer step of the coordinator's worker, reads them and
`Collector.collect` keeps only what it can vouch for:
- the sender is a peer, and the task id names the task the coordinator gave that very peer in the
  session's current round (a late, stale or forged result is dropped and logged, never stored);
- the message is small, and the result is reduced to known fields of known types (`clean_result`),
  with the peer's name and round taken from the coordinator's records, not from the message;
- a task already reported is not reported twice (a redelivered message changes nothing).
An asynchronous session's result goes to the coordinator's `update` task instead (tasks/buffered.py).
Otherwise it stores the outcome in the result backend and joins the chord (`mark_as_done` with the task's
place in the chord, rebuilt from the session's `launch` record), so `aggregate` runs when the last
peer reports, as Celery's chord would run it. A failed task counts as a `left_out` marker, and is
handed to `peer_lost` at once, so one failing peer does not wait for the slowest.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from typing import Any

from celery import Celery, bootsteps, states
from celery.app.task import Context
from celery.result import AsyncResult
from kombu import Consumer

import models
from models import session as sessions
from tasks import protocol
from tasks.rounds import chord_body, settings

log = logging.getLogger(__name__)

_FINAL_KEYS = ("epoch", "epochs", "loss", "accuracy", "val_loss", "val_accuracy", "val_r2", "samples_per_sec",
               "seconds", "samples", "finished_at")


def left_out(peer: str, round_: int, reason: str) -> dict[str, Any]:
    """What stands in a round's results for a peer that will not report: failed, gone, or past the deadline.

    The chord counts it like any result, so the round closes once the others have reported; the
    coordinator leaves the peer out (or fails the session when its quorum cannot be met)."""
    return {"peer": peer, "round": round_, "left_out": reason}


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _metrics(data: Any, epochs: int) -> dict[str, Any] | None:
    """One epoch's numbers, or None if it does not describe an epoch of this task."""
    if not isinstance(data, dict):
        return None
    epoch = data.get("epoch")
    if isinstance(epoch, bool) or not isinstance(epoch, int) or not 1 <= epoch <= epochs:
        return None
    clean = {key: _number(data.get(key)) for key in _FINAL_KEYS}
    clean.update(epoch=epoch, epochs=epochs)
    return clean


def clean_result(result: Any, peer: str, round_: int, epochs: int) -> dict[str, Any]:
    """A peer's reported result reduced to known fields of known types, named by the coordinator's records."""
    result = result if isinstance(result, dict) else {}
    history = result.get("history") if isinstance(result.get("history"), list) else []
    epochs_seen: dict[int, dict[str, Any]] = {}
    for entry in history[:epochs]:
        metrics = _metrics(entry, epochs)
        if metrics is not None:
            epochs_seen.setdefault(metrics["epoch"], metrics)
    fetched = result.get("bytes_fetched")
    return {
        "peer": peer,
        "round": round_,
        "final": _metrics(result.get("final"), epochs) or {},
        "history": [epochs_seen[e] for e in sorted(epochs_seen)],
        "bytes_fetched": fetched if isinstance(fetched, int) and 0 <= fetched < 1 << 50 else 0,
        "seconds": _number(result.get("seconds")) or 0.0,
        "stopped": result.get("stopped") is not False,
        "device": str(result.get("device"))[:40] if result.get("device") else None,
    }


def describe_failure(result: Any) -> str:
    """The peer's account of its failure, as bounded plain text."""
    if isinstance(result, dict):
        kind = str(result.get("exc_type") or "error")[:80]
        message = result.get("exc_message")
        if isinstance(message, list | tuple):
            message = " ".join(str(part) for part in message)
        text = f"{kind}: {message}" if message else kind
    else:
        text = str(result)
    return "".join(ch if ch.isprintable() else " " for ch in text)[:500]


class Collector:
    """Checks each reported result against the coordinator's records before the chord sees it."""

    def __init__(self, app: Celery) -> None:
        self.app = app
        self.dropped: Counter[str] = Counter()

    def _drop(self, reason: str, detail: str) -> bool:
        self.dropped[reason] += 1
        log.warning("dropped a result (%s): %s [%d dropped for this reason so far]", reason, detail,
                    self.dropped[reason])
        return False

    def collect(self, user_id: str | None, size: int, payload: Any) -> bool:
        """Apply one reported outcome; False (and a log line) when it is dropped."""
        name = protocol.peer_of(user_id)
        if name is None:
            return self._drop("not from a peer", f"sent by broker user {user_id!r}")
        if size > protocol.MAX_RESULT_BYTES:
            return self._drop("too large", f"{size:,} bytes from peer {name}")
        if not (isinstance(payload, dict) and isinstance(payload.get("task_id"), str)
                and payload.get("status") in protocol.RESULT_STATES):
            return self._drop("malformed", f"from peer {name}")
        task_id, status = payload["task_id"], payload["status"]
        models.ensure_connected(settings().mongodb_uri)
        found = sessions.current_task(task_id)
        if found is None:
            return self._drop("unknown task", f"peer {name} reported task {task_id}, which is no current task")
        session, run = found
        if run["name"] != name:
            return self._drop("not its task", f"peer {name} reported task {task_id}, which was given to {run['name']}")
        if status not in states.READY_STATES:
            return False  # STARTED, RETRY: nothing to record
        if AsyncResult(task_id, app=self.app).state in states.READY_STATES:
            return self._drop("already reported", f"task {task_id} of peer {name} (or it was given up on)")
        apart = (session.get("federated") or {}).get("schedule") == "async"
        # An asynchronous session's tasks are numbered one by one, not by round (tasks/buffered.py).
        round_ = int(task_id.split(":")[1]) if apart else session["launch"]["round"]
        if status == states.SUCCESS:
            epochs = (session["federated"]["local_epochs"] if session.get("mode") == sessions.FEDERATED
                      else run["hyperparameters"]["epochs"])
            result = clean_result(payload.get("result"), name, round_, epochs)
            if apart:
                self.app.backend.mark_as_done(task_id, result, request=Context(id=task_id))
                self.app.send_task("peertrain.update", args=[str(session["_id"]), task_id, result],
                                   queue=settings().coordinator_queue)
            else:
                self.settle(session["_id"], session["launch"], task_id, name, result)
            return True
        reason = f"failed: {describe_failure(payload.get('result'))}"
        if apart:
            self.app.backend.mark_as_done(task_id, left_out(name, round_, reason), request=Context(id=task_id))
        else:
            self.settle(session["_id"], session["launch"], task_id, name, left_out(name, round_, reason))
        # At once, not when the round closes: a session that cannot go on without it fails now.
        self.app.send_task("peertrain.peer_lost", args=[str(session["_id"]), name, round_, reason],
                           queue=settings().coordinator_queue)
        return True

    def settle(self, session_id: Any, launch: dict[str, Any], task_id: str, peer: str,
               result: dict[str, Any]) -> None:
        """Store a task's result (or its `left_out` marker) and count it towards its round's chord."""
        request = Context(id=task_id, group=launch["group"], group_index=launch["peers"].index(peer),
                          chord=dict(chord_body(str(session_id), launch["round"], launch["body"],
                                                len(launch["peers"]))))
        self.app.backend.mark_as_done(task_id, result, request=request)


class ResultCollector(bootsteps.ConsumerStep):
    """A consumer of the results queue inside the coordinator's worker (Celery's documented extension)."""

    def __init__(self, c, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        self.collector = Collector(c.app)
        self.queue = protocol.results_queue(c.app.conf.peertrain_results)

    def get_consumers(self, channel) -> list[Consumer]:
        # on_message: the raw message, so its size is checked before its body is decoded.
        return [Consumer(channel, queues=[self.queue], on_message=self.on_message, accept=["json"],
                         prefetch_count=256)]

    def on_message(self, message) -> None:
        try:
            self.collector.collect(message.properties.get("user_id"), len(message.body or b""),
                                   message.decode() if len(message.body or b"") <= protocol.MAX_RESULT_BYTES
                                   else None)
        except Exception:  # one bad result must not stop the coordinator from hearing the others
            log.exception("could not apply a reported result")
        message.ack()
