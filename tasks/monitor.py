"""The monitor: Celery events in, database state out.

Peers' `worker-online`/`worker-heartbeat` events mark them ONLINE, silence marks them OFFLINE (and lost
to the session they were training for; `worker-offline` only makes an idle one OFFLINE), and every
`task-heartbeat` a training task sends is stored once and shown as the peer's latest progress.
Heartbeats are buffered and written in batches, so a burst costs one insert per batch rather than one
per event.

Liveness is judged on evidence: a peer is lost when it has been silent while the monitor itself was
connected and receiving. A broker outage suspends the judgement, and after the monitor reconnects
peers get `reconnect_grace` seconds more to reconnect too (Celery's workers back off up to 30 s). A
lost peer is reported to the coordinator (`peertrain.peer_lost`), and so are tasks still open past their
deadline (`peertrain.deadline`); the session's strategy leaves their peers out while its quorum allows.

Each peer's events come through a queue of their own (`EventConsumer`), so one peer's flood waits in its
own queue while everyone else's events are read. Events are believed only as the gate (tasks/gate.py)
allows: a worker event only from the peer it is about (the broker's verified `user_id`), a heartbeat only
from the peer the coordinator gave that task, for its session, round and epochs. Everything else is
dropped and counted (`Monitor.dropped`, logged).

Run it with `python -m tasks.monitor`.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from celery import Celery
from kombu import Exchange, Queue

import models
from models import assignment as assignments
from models import heartbeat as heartbeats
from models import peer as peers
from models import session as sessions
from settings import Settings
from tasks import feed, lifecycle, protocol
from tasks.brokeradmin import BrokerAdmin
from tasks.gate import Budget, Dropped, Gate
from tasks.services import Clock

log = logging.getLogger(__name__)

PROGRESS_EVERY = 0.25  # seconds between writes of one session's peers' progress
PROGRESS = ("round", *protocol.PROGRESS)
ASSIGNMENT_SECONDS = 1.0  # how long a task's assignment, as read, answers for its heartbeats
# A task whose deadline the user did not set is overdue once it has taken this many times as long per epoch as
# the slowest of its fellows that finished (models.assignment.tighten), looked at every TIGHTEN_EVERY s.
DEADLINE_FACTOR = 3.0
TIGHTEN_EVERY = 5.0
RECRUIT_EVERY = 1.0  # seconds between looks for free peers that running elastic sessions could take
BEHIND_CHECKS = 50  # silent peers whose queue of events a sweep looks into (a broker round trip each)


class Monitor:
    """Applies events to the database; thread-safe, so a consumer thread and a timer can share it.

    `lose(session_id, peer, reason)` hands a silent peer to the coordinator, `overdue(session_id, task_ids)`
    its tasks past their deadline (by default both send the coordinator's tasks through `app`)."""

    def __init__(self, peer_timeout: float, start_timeout: float = 600.0, batch_size: int = 2000,
                 clock: Clock | None = None, app: Celery | None = None,
                 lose: Callable[[str, str, str], None] | None = None,
                 overdue: Callable[[str, list[str]], None] | None = None, reconnect_grace: float = 30.0,
                 consumers: Callable[[], set[str]] | None = None, look_every: float = 2.0,
                 deadline_floor: float = 60.0) -> None:
        self.peer_timeout = timedelta(seconds=peer_timeout)
        self.start_timeout = timedelta(seconds=start_timeout)
        self.batch_size = batch_size
        self.clock = clock or Clock()
        self.app = app
        self.lose = lose or self._send_peer_lost
        self.overdue = overdue or self._send_deadline
        self.reconnect_grace = reconnect_grace
        # The broker's own view (the peers whose login consumes their queue), asked every `look_every` s;
        # None where there is none (the in-memory broker: then the peers are the platform's own threads,
        # and their events say they are there).
        self.consumers = consumers
        self.look_every = look_every
        self._looked = float("-inf")
        self.deadline_floor = deadline_floor
        self._tightened = float("-inf")
        self._recruited = float("-inf")
        self.gate = Gate(storage=None, clock=self.clock, lookup=self._assignment)
        self.dropped = self.gate.dropped
        # Monotonic time since which the monitor has been receiving events (None: not connected), and
        # the extra time peers get after that before their silence counts.
        self._receiving_since: float | None = None
        # Set by whoever feeds it: whether peer `name`'s events wait unread in its queue.
        self.behind: Callable[[str], bool] = lambda name: False
        self._grace = 0.0
        self._was_connected = False
        self._reported: set[str] = set()  # overdue tasks handed to the coordinator
        self._lock = threading.Lock()
        self._beats: list[dict[str, Any]] = []
        self._latest: dict[tuple[Any, str], dict[str, Any]] = {}
        # task id -> (until when it answers, its assignment as read): a task's heartbeats read it once a second,
        # not once each (a thousand peers beat at once).
        self._assignments: dict[str, tuple[float, dict[str, Any] | None]] = {}
        # Peers seen alive (registered, not OFFLINE as far as this monitor wrote) -> (their hostname, when
        # their sign of life was last written); later beats are written together at a flush, a first
        # sighting at once.
        self._alive: dict[str, tuple[str, float]] = {}
        self._beating: set[str] = set()
        self._progress_at: dict[Any, float] = {}  # session -> when its progress may be written again
        self.stored = 0  # heartbeats this monitor wrote first (the coordinator writes those it missed)
        self.accepted = 0  # heartbeats it believed and queued for writing

    # --- events ------------------------------------------------------------------------------

    def on_event(self, event: dict[str, Any], sender: str | None = None) -> None:
        """Apply one event that broker user `sender` (the message's verified user_id) published."""
        kind = event.get("type")
        if kind == protocol.HEARTBEAT:
            self._heartbeat(event, sender)
        elif kind in ("worker-online", "worker-heartbeat", "worker-offline"):
            name = protocol.peer_of_worker(event.get("hostname"))
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
                if self.clock.monotonic() - self._alive[name][1] >= self.peer_timeout.total_seconds() / 3:
                    self._alive[name] = (event["hostname"], self.clock.monotonic())
                    with self._lock:
                        self._beating.add(name)
            elif peers.seen(name, event["hostname"], online=self.consumers is None):
                self._alive[name] = (event["hostname"], self.clock.monotonic())
            else:
                self._drop("unregistered peer", f"{kind} from {name}, which is not registered")

    def _drop(self, reason: str, detail: str) -> None:
        self.gate.drop(reason, detail, "an event")

    drop = _drop

    def over_budget(self, sender: str | None) -> None:
        """A peer sent more events than its budget: dropped before they were read."""
        self.gate.drop("over budget", f"events from {sender!r} beyond its budget", "an event")

    def _assignment(self, task_id: str) -> dict[str, Any] | None:
        """The assignment of `task_id` as read at most ASSIGNMENT_SECONDS ago."""
        now = self.clock.monotonic()
        cached = self._assignments.get(task_id)
        if cached is not None and cached[0] > now:
            return cached[1]
        found = assignments.get(task_id)
        if len(self._assignments) > 100_000:
            self._assignments = {k: v for k, v in self._assignments.items() if v[0] > now}
        self._assignments[task_id] = (now + ASSIGNMENT_SECONDS, found)
        return found

    def _heartbeat(self, event: dict[str, Any], sender: str | None) -> None:
        try:
            assignment, beat = self.gate.heartbeat(event, sender)
        except Dropped as exc:
            self._drop(exc.reason, exc.detail)
            return
        stamp = beat.pop("timestamp")
        beat.update(session_id=assignment["session_id"], position=assignment["position"],
                    sent_at=datetime.fromtimestamp(stamp, UTC).replace(tzinfo=None) if stamp is not None else None)
        with self._lock:
            self.accepted += 1
            self._beats.append(beat)
            key = (beat["session_id"], beat["peer"])
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

    def _progress(self, latest: dict[tuple[Any, str], dict[str, Any]]) -> None:
        """Show each peer's newest epoch on its session: one update per session, at most every PROGRESS_EVERY s.

        The heartbeats themselves are stored (and streamed) at once; the session's summary of them
        is a thousand-peer document, rewritten a few times a second rather than at every flush."""
        now, due = self.clock.monotonic(), defaultdict(dict)
        for key, beat in latest.items():
            if now >= self._progress_at.get(key[0], 0.0):
                due[key[0]][key[1]] = beat
            else:
                with self._lock:  # not yet: keep it unless a newer one came meanwhile
                    newer = self._latest.get(key)
                    if newer is None or (newer["round"], newer["epoch"]) < (beat["round"], beat["epoch"]):
                        self._latest[key] = beat
        written = self.clock.now()
        for session_id, beats in due.items():
            self._progress_at[session_id] = now + PROGRESS_EVERY
            progress = {peer: {**{name: beat.get(name) for name in PROGRESS}, "updated_at": written}
                        for peer, beat in beats.items()}
            # Heartbeats that arrive as a session ends are stored, but its record no longer changes.
            sessions.record_runs(session_id, {peer: beat["position"] for peer, beat in beats.items()}, progress,
                                 active_only=True)
        if len(self._progress_at) > 10_000:
            self._progress_at = {k: v for k, v in self._progress_at.items() if v > now}

    def _still_alive(self, names: set[str]) -> None:
        """Write the worker heartbeats of peers seen before, in one go; forget the ones no longer registered."""
        if not names:
            return
        known = peers.still_seen(sorted(names), online=self.consumers is None)
        for name in names - known:
            self._alive.pop(name, None)
            self._drop("unregistered peer", f"worker heartbeat from {name}, which is not registered (any more)")

    # --- liveness ------------------------------------------------------------------------------

    def receiving(self) -> None:
        """The monitor is connected and consuming again; after an outage, peers get time to reconnect."""
        if self._receiving_since is None:
            self._grace = self.reconnect_grace if self._was_connected else 0.0
            self._was_connected = True
            self._receiving_since = self.clock.monotonic()

    def blind(self) -> None:
        """The monitor lost the broker: it can no longer tell a silent peer from an unheard one."""
        if self._receiving_since is not None:
            log.warning("monitor disconnected: peers' silence is not judged until it is back")
        self._receiving_since = None

    def judging(self) -> bool:
        """True when silence is evidence: connected long enough for every live peer to have been heard."""
        since = self._receiving_since
        return since is not None and self.clock.monotonic() - since >= self.peer_timeout.total_seconds() + self._grace

    def sweep(self, caught_up: bool = True) -> list[str]:
        """Report silent peers and tasks past their deadline; fail sessions past theirs. Returns lost peers.
        `caught_up`: whether the feeder has read every event the broker sent it (if not, a peer's latest signs of
        life may be among those unread: silence is not judged)."""
        now = self.clock.now()
        lost = []
        if caught_up and self.judging():
            # Not a peer whose events wait unread (a backlog may hold the very events that show it alive). Asking
            # costs a broker round trip per peer: at most BEHIND_CHECKS a sweep, the rest judged at the next ones,
            # so that a monitor that fell behind (and sees many peers silent) is not held up further by asking.
            silent = peers.silent_since(now - self.peer_timeout)
            lost = [name for name in silent[:BEHIND_CHECKS] if not self.behind(name)]
            for name in lost:
                self._lost(name, f"went offline (no heartbeat for {self.peer_timeout.total_seconds():g} s)")
        lost += self._look(now)
        if caught_up and self.app is not None and self.clock.monotonic() >= self._recruited + RECRUIT_EVERY:
            # Peers that came online go to running elastic sessions with room (once the monitor knows who is
            # online: not while it is behind).
            self._recruited = self.clock.monotonic()
            try:
                lifecycle.recruit(self.app, self.peer_timeout)
            except Exception as exc:  # the broker is away: the peers were freed again, the next look retries
                log.warning("could not hand new peers to elastic sessions (%s)", exc)
        if self.clock.monotonic() >= self._tightened + TIGHTEN_EVERY:
            self._tightened = self.clock.monotonic()
            assignments.tighten(DEADLINE_FACTOR, self.deadline_floor)
        late: dict[str, list[str]] = defaultdict(list)
        for assignment in assignments.overdue(now):
            if assignment["_id"] not in self._reported:
                self._reported.add(assignment["_id"])
                late[str(assignment["session_id"])].append(assignment["_id"])
        for session_id, task_ids in late.items():
            self.overdue(session_id, task_ids)
        for session in sessions.overdue(now, self.start_timeout):
            why = ("it ran past its deadline" if session.status == sessions.RUNNING
                   else "no coordinator started it in time")
            lifecycle.end(self._app(), session.id, sessions.FAILED, f"the session was stopped: {why}", at=now)
        if len(self._reported) > 100_000:
            self._reported.clear()
        return lost

    def _look(self, now: datetime) -> list[str]:
        """Ask the broker which peers consume their own queue: they are ONLINE, and (while the monitor is in a
        position to judge) the others are OFFLINE, and lost to the session they were training for."""
        if self.consumers is None or self.clock.monotonic() < self._looked + self.look_every:
            return []
        self._looked = self.clock.monotonic()
        try:
            consuming = self.consumers()
        except Exception as exc:  # the management API is away: no evidence either way
            log.warning("could not ask the broker which peers are consuming (%s)", exc)
            return []
        away = peers.consuming(consuming, now, judge=self.judging())
        for peer in away:
            self._alive.pop(peer.name, None)
            log.info("peer %s is OFFLINE: its login no longer consumes its queue", peer.name)
            if peer.status == peers.TRAINING and peer.session_id is not None:
                self.lose(str(peer.session_id), peer.name, "went offline (its worker stopped taking tasks)")
        return [peer.name for peer in away]

    def _lost(self, name: str, why: str) -> None:
        self._alive.pop(name, None)
        before = peers.gone(name)
        if before is None:
            return
        log.info("peer %s is OFFLINE: %s", name, why)
        if before.status == peers.TRAINING and before.session_id is not None:
            self.lose(str(before.session_id), name, why)

    def _app(self) -> Celery:
        if self.app is None:
            raise RuntimeError("this monitor was made without a Celery app to reach the coordinator with")
        return self.app

    def _send_peer_lost(self, session_id: str, peer: str, reason: str) -> None:
        """Hand a lost peer to the coordinator, which decides whether its session goes on without it."""
        self._app().send_task("peertrain.peer_lost", args=[session_id, peer, reason])

    def _send_deadline(self, session_id: str, task_ids: list[str]) -> None:
        self._app().send_task("peertrain.deadline", args=[session_id, task_ids])


class EventConsumer:
    """Feeds a Monitor from the registered peers' queues of events (protocol.events_queue), one per peer.

    The queues outlive the monitor, so events sent while it is down or restarting are applied when it is
    back (capped in length and age so that an absent monitor cannot fill the broker). The broker delivers
    from each queue in turn, at most `prefetch` unacknowledged per queue, and a peer that sends beyond its
    budget is not read until its budget has filled again: a flood waits in its own queue (losing its own
    oldest events), costing the monitor nothing, while every other peer's events are read at once. A
    peer registered later is read from within `sweep_every` s; a removed one's queue is deleted once it
    is read no more. Messages are acknowledged only once their heartbeats are written. Before each sweep it
    reads what the broker has sent already (for at most `catch_up` s): silence is judged only when none is
    left unread.
    """

    def __init__(self, app: Celery, monitor: Monitor, queue: str, flush_every: float = 0.05,
                 sweep_every: float = 1.0, prefetch: int = 500, budget: Budget | None = None,
                 catch_up: float = 2.0) -> None:
        self.app = app
        self.monitor = monitor
        self.queue_name = queue  # the prefix of the peers' queues of events
        self.flush_every = flush_every
        self.sweep_every = sweep_every
        self.prefetch = prefetch
        self.stopped = threading.Event()
        self.ready = threading.Event()
        self.budget = budget or Budget(rate=200.0, burst=2000.0)
        self.catch_up = catch_up

    def queue(self, name: str) -> Queue:
        """The queue of peer `name`'s events."""
        return protocol.events_queue(self.app.conf.event_exchange, self.queue_name, name)

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
        amqp = connection.transport.driver_type == "amqp"
        channel = connection.default_channel
        reading: set[str] = set()
        paused: dict[str, float] = {}  # peers over their budget -> when their queue is read again
        pausing: set[str] = set()

        def on_message(message: Any) -> None:
            # The sender's budget first, from the message's verified user_id: a flood is dropped undecoded.
            sender = message.properties.get("user_id")
            pending.append(message)
            if not self.budget.allow(sender):
                self.monitor.over_budget(sender)
                if (name := protocol.peer_of(sender)) in reading:
                    pausing.add(name)  # not here: cancelling a consumer waits for the broker's answer
                return
            try:
                body = message.decode()
            except Exception as exc:  # not JSON, or too deep: nothing a peer sends may stop the monitor
                self.monitor.drop("malformed event", f"from {sender!r}: {type(exc).__name__}")
                return
            for event in body if isinstance(body, list) else (body,):
                if isinstance(event, dict):
                    self.monitor.on_event(event, sender)

        def settle() -> None:
            self.monitor.flush()
            if pending:
                if amqp:  # only AMQP acknowledges up to a delivery tag in one frame; virtual transports one by one
                    pending[-1].ack(multiple=True)
                else:
                    for message in pending:
                        message.ack()
                pending.clear()

        def follow() -> None:
            """Read the queues of the peers registered now, and those of peers removed no more."""
            registered = set(peers.names())
            for name in registered - reading:
                consumer.add_queue(self.queue(name))
            if registered - reading:
                consumer.consume()
            for name in reading - registered:
                paused.pop(name, None)
                queue = self.queue(name)(channel)
                consumer.cancel_by_queue(queue.name)
                queue.delete()
                if amqp:  # the in-memory broker's exchanges end with this process (and deleting one revives its queues)
                    Exchange(protocol.event_exchange(self.app.conf.event_exchange, name))(channel).delete()
            reading.clear()
            reading.update(registered)

        def pause() -> None:
            """Read no more of the peers over their budget until it has filled again."""
            for name in pausing - paused.keys():
                consumer.cancel_by_queue(self.queue(name).name)
                paused[name] = time.monotonic() + self.budget.burst / self.budget.rate
                log.warning("peer %s sent beyond its budget: its events are not read for %.0f s", name,
                            self.budget.burst / self.budget.rate)
            pausing.clear()

        def resume(now: float) -> None:
            due = [name for name, until in paused.items() if until <= now]
            for name in due:
                del paused[name]
                consumer.add_queue(self.queue(name))
            if due:
                consumer.consume()

        def read_what_came(limit: float) -> bool:
            """Apply the events already sent (for at most `limit` s); True once none is left to read."""
            now = time.monotonic()
            until, flush_at = now + limit, now + self.flush_every
            while now < until:
                try:
                    connection.drain_events(timeout=0.001)
                except TimeoutError:
                    return True
                if pausing:  # a flood is not read on while the rest is caught up with
                    pause()
                now = time.monotonic()
                # Written as often as in the main loop: catching up must not hold heartbeats back from streams.
                if now >= flush_at or len(pending) >= self.monitor.batch_size:
                    settle()
                    flush_at = now + self.flush_every
            return False

        def behind(name: str) -> bool:
            """Whether peer `name`'s events wait unread: the very ones that would show it alive may be among them."""
            return name in reading and channel.queue_declare(self.queue(name).name, passive=True).message_count > 0

        consumer = connection.Consumer(queues=[], on_message=on_message, accept=["json"], no_ack=False,
                                       prefetch_count=self.prefetch)
        with consumer:
            follow()
            self.monitor.behind = behind
            self.monitor.receiving()
            self.ready.set()
            now = time.monotonic()
            next_flush, next_sweep = now + self.flush_every, now + self.sweep_every
            while not self.stopped.is_set():
                try:
                    connection.drain_events(timeout=min(self.flush_every, 0.25))
                except TimeoutError:
                    pass
                if pausing:
                    pause()
                now = time.monotonic()
                if now >= next_flush or len(pending) >= self.monitor.batch_size:
                    settle()
                    next_flush = now + self.flush_every
                if now >= next_sweep:
                    # What the broker has sent already is read first: a monitor that fell behind (a busy process)
                    # holds peers' latest signs of life unread, and would judge them silent.
                    caught_up = read_what_came(self.catch_up)
                    settle()  # before a removed peer's queue (holding what is unacknowledged) goes
                    follow()
                    resume(now)
                    self.monitor.sweep(caught_up)
                    next_sweep = time.monotonic() + self.sweep_every
            settle()
        self.monitor.behind = lambda name: False


def broker_view(settings: Settings) -> Callable[[], set[str]] | None:
    """The peers whose own login consumes their own task queue, as RabbitMQ's management API shows it; None on
    the in-memory broker, which has no such view."""
    if settings.embedded_broker:
        return None
    admin = BrokerAdmin.from_settings(settings)

    def consuming() -> set[str]:
        return {name for queue, user in admin.consumers()
                if (name := protocol.peer_of(user)) is not None and queue == protocol.task_queue(name)}

    return consuming


def build(app: Celery, settings: Settings, clock: Clock | None = None) -> EventConsumer:
    """The monitor as `settings` configure it (the database must be connected)."""
    monitor = Monitor(settings.peer_timeout_seconds, settings.session_start_timeout, clock=clock, app=app,
                      consumers=broker_view(settings), deadline_floor=settings.deadline_floor)
    budget = Budget(rate=settings.peer_event_rate, burst=10 * settings.peer_event_rate)
    return EventConsumer(app, monitor, settings.monitor_queue, budget=budget)


def main() -> None:
    from tasks.celery import create_app

    settings = Settings.from_env()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    models.connect(settings.mongodb_uri)
    app = create_app(settings)
    feed.install(app)  # the events the monitor stores are announced to every API process
    consumer = build(app, settings)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: consumer.stop())
    log.info("monitor consuming peers' events from %s.*", settings.monitor_queue)
    consumer.run()


if __name__ == "__main__":
    main()
