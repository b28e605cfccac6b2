"""The API as an ASGI app, as granian serves it (`make api`, `make run`, compose, the Dockerfile).

Every request but an open event stream is the Flask app's, run in a small thread pool by a2wsgi's
WSGI-to-ASGI adapter. `GET /sessions/<id>/events` asks the Flask app first (the same route, as HEAD:
its token check, ownership and Last-Event-ID parsing, and any error in the API's JSON shape), then
streams here as a coroutine on granian's event loop: an open stream holds no thread, so hundreds of
them leave the app's threads to the other requests (docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import re
import signal
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

from a2wsgi import WSGIMiddleware
from bson import ObjectId
from flask import Flask

from webapp import stream
from webapp.errors import payload

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

log = logging.getLogger(__name__)

EVENTS = re.compile(r"/sessions/(?P<session_id>[^/]+)/events")
# The app's threads: Python runs one at a time, so more only wait on each other (bench/api.py); a
# few let a slow request (an upload, a model download) overlap with quick ones.
THREADS = 4


class Api:
    """Flask for every request, except that a permitted event stream is served as a coroutine."""

    def __init__(self, flask_app: Flask, threads: int = THREADS,
                 on_shutdown: Callable[[], None] | None = None) -> None:
        self.flask = flask_app
        self.wsgi = WSGIMiddleware(flask_app, workers=threads)
        self.hub = stream.hub(flask_app.extensions)
        self.on_shutdown = on_shutdown
        self._fanouts: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # event loop -> Fanout
        self._stopping: asyncio.Future | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.lifespan(receive, send)
            return
        if scope["type"] == "http" and scope["method"] == "GET" and (match := EVENTS.fullmatch(scope["path"])):
            await self.events(scope, receive, send, match["session_id"])
            return

        async def coroutine_receive() -> dict[str, Any]:
            # The ASGI spec promises an awaitable; a2wsgi hands it to run_coroutine_threadsafe, which
            # wants a coroutine (granian's receive returns a future).
            return await receive()

        await self.wsgi(scope, coroutine_receive, send)

    async def lifespan(self, receive: Receive, send: Send) -> None:
        """ASGI's start and stop: the server stops serving, then `stop()` runs (unless SIGUSR1 ran it first)."""
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                # A server waits for open connections before it stops: an event stream never ends by itself,
                # so whoever stops this process sends SIGUSR1 first (embedded.py does on Ctrl-C).
                asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, self.stop)
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                try:
                    await self.stop()
                except Exception as exc:
                    log.exception("shutting down failed")
                    await send({"type": "lifespan.shutdown.failed", "message": str(exc)})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                return

    def stop(self) -> asyncio.Future:
        """Close every open event stream (each told first that the server is stopping), then run `on_shutdown`
        in a thread; once, however often it is called. On the event loop's thread."""
        if self._stopping is None:
            for fanout in self._fanouts.values():
                fanout.stop()
            self._stopping = asyncio.ensure_future(
                asyncio.to_thread(self.on_shutdown) if self.on_shutdown is not None else asyncio.sleep(0))
        return self._stopping

    async def events(self, scope: Scope, receive: Receive, send: Send, session_id: str) -> None:
        if self._stopping is not None:
            body = json.dumps(payload(503, "the server is stopping; reconnect in a moment")).encode()
            await send({"type": "http.response.start", "status": 503, "headers": [
                (b"content-type", b"application/json"), (b"retry-after", b"5")]})
            await send({"type": "http.response.body", "body": body, "more_body": False})
            return
        allowed, answer = await self._ask_flask({**scope, "method": "HEAD"})
        if allowed != 200:
            # Flask answers the GET itself: the same refusal, with its JSON body.
            await self.wsgi(scope, _no_body, send)
            return
        session_id = answer.get(stream.SESSION_HEADER.lower(), session_id)  # the whole id, if a prefix named it
        headers = dict((k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in scope["headers"])
        cursor = stream.Cursor(ObjectId(session_id), stream.parse_last_event_id(headers.get("last-event-id")))
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", f"{stream.MIMETYPE}; charset=utf-8".encode()),
            *((k.lower().encode(), v.encode()) for k, v in stream.HEADERS.items()),
        ]})
        streaming = asyncio.ensure_future(self._stream(cursor, send))
        gone = asyncio.ensure_future(_disconnected(receive))
        try:
            await asyncio.wait({streaming, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (streaming, gone):
                task.cancel()
            await asyncio.gather(streaming, gone, return_exceptions=True)
        if streaming.done() and not streaming.cancelled():
            if streaming.exception() is not None:
                # The stream is cut (the client reconnects with Last-Event-ID and resumes).
                log.error("the event stream of session %s failed", session_id, exc_info=streaming.exception())
                return
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _ask_flask(self, scope: Scope) -> tuple[int, dict[str, str]]:
        status, headers = 500, {}

        async def keep_status(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers.update((k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in message["headers"])

        await self.wsgi(scope, _no_body, keep_status)
        return status, headers

    async def _stream(self, cursor: stream.Cursor, send: Send) -> None:
        loop = asyncio.get_running_loop()
        fanout = self._fanouts.get(loop)
        if fanout is None:
            fanout = self._fanouts[loop] = Fanout(self.hub)
        arrived: asyncio.Queue = asyncio.Queue()
        session = str(cursor.session_id)
        try:
            await fanout.join(session, arrived)
            if self._stopping is not None:  # it stopped while this stream was being let in
                arrived.put_nowait(stream.STOPPING)
            await _send_events(send, await asyncio.to_thread(cursor.start))
            while not cursor.ended:
                try:
                    async with asyncio.timeout(stream.KEEPALIVE_SECONDS):
                        batch = await arrived.get()
                except TimeoutError:
                    await send({"type": "http.response.body", "body": stream.KEEPALIVE.encode(), "more_body": True})
                    continue
                if batch is stream.STOPPING:
                    await send({"type": "http.response.body", "body": stream.STOPPING_FRAME.encode(),
                                "more_body": True})
                    return
                taken, gap = cursor.take(batch) if batch is not stream.RESYNC else ([], True)
                if gap:
                    taken += await asyncio.to_thread(cursor.catch_up)
                await _send_events(send, taken)
        finally:
            fanout.leave(session, arrived)


class Fanout:
    """The streams of one event loop, by session, behind one Hub subscription per session: an
    announcement crosses from the listener's thread once, however many streams follow the session."""

    def __init__(self, hub: stream.Hub) -> None:
        self.hub = hub
        self.loop = asyncio.get_running_loop()
        self.queues: dict[str, set[asyncio.Queue]] = {}
        self.subscriptions: dict[str, tuple[Callable[[Any], None], asyncio.Future]] = {}

    async def join(self, session: str, queue: asyncio.Queue) -> None:
        """Have the session's announcements put in `queue`, from the moment this returns."""
        self.queues.setdefault(session, set()).add(queue)
        if session not in self.subscriptions:
            def deliver(batch: Any) -> None:  # on the listener's thread
                self.loop.call_soon_threadsafe(self._fan, session, batch)

            subscribed = asyncio.ensure_future(asyncio.to_thread(self.hub.subscribe, session, deliver))
            self.subscriptions[session] = (deliver, subscribed)
        await asyncio.shield(self.subscriptions[session][1])

    def leave(self, session: str, queue: asyncio.Queue) -> None:
        queues = self.queues.get(session, set())
        queues.discard(queue)
        if not queues:
            self.queues.pop(session, None)
            deliver, subscribed = self.subscriptions.pop(session)
            # Still subscribing (the only client left at once): unsubscribe when that is done.
            subscribed.add_done_callback(lambda _: self.hub.unsubscribe(session, deliver))

    def stop(self) -> None:
        """Tell every stream of this loop that the server is stopping."""
        for queues in self.queues.values():
            for queue in queues:
                queue.put_nowait(stream.STOPPING)

    def _fan(self, session: str, batch: Any) -> None:
        for queue in self.queues.get(session, ()):
            queue.put_nowait(batch)


async def _send_events(send: Send, events: list[dict[str, Any]]) -> None:
    if events:
        body = "".join(stream.frame(event) for event in events).encode()
        await send({"type": "http.response.body", "body": body, "more_body": True})


async def _no_body() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def serve(flask_app: Flask, on_shutdown: Callable[[], None] | None = None) -> Api:
    """`flask_app` as this process serves it, once it has started up; `on_shutdown` runs when it stops."""
    api = Api(flask_app, on_shutdown=on_shutdown)
    # What exists by now (modules, botocore's service models, the app) lives as long as the process. Out of
    # the collector's sight, a full collection no longer walks it: those pauses (50-260 ms measured by
    # bench/api.py) set the polling routes' p99.
    gc.freeze()
    return api


def create_app() -> Api:
    """Granian's factory (`granian --interface asgi --factory webapp.asgi:create_app`)."""
    from webapp import create_app as create_flask_app

    return serve(create_flask_app())
