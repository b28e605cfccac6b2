"""`make run`: the whole platform in one process, on embedded defaults or on the services configured.

With no service URLs set, everything lives in one process: the API, the coordinator, the monitor
and LOCAL_PEERS peers, over Celery's in-memory broker and result backend, mongomock and a local
storage directory. With BROKER_URL (and the others) pointing at real services, the API, the
coordinator and the monitor still share one process, and the local peers become real `celery worker`
processes that consume the real broker, as peers on other machines do: each is registered with a
broker login of its own (through RabbitMQ's management API) and given nothing else — its tasks
carry grants to the objects they need, served by this API's `/objects/` route from local storage.

The API is served by granian, as in production. Granian runs the app in a worker process of its own,
so that process is the one everything above lives in (`platform_app`, its app factory); this one
supervises it and the peer processes.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from granian import Granian
from granian.constants import Interfaces

import models
from models import peer as peers
from settings import ROOT, Settings
from tasks import registry
from tasks.storage import S3Storage, from_settings

log = logging.getLogger("peertrain")

WALKTHROUGH = """
peertrain is running.

  dashboard  {base}/   (sign up, upload a CSV, watch the curves)
  API        {base}
  API docs   {base}/docs   (OpenAPI: {base}/openapi.json)
  peers      {peers}
  storage    {storage}

Try it from another shell with the CLI (`.venv/bin/peertrain --help`):

  .venv/bin/peertrain --url {base} signup --email ann@example.com
  .venv/bin/peertrain start {sample} --peers 2

Or with curl:

  curl -s -X POST {base}/auth/signup -H 'Content-Type: application/json' \\
       -d '{{"username": "ann", "email": "ann@example.com", "password": "correct horse"}}'
  TOKEN=$(curl -s -X POST {base}/auth/signin -H 'Content-Type: application/json' \\
       -d '{{"email": "ann@example.com", "password": "correct horse"}}' | python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])')
  curl -s {base}/peers -H "Authorization: Bearer $TOKEN"
  curl -s -X POST {base}/sessions/start -H "Authorization: Bearer $TOKEN" \\
       -F file=@{sample} -F num_peers=2 \\
       -F 'hyperparameters=[{{"learning_rate": 0.01, "epochs": 20}}, {{"learning_rate": 0.001, "epochs": 20}}]'
  curl -s {base}/sessions/training-status -H "Authorization: Bearer $TOKEN"
  curl -s {base}/sessions/<session_id> -H "Authorization: Bearer $TOKEN"
  curl -s {base}/sessions/<session_id>/model -H "Authorization: Bearer $TOKEN" -o model.safetensors

Stop with Ctrl-C.
"""


def _peer_processes(settings: Settings, names: list[str]) -> list[subprocess.Popen]:
    """Each local peer as its own `celery worker` process, with its own login and nothing else."""
    processes = []
    for name in names:
        enrolment = registry.issue_login(name, settings)
        # A peer machine's environment: its login and the exchanges it reports on, no other credentials.
        env = {key: value for key, value in os.environ.items()
               if not key.startswith(("BROKER_", "RESULT_", "MONGODB_", "STORAGE_", "S3_", "AWS_", "JWT_"))}
        env.update(enrolment.environment, LOG_LEVEL=settings.log_level)
        command = enrolment.command.replace("--loglevel=INFO", f"--loglevel={settings.log_level}")
        processes.append(subprocess.Popen([sys.executable, "-m", *command.split()], cwd=ROOT, env=env))
    return processes


def platform_app() -> Any:
    """Granian's app factory, run in its worker process: the monitor, the coordinator and (on the
    in-memory broker) the peers start here, beside the API, as mongomock and memory:// need."""
    settings = Settings.from_env()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    models.connect(settings.mongodb_uri)

    from tasks import monitor
    from tasks import peer as peer_app
    from tasks.celery import app
    from tasks.inprocess import InProcessWorkers
    from webapp import create_app
    from webapp.asgi import serve

    names = _peer_names(settings)
    for name in names:  # the local peers' logins were issued by the supervising process (main)
        if peers.Peer.objects(name=name).first() is None:
            peers.register(name)
    consumer = monitor.build(app, settings)
    threading.Thread(target=consumer.run, name="monitor", daemon=True).start()
    if not consumer.ready.wait(30):
        raise SystemExit("the monitor could not reach the broker")
    host = socket.gethostname()
    workers = InProcessWorkers()
    workers.start(app, settings.coordinator_queue, f"coordinator@{host}")
    if settings.embedded_broker:
        for name in names:
            login = registry.issue_login(name, settings).environment["BROKER_URL"]
            workers.start(peer_app.create_app(login, settings), f"peer.{name}", f"peer.{name}@{host}")
    return serve(create_app(settings=settings))


def _peer_names(settings: Settings) -> list[str]:
    return [f"local{i}" for i in range(1, settings.local_peers + 1)]


def main() -> None:
    settings = Settings.from_env()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    storage = from_settings(settings)  # checked here, so a wrong storage setting stops us before serving
    if isinstance(storage, S3Storage):
        storage.ensure_bucket()
    storage.ping()

    names = _peer_names(settings)
    processes = [] if settings.embedded_broker else _peer_processes(settings, names)
    base = f"http://{settings.host}:{settings.port}"
    print(WALKTHROUGH.format(base=base, peers=", ".join(names) or "none (start some with `make peer NAME=...`)",
                             storage=settings.storage_url, sample=Path(ROOT, "samples", "wine.csv")), flush=True)
    # One worker: mongomock and the in-memory broker live in one process. ASGI, so that open event streams
    # hold no thread and a sign-in's bcrypt hash holds one of the Flask app's threads, not the process
    # (webapp/asgi.py, bench/signin.py). Granian handles Ctrl-C and SIGTERM, then returns.
    server = Granian("embedded:platform_app", address=settings.host, port=settings.port,
                     interface=Interfaces.ASGI, workers=1, websockets=False, factory=True,
                     working_dir=Path(ROOT), workers_kill_timeout=15)  # a worker stuck on exit is killed
    try:
        server.serve()
    finally:
        log.info("shutting down")
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(15)


if __name__ == "__main__":
    main()
