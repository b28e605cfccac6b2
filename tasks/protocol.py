"""Everything the platform and its peers say to each other, in one place: names, queues, messages.

A registered peer `alice` connects as broker user `peer.alice` and may touch only its own resources:
it consumes `peer.alice` (its tasks) and `peer.alice.stop` (stop notices), and publishes to exactly two
exchanges, its own event exchange (heartbeats) and the results exchange (its tasks' outcomes), always with
the message property `user_id` set to its user, which RabbitMQ checks against the connection's login.
So whoever reads those messages knows for certain which peer sent them. It declares nothing: every
exchange, queue and binding it uses is declared by the platform (`declarations`), so no name a peer
could configure is one the platform declares, binds or publishes to. Tasks reach its queue through the
platform's exchange `peertrain.tasks`.

The messages are schemas: `TrainSpec` (what the coordinator asks a peer to train; the peer checks it
before it trains), `TrainResult` (what a peer reports; the coordinator keeps only what this schema
knows) and `Heartbeat` (a `task-heartbeat` event). Whatever a peer sends passes through these (in
tasks/gate.py, the one place that decides what to believe) before anything else reads it.
Both sides import this module; it imports only kombu, marshmallow and the standard library (peers hold
no database code).
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from typing import Any
from uuid import uuid4

import marshmallow as ma
from kombu import Connection, Exchange, Queue, binding
from marshmallow import EXCLUDE, fields, validate

from trainer.limits import MAX_EPOCHS, LimitError, check_hyperparameters

log = logging.getLogger(__name__)

PEER_PREFIX = "peer."  # of a peer's broker user, its queues and its worker's hostname
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")
# Stop notices older than this are of no use to anyone: sessions have ended, or restarted peers never saw them.
STOP_NOTICE_TTL = 3600.0  # seconds
# A task's outcome as a peer reports it: metrics and per-epoch history, never weights.
MAX_RESULT_BYTES = 4 << 20
RESULT_STATES = ("SUCCESS", "FAILURE", "REVOKED", "RETRY", "STARTED")
FINAL_STATES = ("SUCCESS", "FAILURE", "REVOKED")
ROUTING_KEY = "result"
HEARTBEAT = "task-heartbeat"  # the custom Celery event a training task sends after each epoch
MAX_ROUND = 1_000_000  # a round, or an asynchronous session's task number
# The events the monitor reads: workers' and heartbeats (Celery routes an event by its type, '-' read as '.').
# The other task events (sent, received, started, succeeded: four per task) reach Flower only.
EVENT_ROUTING_KEYS = ("worker.#", "task.heartbeat")
# Most events one peer's queue of events holds unread (a flood past it drops that peer's oldest, no one
# else's), and how long they wait for a monitor that is away.
PEER_EVENT_BACKLOG = 2_000
PEER_EVENT_TTL = 86400.0  # seconds

# One epoch as the trainer reports it (trainer.loop.EpochMetrics), besides its `epoch` and `epochs`.
METRICS = ("loss", "accuracy", "val_loss", "val_accuracy", "val_r2", "samples_per_sec", "seconds", "samples",
           "finished_at")
# What a session shows of a peer's newest epoch.
PROGRESS = ("epoch", "epochs", "loss", "accuracy", "val_loss", "val_accuracy", "val_r2", "samples_per_sec")


# --- names ------------------------------------------------------------------------------------

def check_name(name: str) -> str:
    """`name` if it can name a peer (letters, digits, `_`, `-`: it becomes queue and user names), else ValueError."""
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise ValueError(f"a peer name is 1-63 letters, digits, '_' or '-', starting with a letter or digit; "
                         f"got {name!r}")
    return name


TASKS_EXCHANGE = "peertrain.tasks"  # what the coordinator sends `train` tasks to (routing key: the peer's queue)
STOPS_EXCHANGE = "peertrain.stops"  # what stop notices go to (routing key: the peer's stop queue)


def task_queue(name: str) -> str:
    """The queue a peer's worker consumes its tasks from."""
    return f"{PEER_PREFIX}{name}"


def tasks_queue(name: str, declare: bool = False) -> Queue:
    """Peer `name`'s task queue, bound to the platform's tasks exchange; the peer's side never declares it."""
    return Queue(task_queue(name), Exchange(TASKS_EXCHANGE, "direct", durable=True, no_declare=not declare),
                 routing_key=task_queue(name), durable=True, no_declare=not declare)


