"""The monitor: Celery events in, database state out.

Peers' `worker-online`/`worker-heartbeat` events mark them ONLINE, silence marks them OFFLINE (and lost
to the session they were training for; `worker-offline` only makes an idle one OFFLINE), and every
`task-heartbeat` a training task sends is stored once and shown as the peer's latest progress.
Heartbeats are buffered and written in batches, so a burst costs one insert per batch rather than one
per event.

Liveness is judged on evidence: a peer is lost when it has been silent while the monitor itself was
connected and receiving. A broker outage suspends the judgement, and after the monitor reconnects
peers get `reconnect_grace` seconds more to reconnect too (Celery's workers back off up to 30 s). A
lost peer, and a peer still training when its round's deadline (`round_timeout`) passes, is reported
to the coordinator (`peertrain.peer_lost`), which leaves it out while the session's quorum allows.

Events are believed only from the peer they are about. Peers stamp every event with their broker
user (`user_id`, which RabbitMQ checks against the sender's login), so an event naming peer `a` counts
only when `a` sent it and `a` is registered; a heartbeat also only for a session and round `a` is
training, with an epoch within that round's. Everything else is dropped and counted
(`Monitor.dropped`, logged).

Run it with `python -m tasks.monitor`.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from bson import ObjectId
from bson.errors import InvalidId
from celery import Celery
from celery.events.event import get_exchange
from kombu import Queue, binding

import models
from models import heartbeat as heartbeats
from models import peer as peers
from models import session as sessions
from models import utcnow
from settings import Settings
from tasks import lifecycle, protocol

log = logging.getLogger(__name__)

PEER_PREFIX = "peer."
HEARTBEAT = "task-heartbeat"
ROUTING_KEYS = ("worker.#", "task.heartbeat")  # Celery routes an event by its type, '-' read as '.'
PROGRESS_EVERY = 0.25  # seconds between writes of one session's peers' progress
PROGRESS = ("round", "epoch", "epochs", "loss", "accuracy", "val_loss", "val_accuracy", "val_r2", "samples_per_sec")


def peer_name(hostname: str | None) -> str | None:
    """`peer.<name>@host` → `<name>`; None for workers that are not peers (the coordinator, …)."""
    if not isinstance(hostname, str) or not hostname.startswith(PEER_PREFIX):
        return None
    return hostname[len(PEER_PREFIX):].split("@", 1)[0] or None


class Monitor:
    """Applies events to the database; thread-safe, so a consumer thread and a timer can share it."""

    def __init__(self, peer_timeout: float, start_timeout: float = 600.0, batch_size: int = 2000,
                 clock=time.monotonic, lose: Callable[[str, str, int, str], None] | None = None,
                 reconnect_grace: float = 30.0) -> None:
        self.peer_timeout = timedelta(seconds=peer_timeout)
        self.start_timeout = timedelta(seconds=start_timeout)
        self.batch_size = batch_size
        self.clock = clock
        self.lose = lose or _send_peer_lost
        self.reconnect_grace = reconnect_grace
        # Monotonic time since which the monitor has been receiving events (None: not connected), and
        # the extra time peers get after that before their silence counts.
        self._receiving_since: float | None = None
        self._grace = 0.0
        self._was_connected = False
        self._reported: set[tuple[str, str, int]] = set()
        self._lock = threading.Lock()
        self._beats: list[dict[str, Any]] = []
        self._latest: dict[tuple[ObjectId, str], dict[str, Any]] = {}
        # session -> what its peers are training (models.session.assignments), kept briefly: read once a
        # second per session, not once per event or per peer (a session may have a thousand peers).
        self._assignments: dict[ObjectId, tuple[float, dict[str, Any] | None, float]] = {}
        # Peers seen alive (registered, not OFFLINE as far as this monitor wrote) -> (their hostname, when
        # their sign of life was last written); later beats are written together at a flush, a first
        # sighting at once.
        self._alive: dict[str, tuple[str, float]] = {}
        self._beating: set[str] = set()
        self._progress_at: dict[ObjectId, float] = {}  # session -> when its progress may be written again
        self.stored = 0  # heartbeats this monitor wrote first (the coordinator writes those it missed)
        self.accepted = 0  # heartbeats it believed and queued for writing
        self.dropped: Counter[str] = Counter()
        self._next_report = 0.0

    # --- events ------------------------------------------------------------------------------

    def on_event(self, event: dict[str, Any], sender: str | None = None) -> None:
        """Apply one event that broker user `sender` (the message's verified user_id) published."""
        kind = event.get("type")
        if kind == HEARTBEAT:
            self._heartbeat(event, protocol.peer_of(sender))
        elif kind in ("worker-online", "worker-heartbeat", "worker-offline"):
            name = peer_name(event.get("hostname"))
            if name is None:
                return  # the platform's own workers (the coordinator): nothing to track
            if name != protocol.peer_of(sender):
                self._drop("not its own worker", f"{kind} for peer {name} sent by {sender!r}")
            elif kind == "worker-offline":
                # Not proof it is gone: Celery sends it on every lost connection too (then worker-online
                # again), and a warm shutdown finishes the task first. An idle peer takes no work until it is
                # heard again; a training one is judged on its silence.
                self._alive.pop(name, None)  # its next sign of life is written at once
                if peers.gone(name, idle_only=True):
                    log.info("peer %s is OFFLINE: its worker said it was shutting down", name)
            elif self._alive.get(name, (None,))[0] == event["hostname"]:
                # A third of the silence limit is fresh enough: a live peer is never judged silent, and a
                # thousand peers beating every 2 s cost a few hundred writes a second, not five hundred.
                if self.clock() - self._alive[name][1] >= self.peer_timeout.total_seconds() / 3:
                    self._alive[name] = (event["hostname"], self.clock())
                    with self._lock:
                        self._beating.add(name)
            elif peers.seen(name, event["hostname"]):
                self._alive[name] = (event["hostname"], self.clock())
            else:
                self._drop("unregistered peer", f"{kind} from {name}, which is not registered")

    def _drop(self, reason: str, detail: str) -> None:
        self.dropped[reason] += 1
        if self.dropped[reason] == 1 or self.clock() >= self._next_report:
            self._next_report = self.clock() + 10.0
            log.warning("dropped an event (%s): %s; dropped so far: %s", reason, detail, dict(self.dropped))

    def _session(self, session_id: ObjectId, round_: int = -1, peer: str | None = None) -> dict[str, Any] | None:
        """What the session's peers train now (cached 1 s; read again when a later round shows up, or, at
        most every 0.1 s, when `peer` is not known to train `round_`: an asynchronous peer's next task)."""
        cached = self._assignments.get(session_id)
        now = self.clock()
        if cached is not None and cached[0] > now and cached[1] is not None:
            found = cached[1]
            current = (found["round"] if found["round"] is not None else -1) >= round_
            if current and (peer is None or found["peers"].get(peer, (0, 0, None))[2] == round_
                            or now < cached[2] + 0.1):
                return found
        found = sessions.assignments(session_id)
        if len(self._assignments) > 10_000:
            self._assignments.clear()
        self._assignments[session_id] = (now + 1.0, found, now)
        return found

    def _assignment(self, session_id: ObjectId, peer: str, round_: int) -> tuple[int, int] | None:
        """The (round, epochs per round) `peer` is training for `session_id`, or None if it is not."""
        found = self._session(session_id, round_, peer)
        if found is None or peer not in found["peers"]:
            return None
        _, epochs, round_now = found["peers"][peer]
        return round_now, epochs

    def _heartbeat(self, event: dict[str, Any], sender: str | None) -> None:
        try:
            session_id = ObjectId(event["session"])
            peer, round_, epoch = event["peer"], event.get("round") or 0, event["epoch"]
            if not (isinstance(peer, str) and isinstance(round_, int) and isinstance(epoch, int)):
                raise TypeError("peer, round and epoch must be text and whole numbers")
            metrics = {name: event.get(name) for name in heartbeats.METRICS}
            if any(v is not None and (isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v))
                   for v in metrics.values()):
                raise TypeError("metrics must be finite numbers")
        except (KeyError, TypeError, ValueError, InvalidId) as exc:
            self._drop("malformed heartbeat", f"{exc} in {str(event)[:200]}")
            return
        if peer != sender:
            self._drop("not its own heartbeat", f"heartbeat for peer {peer!r} sent by {sender!r}")
            return
        assigned = self._assignment(session_id, peer, round_)
        if assigned is None or assigned[0] != round_ or not 1 <= epoch <= assigned[1]:
            self._drop("not its task", f"peer {peer}: session {session_id} round {round_} epoch {epoch} is not "
                                        f"one it is training ({assigned})")
            return
        beat = {
            "session_id": session_id, "peer": peer, "round": round_, "epoch": epoch,
            "sent_at": datetime.fromtimestamp(event["timestamp"], UTC).replace(tzinfo=None)
            if isinstance(event.get("timestamp"), int | float) else None,
            **metrics, "epochs": assigned[1],
        }
        with self._lock:
            self.accepted += 1
            self._beats.append(beat)
            key = (session_id, peer)
            latest = self._latest.get(key)
            if latest is None or (latest["round"], latest["epoch"]) <= (beat["round"], beat["epoch"]):
                self._latest[key] = beat
            full = len(self._beats) >= self.batch_size
        if full:
            self.flush()

    # --- writing -----------------------------------------------------------------------------

    def flush(self) -> int:
        """Write buffered heartbeats and each peer's newest progress; returns how many were new."""
        with self._lock:
            beats, self._beats = self._beats, []
            latest, self._latest = self._latest, {}
            beating, self._beating = self._beating, set()
        self._still_alive(beating)
        new = heartbeats.insert_many(beats) if beats else 0
        self._progress(latest)
        self.stored += new
        return new

    def _progress(self, latest: dict[tuple[ObjectId, str], dict[str, Any]]) -> None:
        """Show each peer's newest epoch on its session: one update per session, at most every PROGRESS_EVERY s.

        The heartbeats themselves are stored (and streamed) at once; the session's summary of them
        is a thousand-peer document, rewritten a few times a second rather than at every flush."""
        now, due = self.clock(), {}
        for key, beat in latest.items():
            if now >= self._progress_at.get(key[0], 0.0):
                due.setdefault(key[0], {})[key[1]] = beat
            else:
                with self._lock:  # not yet: keep it unless a newer one came meanwhile
                    newer = self._latest.get(key)
                    if newer is None or (newer["round"], newer["epoch"]) < (beat["round"], beat["epoch"]):
                        self._latest[key] = beat
        written = utcnow()
        for session_id, beats in due.items():
            self._progress_at[session_id] = now + PROGRESS_EVERY
            progress = {peer: {**{name: beat.get(name) for name in PROGRESS}, "updated_at": written}
                        for peer, beat in beats.items()}
            found = self._session(session_id)
            position = {name: at for name, (at, *_) in found["peers"].items()} if found else {}
            # Heartbeats that arrive as a session ends are stored, but its record no longer changes.
            sessions.record_runs(session_id, position, {p: f for p, f in progress.items() if p in position},
                                 active_only=True)
            for peer in progress.keys() - position.keys():
                sessions.record_progress(session_id, peer, progress[peer])
        if len(self._progress_at) > 10_000:
            self._progress_at = {k: v for k, v in self._progress_at.items() if v > now}

    def _still_alive(self, names: set[str]) -> None:
        """Write the worker heartbeats of peers seen before, in one go; forget the ones no longer registered."""
        if not names:
            return
        known = peers.still_seen(sorted(names))
        for name in names - known:
            self._alive.pop(name, None)
            self._drop("unregistered peer", f"worker heartbeat from {name}, which is not registered (any more)")

    # --- liveness ------------------------------------------------------------------------------

    def receiving(self) -> None:
        """The monitor is connected and consuming again; after an outage, peers get time to reconnect."""
        if self._receiving_since is None:
            self._grace = self.reconnect_grace if self._was_connected else 0.0
            self._was_connected = True
            self._receiving_since = self.clock()

    def blind(self) -> None:
        """The monitor lost the broker: it can no longer tell a silent peer from an unheard one."""
        if self._receiving_since is not None:
            log.warning("monitor disconnected: peers' silence is not judged until it is back")
        self._receiving_since = None

    def judging(self) -> bool:
        """True when silence is evidence: connected long enough for every live peer to have been heard."""
        since = self._receiving_since
        return since is not None and self.clock() - since >= self.peer_timeout.total_seconds() + self._grace

    def sweep(self) -> list[str]:
        """Report silent peers and rounds past their deadline; fail sessions past theirs. Returns lost peers."""
        now = utcnow()
        lost = []
        if self.judging():
            lost = [p.name for p in peers.silent_since(now - self.peer_timeout)]
            for name in lost:
                self._lost(name, f"went offline (no heartbeat for {self.peer_timeout.total_seconds():g} s)")
        for session in sessions.rounds_overdue(now):
            round_ = session.launch["round"]
            for run in session.peers:
                key = (str(session.id), run.name, round_)
                if run.name in session.launch["peers"] and run.status == sessions.RUNNING and key not in self._reported:
                    self._reported.add(key)
                    timeout = (session.launch["deadline"] - session.launch["started_at"]).total_seconds()
                    self.lose(str(session.id), run.name, round_,
                              f"did not finish round {round_} within its {timeout:g} s")
        for session in sessions.overdue(now, self.start_timeout):
            why = ("it ran past its deadline" if session.status == sessions.RUNNING
                   else "no coordinator started it in time")
            lifecycle.end(session.id, sessions.FAILED, f"the session was stopped: {why}")
        if len(self._reported) > 100_000:
            self._reported.clear()
        return lost

    def _lost(self, name: str, why: str) -> None:
        self._alive.pop(name, None)
        before = peers.gone(name)
        if before is None:
            return
        log.info("peer %s is OFFLINE: %s", name, why)
        if before.status == peers.TRAINING and before.session_id is not None:
            session = sessions.TrainingSession.objects(id=before.session_id).only("launch").first()
            if session is not None and name in session.launch.get("peers", []):
                self.lose(str(before.session_id), name, session.launch["round"], why)


