"""Celery settings, built from a `settings.Settings` (docs/settings.md); nothing here reads the environment.

`platform(settings)`: the platform's apps (tasks/celery.py: the API, the coordinator, the monitor, Flower).
`peer(settings)`: the app peer machines run (tasks/peer.py), which holds only its own broker login.
"""

from __future__ import annotations

import ssl
from typing import Any

from settings import Settings

# The coordinator's tasks: only the platform's own processes can send them (peers cannot publish to its queue).
COORDINATOR_TASKS = ("peertrain.run_session", "peertrain.aggregate", "peertrain.update", "peertrain.peer_lost",
                     "peertrain.deadline", "peertrain.deliver", "peertrain.round_failed", "peertrain.cancel_session",
                     "peertrain.recruit")


def _broker_tls(settings: Settings) -> dict | bool:
    if not settings.broker_url.startswith("amqps://"):
        return False
    options = {"cert_reqs": ssl.CERT_REQUIRED}
    if settings.broker_ca_file:
        options["ca_certs"] = settings.broker_ca_file
    if settings.broker_cert_file:
        options.update(certfile=settings.broker_cert_file, keyfile=settings.broker_key_file or None)
    return options


def _redis_tls(settings: Settings) -> dict | None:
    if not settings.result_backend.startswith("rediss://"):
        return None
    options = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    if settings.broker_ca_file:
        options["ssl_ca_certs"] = settings.broker_ca_file
    if settings.broker_cert_file:
        options.update(ssl_certfile=settings.broker_cert_file, ssl_keyfile=settings.broker_key_file or None)
    return options


def _common(settings: Settings) -> dict[str, Any]:
    common: dict[str, Any] = {
        "broker_url": settings.broker_url,
        "broker_use_ssl": _broker_tls(settings),
        # JSON only: a worker never unpickles what another machine sent it.
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "timezone": "UTC",
        "enable_utc": True,
        # Events drive the monitor (peer liveness, heartbeats) and Flower.
        "worker_send_task_events": True,
        "event_exchange": settings.event_exchange,
        # Where peers report their tasks' outcomes (tasks/collector.py reads it).
        "peertrain_results": settings.results_queue,
        "worker_prefetch_multiplier": 1,
        "broker_connection_retry_on_startup": True,
    }
    if settings.embedded_broker:
        # The in-memory transport polls; its default of 1 s would add a second to every hop.
        common["broker_transport_options"] = {"polling_interval": 0.02}
    return common


def platform(settings: Settings) -> dict[str, Any]:
    """The platform's own apps: they hold the result backend and send the coordinator's tasks."""
    return {
        **_common(settings),
        "result_backend": settings.result_backend,
        "redis_backend_use_ssl": _redis_tls(settings),
        "result_expires": 7 * 24 * 3600,
        "result_extended": True,
        "task_send_sent_event": True,
        # The coordinator tasks go to the coordinator; `train` is routed per call to one peer's queue.
        "task_routes": {name: {"queue": settings.coordinator_queue} for name in COORDINATOR_TASKS},
        "task_default_queue": settings.coordinator_queue,
        # The prefix of the monitor's queues of peers' events (tasks/relay.py declares them).
        "peertrain_monitor": settings.monitor_queue,
        # Give up publishing quickly when the broker is down: the API answers 503 rather than hanging.
        "task_publish_retry_policy": {"max_retries": 2, "interval_start": 0, "interval_step": 0.5,
                                      "interval_max": 1},
    }


def peer(settings: Settings) -> dict[str, Any]:
    """A peer's app: its own broker login, results reported to the coordinator, no remote control."""
    return {
        **_common(settings),
        "result_backend": "tasks.peer:ResultReporter",
        # Taking part in broadcasts needs the right to declare the shared control exchange, which would
        # also be the right to delete it: peers stay out of remote control.
        "worker_enable_remote_control": False,
        "broker_connection_max_retries": None,
    }
