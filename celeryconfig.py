"""Celery settings, from the environment through `settings.Settings` (see docs/settings.md)."""

from settings import Settings

_settings = Settings.from_env()

broker_url = _settings.broker_url
result_backend = _settings.result_backend
include = ["tasks.training", "tasks.coordinator"]

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

# The coordinator tasks go to the coordinator; `train` is routed per call to one peer's queue.
task_routes = {"peertrain.run_session": {"queue": _settings.coordinator_queue},
               "peertrain.aggregate": {"queue": _settings.coordinator_queue},
               "peertrain.peer_failed": {"queue": _settings.coordinator_queue},
               "peertrain.round_failed": {"queue": _settings.coordinator_queue},
               "peertrain.cancel_session": {"queue": _settings.coordinator_queue}}
task_default_queue = _settings.coordinator_queue

# A peer takes one task at a time and acknowledges it when done, so a peer that dies mid-training
# leaves its task to the broker instead of losing it; the monitor fails the session meanwhile.
worker_prefetch_multiplier = 1
task_acks_late = True
task_time_limit = _settings.train_time_limit
task_soft_time_limit = max(1, _settings.train_time_limit - 30)

broker_connection_retry_on_startup = True
# Give up publishing quickly when the broker is down: the API answers 503 rather than hanging.
task_publish_retry_policy = {"max_retries": 2, "interval_start": 0, "interval_step": 0.5, "interval_max": 1}

if _settings.embedded_broker:
    # The in-memory transport polls; its default of 1 s would add a second to every hop.
    broker_transport_options = {"polling_interval": 0.02}