def stop_queue(name: str, declare: bool = False) -> Queue:
    """The queue of stop notices for peer `name`, bound to the platform's stops exchange (declared by the platform)."""
    queue_name = f"{PEER_PREFIX}{name}.stop"
    return Queue(queue_name, Exchange(STOPS_EXCHANGE, "direct", durable=True, no_declare=not declare),
                 routing_key=queue_name, durable=True, message_ttl=STOP_NOTICE_TTL, no_declare=not declare)


def event_exchange(events: str, name: str) -> str:
    """The exchange peer `name` publishes its events to: its own (`events` is the platform's), so that the broker
    keeps each peer's events apart from every other's."""
    return f"{events}.{PEER_PREFIX}{check_name(name)}"


def events_queue(events: str, monitor: str, name: str) -> Queue:
    """The monitor's queue of peer `name`'s events, bound to the peer's own event exchange (`events` and `monitor`
    are the platform's exchange and queue names). Bounded: a peer that floods fills only its own queue, and the
    broker hands the monitor each peer's events in turn."""
    exchange = Exchange(event_exchange(events, name), "topic", durable=True)
    return Queue(f"{monitor}.{PEER_PREFIX}{name}", durable=True, max_length=PEER_EVENT_BACKLOG,
                 message_ttl=PEER_EVENT_TTL,
                 bindings=[binding(exchange, routing_key=key) for key in EVENT_ROUTING_KEYS])


def declarations(name: str, events: str, monitor: str) -> list[Queue]:
    """What the platform declares for peer `name` (with the exchanges and bindings they need)."""
    return [tasks_queue(name, declare=True), stop_queue(name, declare=True), events_queue(events, monitor, name)]


def broker_user(name: str, scope: str = "") -> str:
    """The broker user a peer logs in as: `peer.<name>`, with `@<scope>` for a deployment on a virtual host of its
    own (Settings.broker_scope): RabbitMQ's users are the node's, and a login is good on one virtual host only."""
    return f"{PEER_PREFIX}{check_name(name)}" + (f"@{scope}" if scope else "")


def worker_name(name: str, host: str = "%h") -> str:
    """A peer worker's Celery hostname (`-n`): the monitor knows the peer by it."""
    return f"{PEER_PREFIX}{name}@{host}"


def worker_command(name: str, loglevel: str = "INFO") -> str:
    """The command that runs peer `name` on its machine, with the environment its registration gave."""
    return (f"celery -A tasks.peer worker -Q {task_queue(name)} -n {worker_name(name)} -c 1 "
            f"--without-gossip --without-mingle --loglevel={loglevel}")


def _named(text: Any) -> str | None:
    if not isinstance(text, str) or not text.startswith(PEER_PREFIX):
        return None
    name = text[len(PEER_PREFIX):]
    return name if NAME_PATTERN.match(name) else None


def peer_of(user_id: str | None) -> str | None:
    """The peer a verified broker user is (`peer.<name>[@<scope>]`: only this deployment's logins reach its
    virtual host); None for anyone else (the platform's own processes)."""
    return _named(user_id.split("@", 1)[0]) if isinstance(user_id, str) else None


def peer_of_worker(hostname: str | None) -> str | None:
    """`peer.<name>@host` → `<name>`; None for workers that are not peers (the coordinator, …)."""
    return _named(hostname.split("@", 1)[0]) if isinstance(hostname, str) else None


def results_exchange(name: str) -> Exchange:
    return Exchange(name, "direct", durable=True)


def results_queue(name: str) -> Queue:
    """The coordinator's queue of peers' results (the exchange and the queue share the setting's name)."""
    return Queue(name, results_exchange(name), routing_key=ROUTING_KEY, durable=True)


def permissions(name: str, events: str, results: str) -> dict[str, str]:
    """RabbitMQ's configure/write/read patterns for peer `name`: consuming its own two queues, publishing to
    the two exchanges it reports on (its own event exchange, named after the platform's `events`, and
    `results`), declaring nothing.

    Configure (declare, redeclare, delete) covers no name at all: whatever a peer could configure, it could
    also redeclare in a shape the platform does not expect, and every declaration of the platform's would
    then fail. Write covers the two exchanges it reports on; read its own queues only.
    """
    own = rf"{re.escape(PEER_PREFIX)}{re.escape(check_name(name))}(\.stop)?"
    return {
        "configure": "^$",
        "write": rf"^({re.escape(event_exchange(events, name))}|{re.escape(results)})$",
        "read": rf"^{own}$",
    }


