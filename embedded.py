"""`make run`: the whole platform in one process, on embedded defaults or on the services configured.

With no service URLs set, everything lives in one process: the API, the coordinator, the monitor
and LOCAL_PEERS peers, over Celery's in-memory broker and result backend, mongomock and a local
storage directory. With BROKER_URL (and the others) pointing at real services, the API, the
coordinator and the monitor still share one process, and the local peers become real `celery worker`
processes that consume the real broker, as peers on other machines do: each is registered with a
broker login of its own (through RabbitMQ's management API) and given nothing else — its tasks
carry grants to the objects they need, served by this API's `/objects/` route from local storage.

Stopping (Ctrl-C, SIGTERM) is orderly: the open event streams are told and closed while granian stops
serving, the platform ends the sessions still running as INTERRUPTED ("make run was stopped"), its peers
stop, its workers and the monitor close, and mongomock's data is written to DATA_DIR; the supervisor
then stops the peer processes. The next `make run` reads DATA_DIR back: users, sessions, heartbeats and
models are still there, and with the development token secret kept beside them, so are the tokens
already handed out. While it runs, what changes is written to DATA_DIR every SNAPSHOT_SECONDS
(models.db.Journal), so a crash or `kill -9` loses at most that much; the sessions it interrupted are
INTERRUPTED at the next start, and resumed by themselves with RESUME=auto.

The API is served by granian, as in production. Granian runs the app in a worker process of its own,
so that process is the one everything above lives in (`platform_app`, its app factory); this one
supervises it and the peer processes.
"""

from __future__ import annotations

import faulthandler
import logging
import multiprocessing
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from granian import Granian
from granian.constants import Interfaces

import models
from models import peer as peers
from settings import ROOT, Settings
from tasks import protocol, registry
from tasks.celery import quiet_task_logs
from tasks.storage import S3Storage, from_settings

log = logging.getLogger("peertrain")

WALKTHROUGH = """
peertrain is running.

  dashboard  {base}/   (sign up, upload a CSV, watch the curves)
  API        {base}
  API docs   {base}/docs   (OpenAPI: {base}/openapi.json)
  Flower     {flower}   (the peers and their tasks, as Celery's monitoring UI shows them)
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
  ID=$(curl -s -X POST {base}/sessions/start -H "Authorization: Bearer $TOKEN" \\
       -F file=@{sample} -F num_peers=2 \\
       -F 'hyperparameters=[{{"learning_rate": 0.01, "epochs": 20}}, {{"learning_rate": 0.001, "epochs": 20}}]' \\
       | python3 -c 'import json,sys; print(json.load(sys.stdin)["session_id"])')
  curl -sN {base}/sessions/$ID/events -H "Authorization: Bearer $TOKEN"      # live, until the session ends
  curl -s {base}/sessions/$ID -H "Authorization: Bearer $TOKEN"
  curl -s {base}/sessions/$ID/model -H "Authorization: Bearer $TOKEN" -o model.safetensors

Data is kept in {data} between runs. Stop with Ctrl-C.
"""


STOPPED = "make run was stopped"


