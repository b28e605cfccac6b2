"""The session event stream (GET /sessions/<id>/events): a session's log replayed, then followed live.

Each API process binds one queue of its own to the broker's session-event exchange (tasks/feed.py)
and hands what arrives to the streams open on that session in this process (`Hub`); no stream reads
the database to learn about new events. A stream (`Cursor`) subscribes first, then reads the log
after the client's Last-Event-ID (or from the start), then sends what arrives live. The log has no
gaps (models/event.py), so an announcement that skips ahead of the stream (announcements of two
writers can cross, one can be lost) means the events between are already in the database: the
stream reads them there. Events whose key the stream has already sent are skipped, and after the
`end` event the stream closes.

Two drivers share the Cursor: `frames` (a blocking generator, for WSGI servers: `flask run`, the
test client) and webapp/asgi.py's coroutine (production: an open stream holds no thread).
"""

from __future__ import annotations

import json
import logging
import math
import queue
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from bson import ObjectId
from celery import Celery
from kombu import Queue

from models import TrainingSession
from models import event as events
from models.session import ACTIVE
from tasks import feed

log = logging.getLogger(__name__)

EXTENSION = "peertrain.stream"
SESSION_HEADER = "X-Session-Id"  # the HEAD answer's: the whole id of the session a stream's path names
# A comment line on an idle stream this often: a client that hears nothing for two seconds knows the stream is
# gone (a server that hangs, a link gone silent) and asks again; proxies never see it idle.
KEEPALIVE_SECONDS = 1.0
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # the latter: nginx passes events at once
MIMETYPE = "text/event-stream"
RESYNC = None  # delivered instead of a batch: announcements may have been missed, read the log


def frame(event: dict[str, Any]) -> str:
    """One event in Server-Sent Events form (kept on the event: every stream of its session sends the same)."""
    text = event.get(_FRAME)
    if text is None:
        try:
            data = json.dumps(event["data"], separators=(",", ":"), allow_nan=False)
        except ValueError:  # a NaN or infinity (a peer's numbers are not trusted): JSON has no such thing
            data = json.dumps(_finite(event["data"]), separators=(",", ":"), allow_nan=False)
        text = event[_FRAME] = f"id: {event['seq']}\nevent: {event['kind']}\ndata: {data}\n\n"
    return text


_FRAME = "_frame"


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value


KEEPALIVE = ": keep-alive\n\n"
# Delivered to every open stream when the server stops: it sends this last event (no id, so a client resumes
# where it was) and closes the stream.
STOPPING = object()
STOPPING_FRAME = 'event: stopping\ndata: {"message":"the server is stopping; reconnect with Last-Event-ID"}\n\n'


def parse_last_event_id(value: str | None) -> int:
    """The Last-Event-ID header as the seq to resume after (0: from the start); ValueError when malformed."""
    if value is None or not value.strip():
        return 0
    seq = int(value.strip())
    if seq < 0:
        raise ValueError("negative")
    return seq


class Cursor:
    """Where one client is in a session's log: the last seq it was sent and the keys it has seen.

    Its methods that read the database block; the asynchronous driver runs them in a thread.
    """

    def __init__(self, session_id: ObjectId, last: int = 0) -> None:
        self.session_id = session_id
        self.last = last
        self.seen: set[tuple[int | None, str]] = set()  # events.seen_as of each event sent
        self.ended = False

    def start(self) -> list[dict[str, Any]]:
        """The events to send first: everything after `last` in the log."""
        if self.last:
            # (Only the current attempt's: what an interrupted one reported does not hide the resumed one's.)
            self.seen = {(None, key) for key in events.keys(self.session_id, upto=self.last)}
            if (None, events.END) in self.seen:
                # The client had the end already: send it again (and close), it asks for nothing else.
                self.seen.discard((None, events.END))
                self.last = min(self.last, events.seq_of(self.session_id, events.END) - 1)
        sent = self.catch_up()
        if not self.ended:
            sent += self._heal()
        return sent

    def _heal(self) -> list[dict[str, Any]]:
        # A session that ended without its end in the log (a writer died between the two writes, or it
        # ended before the log existed) gets it now; appending is idempotent by key, so races are harmless.
        session = TrainingSession.objects(id=self.session_id).only("status", "reason").first()
        if session is None or session.status in ACTIVE:
            return []
        events.append_new(self.session_id, [events.status(session.status, session.reason),
                                            events.end(session.status, session.reason)])
        return self.catch_up()

    def catch_up(self) -> list[dict[str, Any]]:
        """Read the log after `last` (blocking) and take it."""
        # The log itself is the record: a hole in it (only events deleted by hand make one) is skipped.
        taken, _ = self.take(events.after(self.session_id, self.last), the_log=True)
        return taken

    def take(self, batch: list[dict[str, Any]], the_log: bool = False) -> tuple[list[dict[str, Any]], bool]:
        """The events of `batch` to send; True as well when it skips ahead (the log has the events between)."""
        out = []
        for event in batch:
            if self.ended:
                break
            if event["seq"] <= self.last:
                continue  # replayed and announced both, or announced twice
            if event["seq"] != self.last + 1 and not the_log:
                return out, True
            self.last = event["seq"]
            if events.seen_as(event) in self.seen or events.superseded(event):
                continue  # a fact reported twice (the first report counts), or an end the session went on from
            self.seen.add(events.seen_as(event))
            out.append(event)
            self.ended = event["kind"] == events.END
        return out, False