@dataclass(frozen=True)
class TaskId:
    """A `train` task's id, `<session>:<round>:<nonce>`: it names its session and round (an asynchronous
    session's task number), so whoever holds one can find the coordinator's record of it."""

    session: str
    round: int
    nonce: str

    @classmethod
    def new(cls, session: Any, round_: int) -> TaskId:
        return cls(str(session), round_, uuid4().hex)

    @classmethod
    def parse(cls, text: Any) -> TaskId | None:
        """The id `text` spells, or None if it is not one."""
        if not isinstance(text, str):
            return None
        parts = text.split(":")
        if len(parts) != 3 or not parts[0] or not parts[1].isdigit() or not parts[2]:
            return None
        return cls(parts[0], int(parts[1]), parts[2])

    def __str__(self) -> str:
        return f"{self.session}:{self.round}:{self.nonce}"


def stop_notice(session_id: str, reason: str, attempt: int = 0) -> dict[str, Any]:
    """Stop the tasks of attempt `attempt` (and earlier ones) of a session: a resumed session's are not."""
    return {"session": session_id, "reason": reason[:500], "attempt": attempt}


def identity(app: Any) -> str | None:
    """The broker user a Celery app logs in as (for a peer's app, `peer.<name>`)."""
    return _login(app.conf.broker_url)


@lru_cache(maxsize=64)
def _login(url: str) -> str | None:
    # Stamped on every event and result a peer sends: parse the URL once.
    return Connection(url).userid


# --- messages ------------------------------------------------------------------------------------

def _finite(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)


class WholeNumber(fields.Integer):
    """An integer that is one already: not a bool, not a float, not text."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.make_error("invalid")
        return value


class Measure(fields.Field):
    """A finite number; anything else (text, NaN, infinity, a bool) becomes None, as a missing one."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> float | None:
        return float(value) if _finite(value) else None


class StrictMeasure(fields.Field):
    """A finite number or null; anything else is an error."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> float | None:
        if value is None:
            return None
        if not _finite(value):
            raise ma.ValidationError("must be a finite number or null")
        return float(value)


class _Message(ma.Schema):
    class Meta:
        unknown = EXCLUDE  # fields this side does not know are not carried along


class TrainSpecSchema(_Message):
    """What a peer is asked to train (built by the coordinator, checked by the peer before it trains)."""

    session = fields.String(required=True, validate=validate.Length(min=1, max=64))
    round = WholeNumber(load_default=0, validate=validate.Range(0, MAX_ROUND))
    seed = WholeNumber(load_default=0, validate=validate.Range(0, 2**32 - 1))
    target = fields.String(required=True, validate=validate.Length(min=1))
    features = fields.List(fields.String(), required=True)
    task = fields.String(required=True, validate=validate.OneOf(["classification", "regression"]))
    classes = fields.List(fields.String(), load_default=None, allow_none=True)
    normalization = fields.Dict(load_default=None, allow_none=True)
    hyperparameters = fields.Dict(required=True)
    data = fields.String(required=True, validate=validate.Length(min=1))  # read grant of its rows
    data_id = fields.String(required=True, validate=validate.Length(min=1))  # names the object for its cache
    weights = fields.String(required=True, validate=validate.Length(min=1))  # write grant of its weights
    initial_weights = fields.String(load_default=None, allow_none=True)  # read grant of its starting weights
    # Write grant of its training state, uploaded every `checkpoint_every` epochs; read grant of the one to resume.
    checkpoint = fields.String(load_default=None, allow_none=True)
    checkpoint_every = WholeNumber(load_default=0, validate=validate.Range(0, 10_000))
    resume_from = fields.String(load_default=None, allow_none=True)
    # Pause after this epoch (a search's trial trains a stretch at a time); 0: train every epoch.
    until = WholeNumber(load_default=0, validate=validate.Range(0, MAX_EPOCHS))
    # FedProx's μ: the pull of each local step towards the round's global weights (0: none).
    proximal_mu = fields.Float(load_default=0.0, validate=validate.Range(0.0, 10.0))
    # SCAFFOLD: read grant of the drift correction c − c_i each local step applies (None: none).
    correction = fields.String(load_default=None, allow_none=True)
    # Given `normalization`, the rows are training rows scaled so; `holdout`: the share of them the peer keeps
    # aside for its own validation curve (the platform's held-out rows are never in a task).
    holdout = fields.Float(load_default=0.0, validate=validate.Range(0.0, 0.5))
    keep_data = fields.Boolean(load_default=False)
    attempt = WholeNumber(load_default=0, validate=validate.Range(0, 10_000))  # the session's resumptions so far
    last_round = fields.Boolean(load_default=False)

    @ma.post_load
    def _limits(self, data: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        data["hyperparameters"] = check_hyperparameters(data["hyperparameters"])
        if data["until"] > data["hyperparameters"]["epochs"]:
            raise ma.ValidationError(f"past the task's {data['hyperparameters']['epochs']} epochs", "until")
        return data


# One instance of each schema: making one costs ~4x what loading a message through it does (the monitor
# reads thousands of heartbeats a second). Loading holds no state between calls, so threads share them.
_SPEC = TrainSpecSchema()


def train_spec(spec: Any) -> dict[str, Any]:
    """The spec if every field is of the right kind and within the platform's limits; LimitError otherwise."""
    if not isinstance(spec, dict):
        raise LimitError("the task's argument must be an object")
    try:
        return _SPEC.load(spec)
    except ma.ValidationError as exc:
        field, problem = next(iter(exc.normalized_messages().items()))
        raise LimitError(f"the task's {field!r} is not valid: {problem}") from None