class Platform:
    """The platform's own processes in this one: the monitor, the coordinator and (on the in-memory broker)
    in-process peers, beside the API app `start()` returns; `stop()` ends it all in order and keeps the data.

    The one assembly of the platform: `make run` runs it in granian's worker process, the end-to-end tests
    and the benches (harness/) in theirs. `peers`: the in-process peers (default: LOCAL_PEERS of them on
    the in-memory broker; on a real broker they are registered here and run as processes); `keep_data`: read DATA_DIR at
    start and write it at stop (mongomock only); `storage` and `clock`: the coordinator's, if not the
    settings' own.
    """

    def __init__(self, settings: Settings, peers: list[str] | None = None, keep_data: bool = True,
                 storage: Any = None, clock: Any = None, name: str = "coordinator") -> None:
        self.settings = settings
        self.names = _peer_names(settings) if peers is None else list(peers)
        self.keep_data = keep_data
        self.storage, self.clock, self.name = storage, clock, name
        self.celery = None  # the coordinator's Celery app (it also sends what the API sends)
        self.consumer = None
        self.api = None  # the Flask app, once started
        self.monitor_thread: threading.Thread | None = None
        self.workers = None
        self.journal: models.db.Journal | None = None

    @property
    def monitor(self) -> Any:
        return self.consumer.monitor

    def start(self) -> Any:
        from tasks import coordinator, monitor
        from tasks import peer as peer_app
        from tasks.inprocess import InProcessWorkers
        from webapp import create_app

        settings = self.settings
        models.connect(settings.mongodb_uri)
        if self.keep_data and settings.data_dir and models.db.is_mock():
            if Path(settings.data_dir).is_dir():
                log.info("read %d documents kept in %s", models.db.load_snapshot(settings.data_dir), settings.data_dir)
            # Written as it changes, so that a hard kill loses at most SNAPSHOT_SECONDS of it (what was just
            # read is what the files hold).
            if settings.snapshot_seconds > 0:
                self.journal = models.db.Journal(settings.data_dir, settings.snapshot_seconds)
                self.journal.start()
        self.celery = coordinator.create_app(settings, self.storage, self.clock)
        reconcile(self.celery)
        for name in self.names:  # on a real broker their logins were issued by the supervising process (main)
            if peers.Peer.objects(name=name).first() is None:
                peers.register(name)
        self.consumer = monitor.build(self.celery, settings, self.clock)
        self.monitor_thread = threading.Thread(target=self.consumer.run, name="monitor", daemon=True)
        self.monitor_thread.start()
        if not self.consumer.ready.wait(30):
            raise SystemExit("the monitor could not reach the broker")
        host = socket.gethostname()
        self.workers = InProcessWorkers()
        self.workers.start(self.celery, settings.coordinator_queue, f"{self.name}@{host}")
        for name in self.names if settings.embedded_broker else []:
            enrolment = registry.issue_login(name, settings).environment
            app = peer_app.create_app(enrolment["BROKER_URL"], settings, enrolment["EVENT_EXCHANGE"])
            self.workers.start(app, protocol.task_queue(name), protocol.worker_name(name, host))
        self.api = create_app(settings=settings, celery=self.celery)
        if settings.resume == "auto":
            threading.Thread(target=self.resume_interrupted, name="resume", daemon=True).start()
        else:
            from models import session as sessions

            waiting = [str(s.id) for s in sessions.TrainingSession.objects(status=sessions.INTERRUPTED).only("id")]
            if waiting:
                log.info("%d session(s) were interrupted (%s); resume them from the dashboard, with `peertrain "
                         "resume ID`, or start with RESUME=auto", len(waiting), ", ".join(waiting[:5]))
        return self.api

    def resume_interrupted(self, patience: float = 60.0) -> list[str]:
        """RESUME=auto: resume every INTERRUPTED session once its peers are back (within `patience` s); the ids
        of those resumed."""
        from models import session as sessions
        from webapp import launch

        waiting = [s.id for s in sessions.TrainingSession.objects(status=sessions.INTERRUPTED).only("id")]
        resumed, deadline = [], time.monotonic() + patience
        while waiting and time.monotonic() < deadline:
            for session_id in list(waiting):
                session = sessions.load(session_id)
                try:
                    if session is None:
                        raise launch.Unresumable(404, "it is gone")
                    with self.api.app_context():
                        launch.resume(session)
                except launch.Unresumable as exc:
                    if exc.status == 409 and exc.errors:  # its peers are not back yet
                        continue
                    log.warning("session %s cannot be resumed: %s", session_id, exc.message)
                else:
                    resumed.append(str(session_id))
                waiting.remove(session_id)
            if waiting:
                time.sleep(1.0)
        for session_id in waiting:
            log.warning("session %s was not resumed: its peers did not come back within %g s (resume it with "
                        "peertrain resume %s)", session_id, patience, session_id)
        return resumed

    def stop(self, reason: str = STOPPED) -> None:
        """End the running sessions (their peers stop), close the workers and the monitor, keep the data."""
        from models import session as sessions
        from tasks import lifecycle

        for session in sessions.TrainingSession.objects(status__in=sessions.ACTIVE).only("id"):
            lifecycle.end(self.celery, session.id, sessions.INTERRUPTED, reason)
        if self.workers is not None:
            self.workers.stop(timeout=10)
        if self.consumer is not None:
            self.consumer.stop()
            self.monitor_thread.join(10)
        if self.api is not None:
            from webapp import stream

            # Its listener stops before the broker's virtual host or connection goes, not with a traceback after.
            hub = self.api.extensions.get(stream.EXTENSION)
            if hub is not None:
                hub.close()
        if self.journal is not None:  # the files hold all but its last changes: those are written now
            self.journal.stop()
            log.info("kept the data in %s for the next run (%d writes, %.1f MB in all)", self.settings.data_dir,
                     self.journal.flushes, self.journal.written_bytes / 1e6)
        elif self.keep_data and self.settings.data_dir and models.db.is_mock():
            kept = models.db.save_snapshot(self.settings.data_dir)
            log.info("kept %d documents in %s for the next run", kept, self.settings.data_dir)


