"""Celery settings, from the environment through `settings.Settings` (see docs/settings.md).

Module level: the platform's app (tasks/celery.py: the API, the coordinator, the monitor, Flower).
`Peer`: the app peer machines run (tasks/peer.py), which holds only its own broker login.
"""

import ssl

from settings import Settings

_settings = Settings.from_env()


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


broker_url = _settings.broker_url
result_backend = _settings.result_backend
broker_use_ssl = _broker_tls(_settings)
redis_backend_use_ssl = _redis_tls(_settings)
include = ["tasks.coordinator", "tasks.collector"]

# JSON only: a worker never unpickles what another machine sent it.
task_serializer = "json"
result_serializer = "json"
accept_content = ["json"]
result_accept_content = ["json"]
timezone = "UTC"
enable_utc = True
result_expires = 7 * 24 * 3600
result_extended = True

# Events drive the monitor (peer liveness, heartbeats) and Flower.
worker_send_task_events = True
task_send_sent_event = True
event_exchange = _settings.event_exchange
# Where peers report their tasks' outcomes (tasks/collector.py reads it).
peertrain_results = _settings.results_queue

# The coordinator tasks go to the coordinator; `train` is routed per call to one peer's queue.
task_routes = {"peertrain.run_session": {"queue": _settings.coordinator_queue},
               "peertrain.aggregate": {"queue": _settings.coordinator_queue},
               "peertrain.collect": {"queue": _settings.coordinator_queue},
               "peertrain.peer_failed": {"queue": _settings.coordinator_queue},
               "peertrain.peer_lost": {"queue": _settings.coordinator_queue},
               "peertrain.round_failed": {"queue": _settings.coordinator_queue},
               "peertrain.cancel_session": {"queue": _settings.coordinator_queue}}
task_default_queue = _settings.coordinator_queue
worker_prefetch_multiplier = 1

broker_connection_retry_on_startup = True
# Give up publishing quickly when the broker is down: the API answers 503 rather than hanging.
task_publish_retry_policy = {"max_retries": 2, "interval_start": 0, "interval_step": 0.5, "interval_max": 1}

if _settings.embedded_broker:
    # The in-memory transport polls; its default of 1 s would add a second to every hop.
    broker_transport_options = {"polling_interval": 0.02}


class Peer:
    """The peer's app: its own broker login, results reported to the coordinator, no remote control."""

    broker_url = _settings.broker_url
    broker_use_ssl = _broker_tls(_settings)
    result_backend = "tasks.peer:ResultReporter"
    peertrain_results = _settings.results_queue
    task_serializer = "json"
    result_serializer = "json"
    accept_content = ["json"]
    result_accept_content = ["json"]
    timezone = "UTC"
    enable_utc = True
    worker_send_task_events = True
    event_exchange = _settings.event_exchange
    # Taking part in broadcasts needs the right to declare the shared control exchange, which would
    # also be the right to delete it: peers stay out of remote control.
    worker_enable_remote_control = False
    # One task at a time, acknowledged when done (acks_late on the task itself).
    worker_prefetch_multiplier = 1
    broker_connection_retry_on_startup = True
    broker_connection_max_retries = None
    if _settings.embedded_broker:
        broker_transport_options = {"polling_interval": 0.02}
