"""Issuing and revoking a peer's broker login: what `tasks.registry` (an operator) and the API's enrolment
(`POST /join`, a user's machine) both do. Only the broker and its management API: no coordinator
code, so the web process may use it.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from urllib.parse import quote, urlsplit, urlunsplit

from celery import Celery
from celery.events.event import get_exchange

from settings import Settings
from tasks import protocol
from tasks.brokeradmin import BrokerAdmin
from tasks.celery import create_app


def declare_queues(app: Celery, peers: list[str]) -> None:
    """Declare the peers' task, stop and event queues and their bindings (done at registration; again when a
    session starts, for peers registered before the platform's exchanges existed)."""
    events, monitor = app.conf.event_exchange, app.conf.peertrain_monitor
    with app.connection_for_write() as connection:
        channel = connection.default_channel
        # Each peer's events also reach the platform's event exchange, where Flower reads them (the in-memory
        # broker binds no exchange to another).
        forward = connection.transport.driver_type == "amqp"
        platform_events = get_exchange(connection, name=events)(channel)
        if forward:
            platform_events.declare()
        for name in peers:
            for queue in protocol.declarations(name, events, monitor):
                queue(channel).declare()
            if forward:
                platform_events.bind_to(protocol.event_exchange(events, name), routing_key="#")


@dataclass(frozen=True)
class Enrolment:
    """What a newly registered peer machine is given: its environment and the command to run."""

    name: str
    environment: dict[str, str]

    @property
    def command(self) -> str:
        return protocol.worker_command(self.name)

    def env_file(self) -> str:
        return "".join(f"{key}={value}\n" for key, value in self.environment.items())


def peer_broker_url(settings: Settings, user: str, password: str) -> str:
    """The broker's address as peers reach it, with the peer's own login."""
    parts = urlsplit(settings.peer_broker_url or settings.broker_url)
    host = parts.hostname or "localhost"
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def declare(settings: Settings, names: list[str] = ()) -> None:
    """Declare what peers use but may not declare: the event exchange, the results exchange and queue, and
    peers `names`' task, stop and event queues with their bindings to the platform's exchanges."""
    app = create_app(settings)
    with app.connection_for_write() as connection:
        channel = connection.default_channel
        get_exchange(connection, name=settings.event_exchange)(channel).declare()
        protocol.results_queue(settings.results_queue)(channel).declare()
    declare_queues(app, list(names))


def issue_login(name: str, settings: Settings) -> Enrolment:
    """Create peer `name`'s broker login (replacing any earlier one) and say what its machine needs."""
    user, password = protocol.broker_user(name, settings.broker_scope), secrets.token_urlsafe(24)
    if settings.embedded_broker:
        broker_url = f"memory://{user}@localhost/"  # in-process: the login names the peer, nothing checks it
    else:
        BrokerAdmin.from_settings(settings).add_user(
            user, password, protocol.permissions(name, settings.event_exchange, settings.results_queue))
        broker_url = peer_broker_url(settings, user, password)
    declare(settings, [name])
    environment = {"BROKER_URL": broker_url, "EVENT_EXCHANGE": protocol.event_exchange(settings.event_exchange, name),
                   "RESULTS_QUEUE": settings.results_queue, "TRAIN_TIME_LIMIT": str(settings.train_time_limit)}
    if settings.broker_ca_file:
        environment["BROKER_CA_FILE"] = settings.broker_ca_file
    return Enrolment(name, environment)


def revoke(name: str, settings: Settings) -> None:
    """Delete peer `name`'s broker login (its connections close at once) and its queues."""
    if not settings.embedded_broker:
        BrokerAdmin.from_settings(settings).remove_user(protocol.broker_user(name, settings.broker_scope))
    app = create_app(settings)
    with app.connection_for_write() as connection:
        channel = connection.default_channel
        for queue in (protocol.task_queue(name), protocol.stop_queue(name).name):
            try:
                channel.queue_delete(queue)
            except connection.channel_errors:
                channel = connection.channel()
