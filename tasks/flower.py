"""Flower under `make run`: the Celery monitoring UI in the platform's own process, beside the API.

`make flower` runs Flower on its own, reading the platform's event exchange, to which a real broker forwards
every peer's events (tasks/relay.py `declare`). `make run`'s peers usually live on the in-memory broker, which
lives in one process and forwards no exchange to another, so a Flower process of its own would see nothing.
Here Flower runs in the platform's process, on a thread with its event loop: on a real broker it reads the
platform's exchange as `make flower` does; on the in-memory one it reads each local peer's own event exchange
through a queue of its own (every event: workers' and tasks'; the monitor's queues take only what it
judges). Peers take no remote-control commands (docs/security.md), so Flower's periodic `enable_events`
broadcast is off: it knows the peers from their events.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

from celery import Celery
from flower.app import Flower
from flower.events import Events
from flower.options import default_options
from flower.urls import settings as flower_settings
from kombu import Consumer, Exchange, Queue
from tornado.ioloop import IOLoop

from settings import Settings
from tasks import protocol

log = logging.getLogger(__name__)


class PeerEvents(Events):
    """Flower's event state, read from each named peer's own event exchange (the in-memory broker's peers)."""

    def __init__(self, *args: Any, peers: list[str], events: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.peers, self.exchange = peers, events
        self.stopped = threading.Event()

    def queues(self) -> list[Queue]:
        return [Queue(f"{self.exchange}.flower.{name}", Exchange(protocol.event_exchange(self.exchange, name), "topic",
                                                                 durable=True),
                      routing_key="#", auto_delete=True, durable=False) for name in self.peers]

    def run(self) -> None:
        try:
            with self.capp.connection_for_read() as connection:
                receiver = self.capp.events.Receiver(connection, handlers={})

                def on_message(body: Any, message: Any) -> None:
                    # A peer's worker's events (a task's per-epoch heartbeats name no worker: the monitor's alone).
                    if isinstance(body, dict) and protocol.peer_of_worker(body.get("hostname")) in self.peers:
                        _, event = receiver.event_from_message(body)  # its clock and time received, as Celery's
                        self.on_event(event)
                    message.ack()

                with Consumer(connection.default_channel, self.queues(), callbacks=[on_message], accept=["json"]):
                    while not self.stopped.is_set():
                        try:
                            connection.drain_events(timeout=0.5)
                        except TimeoutError:
                            pass
        except Exception:  # Flower is a view: the platform goes on without it
            log.exception("Flower stopped reading the peers' events")

    def stop(self) -> None:
        super().stop()
        self.stopped.set()


class EmbeddedFlower:
    """Flower on `settings.host`:`settings.flower_port`, in a thread of this process, showing `peers` (the
    in-process ones, on the in-memory broker) or, on a real broker, every peer."""

    def __init__(self, app: Celery, settings: Settings, peers: list[str]) -> None:
        self.app, self.settings, self.peers = app, settings, peers
        self.ready = threading.Event()
        self.port: int | None = None
        self.error: BaseException | None = None
        self.flower: Flower | None = None
        self.loop: IOLoop | None = None
        self.thread = threading.Thread(target=self._run, name="flower", daemon=True)

    def start(self, timeout: float = 15.0) -> EmbeddedFlower:
        self.thread.start()
        if not self.ready.wait(timeout) or self.error is not None:
            raise RuntimeError(f"Flower could not start on port {self.settings.flower_port}: {self.error}")
        log.info("Flower serves http://%s:%s/", self.settings.host, self.port)
        return self

    def _run(self) -> None:
        try:
            asyncio.set_event_loop(asyncio.new_event_loop())
            self.loop = IOLoop.current()
            options = default_options
            options.address, options.port = self.settings.host, self.settings.flower_port
            options.enable_events = False
            options.basic_auth = [self.settings.flower_basic_auth] if self.settings.flower_basic_auth else []
            common = {"io_loop": self.loop, "enable_events": False, "max_tasks_in_memory": options.max_tasks,
                      "max_workers_in_memory": options.max_workers}
            events = (PeerEvents(self.app, peers=self.peers, events=self.app.conf.event_exchange, **common)
                      if self.settings.embedded_broker else Events(self.app, **common))
            # Its pages and static files, as `celery flower` passes them (flower/command.py).
            self.flower = Flower(options=options, capp=self.app, events=events, io_loop=self.loop,
                                 **{**flower_settings, "debug": False})
            self.port = self.flower.start_http_server()
            events.start()
            self.flower.started = True
        except BaseException as exc:  # reported by start()
            self.error = exc
            self.ready.set()
            return
        self.ready.set()
        self.loop.start()

    def stop(self) -> None:
        if self.flower is not None and self.loop is not None:
            self.loop.add_callback(self.flower.stop)
            self.thread.join(5)