def reconcile(app: Any) -> None:
    """At start, after everything stopped: nothing is running, whatever the data says."""
    from models import session as sessions
    from tasks import lifecycle

    for session in sessions.TrainingSession.objects(status__in=sessions.ACTIVE).only("id"):
        lifecycle.end(app, session.id, sessions.INTERRUPTED, "the platform stopped while it ran (a crash or a hard kill)")
    # Every peer is OFFLINE until its worker is heard again.
    peers.Peer.objects.update(set__status=peers.OFFLINE, unset__session_id=True)


def platform_app() -> Any:
    """Granian's app factory, run in its worker process: the platform starts here, beside the API, as
    mongomock and memory:// need, and stops when granian stops serving (the ASGI lifespan)."""
    from webapp.asgi import serve

    signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # a stop asked for while it starts (the app takes it over)
    faulthandler.register(signal.SIGUSR2, all_threads=True)  # as the supervisor (main)
    settings = Settings.from_env()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet_task_logs(settings.log_level)
    platform = Platform(settings)
    api = platform.start()
    flower = None
    if settings.flower_port:
        from tasks.flower import EmbeddedFlower

        # Flower beside the API, showing the peers (tasks/flower.py); the platform runs without it if it cannot.
        try:
            flower = EmbeddedFlower(platform.celery, settings, platform.names).start()
        except RuntimeError as exc:
            log.warning("%s; make run goes on without it (set FLOWER_PORT to a free port, or 0)", exc)

    def stop() -> None:
        if flower is not None:
            flower.stop()
        platform.stop()

    return serve(api, on_shutdown=stop)


def _peer_names(settings: Settings) -> list[str]:
    return [f"local{i}" for i in range(1, settings.local_peers + 1)]