def _send_peer_lost(session_id: str, peer: str, round_: int, reason: str) -> None:
    """Hand a lost peer to the coordinator, which decides whether its session goes on without it."""
    from tasks.celery import app

    app.send_task("peertrain.peer_lost", args=[session_id, peer, round_, reason],
                  queue=app.conf.task_default_queue)


class EventConsumer:
    """Feeds a Monitor from a durable queue bound to Celery's event exchange.

    The queue outlives the monitor, so events sent while it is down or restarting are applied when
    it is back (capped in length and age so that an absent monitor cannot fill the broker).
    Messages are acknowledged only once their heartbeats are written.
    """

    def __init__(self, app: Celery, monitor: Monitor, queue: str, flush_every: float = 0.05,
                 sweep_every: float = 1.0, max_length: int = 1_000_000, message_ttl: float = 86400) -> None:
        self.app = app
        self.monitor = monitor
        self.queue_name = queue
        self.flush_every = flush_every
        self.sweep_every = sweep_every
        self.max_length = max_length
        self.message_ttl = message_ttl
        self.stopped = threading.Event()
        self.ready = threading.Event()

    def queue(self, connection) -> Queue:
        exchange = get_exchange(connection, name=self.app.conf.event_exchange)
        # Only the events the monitor reads: workers' and heartbeats. The other task events (sent,
        # received, started, succeeded: four per task) would be most of its traffic with many peers.
        return Queue(self.queue_name, durable=True, auto_delete=False, max_length=self.max_length,
                     message_ttl=self.message_ttl,
                     bindings=[binding(exchange, routing_key=key) for key in ROUTING_KEYS])

    def run(self) -> None:
        """Consume until `stop()`, reconnecting with a growing pause when the broker goes away."""
        pause = 0.5
        while not self.stopped.is_set():
            try:
                with self.app.connection_for_read() as connection:
                    connection.ensure_connection(max_retries=1)
                    pause = 0.5
                    self._consume(connection)
            except Exception as exc:
                self.monitor.blind()
                if self.stopped.is_set():
                    break
                log.warning("event consumer lost its connection (%s); retrying in %.1f s", exc, pause)
                self.stopped.wait(pause)
                pause = min(pause * 2, 10.0)

    def stop(self) -> None:
        self.stopped.set()

    def _consume(self, connection) -> None:
        pending: list[Any] = []
        # Only AMQP acknowledges up to a delivery tag in one frame; virtual transports ack one by one.
        bulk_ack = connection.transport.driver_type == "amqp"

        def on_message(body: Any, message: Any) -> None:
            sender = message.properties.get("user_id")
            for event in body if isinstance(body, list) else (body,):
                if isinstance(event, dict):
                    self.monitor.on_event(event, sender)
            pending.append(message)

        def settle() -> None:
            self.monitor.flush()
            if pending:
                if bulk_ack:
                    pending[-1].ack(multiple=True)
                else:
                    for message in pending:
                        message.ack()
                pending.clear()

        queue = self.queue(connection)
        # A queue declared by an earlier monitor took every event ("#"): it no longer needs to.
        bound = queue(connection.default_channel)
        bound.declare()
        bound.unbind_from(get_exchange(connection, name=self.app.conf.event_exchange), routing_key="#")
        consumer = connection.Consumer(queues=[queue], callbacks=[on_message], accept=["json"],
                                       no_ack=False, prefetch_count=5000)
        with consumer:
            self.monitor.receiving()
            self.ready.set()
            now = time.monotonic()
            next_flush, next_sweep = now + self.flush_every, now
            while not self.stopped.is_set():
                try:
                    connection.drain_events(timeout=min(self.flush_every, 0.25))
                except TimeoutError:
                    pass
                now = time.monotonic()
                if now >= next_flush or len(pending) >= self.monitor.batch_size:
                    settle()
                    next_flush = now + self.flush_every
                if now >= next_sweep:
                    self.monitor.sweep()
                    next_sweep = now + self.sweep_every
            settle()


def build(app: Celery, settings: Settings) -> EventConsumer:
    """The monitor as `settings` configure it (the database must be connected)."""
    monitor = Monitor(settings.peer_timeout_seconds, settings.session_start_timeout)
    return EventConsumer(app, monitor, settings.monitor_queue)


def main() -> None:
    from tasks.celery import app

    settings = Settings.from_env()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    models.connect(settings.mongodb_uri)
    consumer = build(app, settings)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: consumer.stop())
    log.info("monitor consuming events from %s", settings.monitor_queue)
    consumer.run()


if __name__ == "__main__":
    main()