class EpochSchema(_Message):
    """One epoch of a reported history (or its final epoch)."""

    epoch = WholeNumber(required=True, validate=validate.Range(min=1))
    loss = Measure(load_default=None)
    accuracy = Measure(load_default=None)
    val_loss = Measure(load_default=None)
    val_accuracy = Measure(load_default=None)
    val_r2 = Measure(load_default=None)
    samples_per_sec = Measure(load_default=None)
    seconds = Measure(load_default=None)
    samples = Measure(load_default=None)
    finished_at = Measure(load_default=None)


class TrainResultSchema(_Message):
    """A task's result as a peer reports it; history and final epoch are read by `train_result`."""

    history = fields.Raw(load_default=list)
    final = fields.Raw(load_default=None)
    bytes_fetched = fields.Raw(load_default=0)
    seconds = Measure(load_default=0.0)
    stopped = fields.Raw(load_default=True)
    device = fields.Raw(load_default=None)


_EPOCH, _RESULT = EpochSchema(), TrainResultSchema()


def _epoch(data: Any, epochs: int) -> dict[str, Any] | None:
    """One epoch's numbers, or None if it does not describe an epoch of a task of `epochs` epochs."""
    try:
        clean = _EPOCH.load(data) if isinstance(data, dict) else None
    except ma.ValidationError:
        return None
    if clean is None or clean["epoch"] > epochs:
        return None
    clean["epochs"] = epochs
    return clean


def train_result(result: Any, epochs: int) -> dict[str, Any]:
    """A peer's reported result reduced to known fields of known types, for a task of `epochs` epochs: each
    epoch once (the first report of it), in order; numbers that are not finite become None; a result that
    is not one becomes an empty, stopped one. Who it is from and where its weights are is not in it."""
    loaded = _RESULT.load(result if isinstance(result, dict) else {})
    history = loaded["history"] if isinstance(loaded["history"], list) else []
    seen: dict[int, dict[str, Any]] = {}
    for entry in history[:epochs]:
        clean = _epoch(entry, epochs)
        if clean is not None:
            seen.setdefault(clean["epoch"], clean)
    fetched, device = loaded["bytes_fetched"], loaded["device"]
    return {
        "final": _epoch(loaded["final"], epochs) or {},
        "history": [seen[e] for e in sorted(seen)],
        "bytes_fetched": fetched if isinstance(fetched, int) and not isinstance(fetched, bool)
        and 0 <= fetched < 1 << 50 else 0,
        "seconds": loaded["seconds"] or 0.0,
        "stopped": loaded["stopped"] is not False,
        "device": str(device)[:40] if device else None,
    }


def result_message(task_id: str, state: str, result: Any, traceback: str | None = None) -> dict[str, Any]:
    """A task's outcome as a peer publishes it to the results exchange."""
    return {"task_id": task_id, "status": state, "result": result,
            "traceback": traceback[-4000:] if traceback else None}


def failure(exc: BaseException) -> dict[str, Any]:
    """A failed task's result, as Celery reports an exception."""
    return {"exc_type": type(exc).__name__, "exc_message": [str(exc)[:200]]}