class PeerProcesses:
    """The local peers as `celery worker` processes (on a real broker), each with its own login and nothing
    else; one that dies is started again."""

    def __init__(self, settings: Settings, names: list[str]) -> None:
        self.settings = settings
        self.environments = {}
        for name in names:
            enrolment = registry.issue_login(name, settings)
            # A peer machine's environment: its login and the exchanges it reports on, no other credentials.
            env = {key: value for key, value in os.environ.items()
                   if not key.startswith(("BROKER_", "RESULT_", "MONGODB_", "STORAGE_", "S3_", "AWS_", "JWT_"))}
            env.update(enrolment.environment, LOG_LEVEL=settings.log_level)
            self.environments[name] = (env, enrolment.command.replace("--loglevel=INFO",
                                                                      f"--loglevel={settings.log_level}"))
        self.processes: dict[str, subprocess.Popen] = {}
        self.stopping = threading.Event()
        self.watcher = threading.Thread(target=self._watch, name="peer-processes", daemon=True)

    def start(self) -> None:
        for name in self.environments:
            self._spawn(name)
        self.watcher.start()

    def _spawn(self, name: str) -> None:
        env, command = self.environments[name]
        # A process group of its own: the supervisor stops it (and its pool) whatever the terminal sends.
        self.processes[name] = subprocess.Popen([sys.executable, "-m", *command.split()], cwd=ROOT, env=env,
                                                start_new_session=True)

    def _watch(self) -> None:
        while not self.stopping.wait(1.0):
            for name, process in list(self.processes.items()):
                if process.poll() is not None and not self.stopping.is_set():
                    log.error("peer %s exited (status %s); starting it again", name, process.returncode)
                    self._spawn(name)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (a warm stop: their sessions have ended, so their tasks have returned), then SIGKILL."""
        self.stopping.set()
        for process in self.processes.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for name, process in self.processes.items():
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("peer %s did not stop within %g s; killing it", name, timeout)
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(5)


class Waking(threading.Event):
    """An event whose endless wait wakes every 0.25 s (so the waiting thread runs pending signal handlers)."""

    def wait(self, timeout: float | None = None) -> bool:
        if timeout is not None:
            return super().wait(timeout)
        while not super().wait(0.25):
            pass
        return True


def development_secret(settings: Settings) -> None:
    """Keep the development token secret in DATA_DIR, so tokens outlive a restart as the data does."""
    if settings.jwt_secret_key or not settings.development or not settings.data_dir:
        return
    path = Path(settings.data_dir) / "jwt-secret"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_urlsafe(48))
    os.environ["JWT_SECRET_KEY"] = path.read_text().strip()


def main() -> None:
    # `kill -USR2` prints every thread's stack to the console: what a make run that does not stop is waiting on.
    faulthandler.register(signal.SIGUSR2, all_threads=True)
    settings = Settings.from_env()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet_task_logs(settings.log_level)
    storage = from_settings(settings)  # checked here, so a wrong storage setting stops us before serving
    if isinstance(storage, S3Storage):
        storage.ensure_bucket()
    storage.ping()
    development_secret(settings)

    names = _peer_names(settings)
    processes = None if settings.embedded_broker else PeerProcesses(settings, names)
    base = f"http://{settings.host}:{settings.port}"
    flower = f"http://{settings.host}:{settings.flower_port}/" if settings.flower_port else "off (FLOWER_PORT=0)"
    print(WALKTHROUGH.format(base=base, flower=flower, peers=", ".join(names) or "none (start some with `make peer NAME=...`)",
                             storage=settings.storage_url, sample=Path(ROOT, "samples", "wine.csv"),
                             data=settings.data_dir or "nowhere (DATA_DIR is empty)"), flush=True)
    if settings.data_dir and settings.mongodb_uri.startswith(models.db.MOCK_SCHEME):
        log.info("the database is mongomock, in this process: what changes is written to %s every %g s, and the "
                 "rest when make run stops", settings.data_dir, settings.snapshot_seconds)
    # One worker: mongomock and the in-memory broker live in one process. ASGI, so that open event streams
    # hold no thread and a sign-in's bcrypt hash holds one of the Flask app's threads, not the process
    # (webapp/asgi.py, bench/signin.py). Granian handles Ctrl-C and SIGTERM, then returns.
    server = Granian("embedded:platform_app", address=settings.host, port=settings.port,
                     interface=Interfaces.ASGI, workers=1, websockets=False, factory=True,
                     working_dir=Path(ROOT), workers_kill_timeout=15)  # a worker stuck on exit is killed
    stop = server.signal_handler_interrupt

    stopping: list[int] = []

    def interrupted(signum=None, frame=None) -> None:  # granian's own handler, told which signal came
        # Once: a second signal (make passes SIGTERM on too) runs this handler again inside the first one's
        # Event.set, which holds the event's lock: setting it again there deadlocked the supervisor.
        if stopping:
            return
        stopping.append(signum)
        # Granian's worker would wait for every open connection, and an event stream never ends by itself:
        # it closes its streams and stops the platform (keeping the data) on SIGUSR1 (webapp/asgi.py).
        for worker in multiprocessing.active_children():
            os.kill(worker.pid, signal.SIGUSR1)
        stop(signum, frame)

    server.signal_handler_interrupt = interrupted
    # Granian's main thread waits on this event with no timeout. The kernel may hand the terminal's SIGINT (or a
    # SIGTERM) to another thread of this process, and Python runs the handler only once the main thread runs
    # again: until then the worker stopped by the same signal looks to granian like a crash, and the handler
    # above waited for it. Woken every 0.25 s, the main thread handles a signal at once whoever received it.
    server.main_loop_interrupt = Waking()
    if processes is not None:
        processes.start()
    try:
        server.serve()
    finally:
        if processes is not None:
            processes.stop()
        log.info("stopped")
    # A clean stop, whatever asked for it. Ctrl-C in a terminal reached make too, which ends by that signal
    # (status 130 for the shell) once this returns: a status of ours besides 0 would only add make's
    # "*** [Makefile: run] Error 130" to a stop that went as it should.
    sys.exit(0)


if __name__ == "__main__":
    main()
