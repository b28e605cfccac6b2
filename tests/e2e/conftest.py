"""The platform assembled from real parts: RabbitMQ, Redis, moto's S3 server, peer worker processes.

The pieces that use mongomock (API, coordinator worker, monitor) share this test process, as the
embedded mode does; peers are separate `celery worker` processes that never touch the database.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from werkzeug.serving import make_server

import models
from models import Peer
from models.peer import ONLINE
from settings import Settings
from tests import conftest, services
from tests.e2e.platform import Api, PeerProcess, peer_environment, wait_until

PEER_TIMEOUT = 6.0


@dataclass
class Platform:
    base_url: str
    storage_url: str
    s3_endpoint: str
    log_dir: Path
    peers: dict[str, PeerProcess] = field(default_factory=dict)
    environments: dict[str, dict[str, str]] = field(default_factory=dict)
    monitor: Any = None  # the platform's tasks.monitor.Monitor: what it stored and dropped

    def user(self, name: str | None = None) -> Api:
        return Api(self.base_url).sign_up_and_in(name or f"user{uuid.uuid4().hex[:8]}")

    def register(self, name: str) -> dict[str, str]:
        """Register peer `name` as an operator does; returns what its machine is given."""
        from tasks import protocol, registry

        enrolment = registry.add(name, Settings.from_env())
        conftest.PEER_USERS.append(protocol.broker_user(name))
        return enrolment.environment

    def start_peers(self, *names: str, app: str = "tasks.peer", **env: str) -> list[str]:
        """Register and start peer processes (of Celery app `app`); wait until the monitor sees them ONLINE."""
        for name in names:
            environment = peer_environment(**self.register(name), PEER_THREADS="1", **env)
            self.environments[name] = environment
            self.peers[name] = PeerProcess(name, self.log_dir, environment, app=app)
        try:
            wait_until(lambda: Peer.objects(name__in=names, status=ONLINE).count() == len(names), 60,
                       f"peers {names} to come ONLINE")
        except AssertionError:
            for name in names:
                print(self.peers[name].log()[-3000:])
            raise
        return list(names)

    def stop_peer(self, name: str) -> None:
        self.peers.pop(name).stop()

    def kill_peer(self, name: str) -> None:
        self.peers.pop(name).kill()


@pytest.fixture(scope="package")
def platform(tmp_path_factory, s3_endpoint) -> Iterator[Platform]:
    # Package scope: one platform for every end-to-end module, torn down before other packages run
    # (their `db` fixture reconnects the documents, which the platform's threads must not see).
    services.require(conftest.REAL_BROKER, "RabbitMQ (with its management plugin) and Redis")
    from tasks import monitor
    from tasks.celery import app
    from tasks.inprocess import InProcessWorkers
    from tasks.storage import open_storage
    from webapp import create_app

    settings = Settings.from_env()
    assert settings.broker_url.startswith("amqp://"), settings.broker_url
    db_name = f"peertrain-e2e-{uuid.uuid4().hex[:8]}"
    db_uri = conftest.database_uri(db_name)
    models.connect(db_uri)
    storage_url = f"s3://peertrain-{conftest.RUN_ID}-{uuid.uuid4().hex[:6]}"
    open_storage(storage_url, s3_endpoint).ensure_bucket()
    # The in-process coordinator reads its storage from the environment, as a deployed one does.
    saved = {key: os.environ.get(key) for key in ("STORAGE_URL", "S3_ENDPOINT_URL")}
    os.environ.update(STORAGE_URL=storage_url, S3_ENDPOINT_URL=s3_endpoint)
    from tasks import rounds

    rounds.settings.cache_clear()
    rounds.storage.cache_clear()

    # A short silence limit, so a peer killed mid-session is noticed within seconds.
    consumer = monitor.EventConsumer(app, monitor.Monitor(peer_timeout=PEER_TIMEOUT), settings.monitor_queue)
    monitor_thread = threading.Thread(target=consumer.run, name="monitor", daemon=True)
    monitor_thread.start()
    assert consumer.ready.wait(30), "the monitor could not consume events"
    workers = InProcessWorkers()
    workers.start(app, settings.coordinator_queue, f"coordinator-{conftest.RUN_ID}@test")
    api = create_app({"MONGODB_URI": db_uri, "STORAGE_URL": storage_url, "S3_ENDPOINT_URL": s3_endpoint})
    server = make_server("127.0.0.1", 0, api, threaded=True)
    threading.Thread(target=server.serve_forever, name="api", daemon=True).start()

    platform = Platform(f"http://127.0.0.1:{server.server_port}", storage_url, s3_endpoint,
                        tmp_path_factory.mktemp("logs"), monitor=consumer.monitor)
    try:
        yield platform
    finally:
        for name in list(platform.peers):
            platform.stop_peer(name)
        server.shutdown()
        workers.stop()
        consumer.stop()
        monitor_thread.join(10)
        import mongoengine

        mongoengine.get_connection().drop_database(db_name)
        models.disconnect()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        rounds.settings.cache_clear()
        rounds.storage.cache_clear()


@pytest.fixture(scope="package")
def two_peers(platform) -> list[str]:
    """Two healthy peers, shared by the end-to-end tests (each test leaves them ONLINE)."""
    return platform.start_peers(f"a{conftest.RUN_ID}", f"b{conftest.RUN_ID}")


@pytest.fixture(scope="package")
def digits_csv(tmp_path_factory) -> Path:
    from tests.datasets import sklearn_csv

    return sklearn_csv(tmp_path_factory.mktemp("data") / "digits.csv", "digits")


@pytest.fixture
def unique() -> Callable[[str], str]:
    """Peer names unique to this run, so peers of other runs on the same broker never mix in."""
    return lambda name: f"{name}{conftest.RUN_ID}"