def describe_failure(result: Any) -> str:
    """A peer's account of its task's failure, as bounded plain text."""
    if isinstance(result, dict):
        kind = str(result.get("exc_type") or "error")[:80]
        message = result.get("exc_message")
        if isinstance(message, list | tuple):
            message = " ".join(str(part) for part in message)
        text = f"{kind}: {message}" if message else kind
    else:
        text = str(result)
    return "".join(ch if ch.isprintable() else " " for ch in text)[:500]


class HeartbeatSchema(_Message):
    """A `task-heartbeat` event: one epoch of one task, as a training task sends it (tasks/training.py)."""

    uuid = fields.String(required=True, validate=validate.Length(min=1, max=200))  # the task's id (Celery sets it)
    session = fields.String(required=True, validate=validate.Length(min=1, max=64))
    peer = fields.String(required=True, validate=validate.Length(min=1, max=64))
    round = WholeNumber(load_default=0, validate=validate.Range(0, MAX_ROUND))
    epoch = WholeNumber(required=True, validate=validate.Range(min=1))
    epochs = WholeNumber(load_default=None, allow_none=True)
    loss = StrictMeasure(load_default=None)
    accuracy = StrictMeasure(load_default=None)
    val_loss = StrictMeasure(load_default=None)
    val_accuracy = StrictMeasure(load_default=None)
    val_r2 = StrictMeasure(load_default=None)
    samples_per_sec = StrictMeasure(load_default=None)
    seconds = StrictMeasure(load_default=None)
    samples = StrictMeasure(load_default=None)
    finished_at = StrictMeasure(load_default=None)
    timestamp = Measure(load_default=None)


_HEARTBEAT = HeartbeatSchema()


def heartbeat(event: Any) -> dict[str, Any]:
    """The heartbeat `event` holds; ValueError naming what is wrong with it."""
    try:
        return _HEARTBEAT.load(event if isinstance(event, dict) else {})
    except ma.ValidationError as exc:
        raise ValueError(str(exc.normalized_messages())[:200]) from None


def heartbeat_fields(session: str, peer: str | None, round_: int, epoch: dict[str, Any]) -> dict[str, Any]:
    """A heartbeat's fields as a training task sends them (Celery adds the task's id as `uuid`)."""
    return {"session": session, "peer": peer, "round": round_, **epoch}


# --- stop notices ----------------------------------------------------------------------------------

class StopNotices:
    """Which sessions this peer has been told to stop, read from its stop queue at most every `every` s."""

    def __init__(self, app: Any, name: str, every: float = 0.5, keep: int = 1000,
                 clock=time.monotonic) -> None:
        self.app, self.queue = app, stop_queue(name)
        self.every, self.keep, self.clock = every, keep, clock
        self.stopped: OrderedDict[str, tuple[int, str]] = OrderedDict()  # session -> (latest attempt, why)
        self._next = 0.0
        self._connection: Connection | None = None
        self._lock = threading.Lock()

    def reason(self, session_id: str, attempt: int = 0) -> str | None:
        """Why attempt `attempt` of `session_id` was stopped, or None while it goes on."""
        with self._lock:
            if self.clock() >= self._next:
                self._next = self.clock() + self.every
                self._drain()
            stopped = self.stopped.get(session_id)
            return stopped[1] if stopped is not None and stopped[0] >= attempt else None

    def _drain(self) -> None:
        try:
            if self._connection is None:
                self._connection = self.app.connection_for_read()
            with self._connection.SimpleQueue(self.queue) as notices:
                while True:
                    try:
                        message = notices.get_nowait()
                    except notices.Empty:
                        return
                    body = message.payload if isinstance(message.payload, dict) else {}
                    attempt = body.get("attempt", 0)
                    if isinstance(body.get("session"), str) and isinstance(attempt, int):
                        before = self.stopped.get(body["session"], (-1, ""))[0]
                        why = str(body.get("reason") or "stopped")[:500]
                        self.stopped[body["session"]] = (max(before, attempt), why)
                        while len(self.stopped) > self.keep:
                            self.stopped.popitem(last=False)
                    message.ack()
        except Exception as exc:  # the broker blinked: ask again next time rather than fail the training
            log.warning("could not read stop notices (%s); will try again", exc)
            if self._connection is not None:
                self._connection.release()
            self._connection = None