class Hub:
    """This process's streams by session, fed by one listener on the broker (started with the first stream)."""

    def __init__(self, celery: Celery) -> None:
        self.celery = celery
        self._subscribers: dict[str, set[Callable[[Any], None]]] = {}
        self._lock = threading.Lock()
        self._listener: Listener | None = None

    def subscribe(self, session_id: str, deliver: Callable[[Any], None]) -> None:
        """Call `deliver(batch)` with each announced batch of the session's events (RESYNC: read the log)."""
        with self._lock:
            self._subscribers.setdefault(session_id, set()).add(deliver)
            if self._listener is None:
                self._listener = Listener(self.celery, self)
                self._listener.start()
        if not self._listener.ready.wait(30):
            log.warning("the event listener is not bound yet; streams catch up from the log when it is")

    def unsubscribe(self, session_id: str, deliver: Callable[[Any], None]) -> None:
        with self._lock:
            subscribers = self._subscribers.get(session_id)
            if subscribers is not None:
                subscribers.discard(deliver)
                if not subscribers:
                    del self._subscribers[session_id]

    def open_streams(self) -> int:
        """How many streams this process has open."""
        with self._lock:
            return sum(len(subscribers) for subscribers in self._subscribers.values())

    def publish(self, session_id: str, batch: Any) -> None:
        with self._lock:
            targets = list(self._subscribers.get(session_id, ()))
        for deliver in targets:
            deliver(batch)

    def resync(self) -> None:
        """Tell every stream to read the log: announcements may have been lost while not listening."""
        with self._lock:
            targets = [deliver for delivers in self._subscribers.values() for deliver in delivers]
        for deliver in targets:
            deliver(RESYNC)

    def close(self) -> None:
        if self._listener is not None:
            self._listener.stop()


class Listener(threading.Thread):
    """Consumes the session-event exchange through a queue of this process's own, reconnecting when it must."""

    def __init__(self, celery: Celery, hub: Hub) -> None:
        super().__init__(name="session-events", daemon=True)
        self.celery = celery
        self.hub = hub
        self.ready = threading.Event()
        self.stopped = threading.Event()
        exchange = feed.exchange(celery)
        # Exclusive and auto-deleted: it lives as long as this process's connection. Capped, so a stalled
        # process cannot fill the broker (a dropped announcement is found in the log).
        self.queue = Queue(f"{exchange.name}.{uuid.uuid4().hex}", exchange=exchange, routing_key="",
                           durable=False, exclusive=True, auto_delete=True, max_length=100_000)

    def run(self) -> None:
        pause = 0.5
        while not self.stopped.is_set():
            try:
                with self.celery.connection_for_read() as connection:
                    connection.ensure_connection(max_retries=1)
                    with connection.Consumer([self.queue], callbacks=[self._on_message], accept=["json"],
                                             no_ack=True):
                        self.hub.resync()
                        self.ready.set()
                        pause = 0.5
                        while not self.stopped.is_set():
                            try:
                                # Short, so that a stop (make run's, a test's) is not kept waiting.
                                connection.drain_events(timeout=0.25)
                            except TimeoutError:
                                pass
            except Exception:
                if self.stopped.is_set():
                    break
                log.exception("the session-event listener lost the broker; retrying in %.1f s", pause)
                self.stopped.wait(pause)
                pause = min(pause * 2, 10.0)

    def _on_message(self, body: Any, message: Any) -> None:
        try:
            self.hub.publish(str(body["session"]), list(body["events"]))
        except (KeyError, TypeError):
            log.warning("ignoring a malformed session-event announcement: %r", body)

    def stop(self) -> None:
        self.stopped.set()
        self.join(5)


def hub(extensions: dict[str, Any]) -> Hub:
    """The app's Hub (an app's `extensions`), made on first use."""
    found = extensions.get(EXTENSION)
    if found is None:
        from webapp.extensions import CELERY

        found = extensions.setdefault(EXTENSION, Hub(extensions[CELERY]))
    return found


def frames(hub_: Hub, cursor: Cursor, keepalive: float = KEEPALIVE_SECONDS) -> Iterator[str]:
    """The stream for a WSGI server: blocks its thread while waiting (webapp/asgi.py's does not)."""
    session = str(cursor.session_id)
    arrived: queue.Queue = queue.Queue()
    hub_.subscribe(session, arrived.put)
    try:
        for event in cursor.start():
            yield frame(event)
        while not cursor.ended:
            try:
                batch = arrived.get(timeout=keepalive)
            except queue.Empty:
                yield KEEPALIVE
                continue
            taken, gap = cursor.take(batch) if batch is not RESYNC else ([], True)
            if gap:
                taken += cursor.catch_up()
            for event in taken:
                yield frame(event)
    finally:
        hub_.unsubscribe(session, arrived.put)
