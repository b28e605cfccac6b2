"""Shared fixtures: a fresh database per test, the app and its client, users, peers and datasets."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import services

# Celery reads its settings when `tasks` is first imported, so the test run's broker, backend and
# queue names are chosen here, before any test module imports it. Queue names are unique to this
# run so messages left by another run (or a `make run` on the same broker) never reach our workers.
RUN_ID = uuid.uuid4().hex[:8]
# A virtual host of this run's own on the real broker (made through the management API, deleted at
# the end with everything in it), so peers' logins get rights on this run's resources only.
VHOST = f"peertrain-test-{RUN_ID}"
REAL_BROKER = services.rabbitmq_up() and services.redis_up() and services.rabbitmq_admin_up()
if REAL_BROKER and "BROKER_URL" not in os.environ:
    from tasks.brokeradmin import BrokerAdmin

    BrokerAdmin(services.RABBITMQ_ADMIN_URL, "/").add_vhost(VHOST, "guest")
    os.environ["BROKER_URL"] = services.RABBITMQ_URL.rstrip("/") + "/" + VHOST
    os.environ.setdefault("BROKER_ADMIN_URL", services.RABBITMQ_ADMIN_URL)
    os.environ.setdefault("RESULT_BACKEND", services.REDIS_URL)
else:
    VHOST = ""
os.environ.setdefault("COORDINATOR_QUEUE", f"test-{RUN_ID}.coordinator")
os.environ.setdefault("MONITOR_QUEUE", f"test-{RUN_ID}.monitor")
os.environ.setdefault("RESULTS_QUEUE", f"test-{RUN_ID}.results")
# Workers' events go to every monitor bound to the exchange: another run's peers must not show up in ours.
os.environ.setdefault("EVENT_EXCHANGE", f"test-{RUN_ID}.events")
os.environ.setdefault("PEERTRAIN_ENV", "development")
os.environ.setdefault("JWT_SECRET_KEY", "test-secret-that-is-long-enough-for-hs256")
os.environ.setdefault("BCRYPT_ROUNDS", "4")
# tests/e2e/test_scale.py starts a session of 200 simulated peers through the API.
os.environ.setdefault("MAX_PEERS_PER_SESSION", "256")

import models  # noqa: E402
from models import Peer  # noqa: E402
from models.peer import ONLINE  # noqa: E402
from settings import Settings  # noqa: E402

REAL_MONGODB_URI = os.environ.get("MONGODB_URI", "")
if REAL_MONGODB_URI.startswith(models.db.MOCK_SCHEME):
    REAL_MONGODB_URI = ""


def database_uri(name: str) -> str:
    """A fresh database: on the server named by MONGODB_URI when set, else in mongomock."""
    if REAL_MONGODB_URI:
        from urllib.parse import urlsplit, urlunsplit

        parts = urlsplit(REAL_MONGODB_URI)
        return urlunsplit(parts._replace(path=f"/{name}"))
    return f"mongomock://localhost/{name}"


@pytest.fixture
def db() -> Iterator[str]:
    """Connect the documents to a database of their own for this test, dropped afterwards."""
    name = f"peertrain-test-{uuid.uuid4().hex[:12]}"
    uri = database_uri(name)
    models.connect(uri)
    try:
        yield uri
    finally:
        import mongoengine

        mongoengine.get_connection().drop_database(name)
        models.disconnect()


PEER_USERS: list[str] = []  # broker logins the tests issued (users are not per virtual host)


@pytest.fixture(scope="session", autouse=True)
def _broker_cleanup() -> Iterator[None]:
    """Delete this run's virtual host (and every queue and exchange in it) and peer logins afterwards."""
    yield
    if VHOST:
        from tasks.brokeradmin import BrokerAdmin

        admin = BrokerAdmin(services.RABBITMQ_ADMIN_URL, VHOST)
        for user in PEER_USERS:
            admin.remove_user(user)
        admin.remove_vhost(VHOST)


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server on a free loopback port: boto3 (and peer processes) talk real HTTP to it."""
    from moto.server import ThreadedMotoServer

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def settings() -> Settings:
    return Settings.from_env()


@pytest.fixture
def storage_dir(tmp_path: Path) -> Path:
    path = tmp_path / "storage"
    path.mkdir()
    return path


@pytest.fixture
def app(db: str, storage_dir: Path):
    from webapp import create_app
    from webapp.stream import EXTENSION

    app = create_app({"TESTING": True, "MONGODB_URI": db, "STORAGE_URL": str(storage_dir), "BCRYPT_ROUNDS": 4})
    yield app
    if EXTENSION in app.extensions:  # a test that streamed: stop this app's event listener
        app.extensions[EXTENSION].close()


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def signup(client):
    """Create an account and return its Authorization header."""

    def make(username: str = "ann", email: str | None = None, password: str = "correct horse") -> dict[str, str]:
        email = email or f"{username}@example.com"
        response = client.post("/auth/signup", json={"username": username, "email": email, "password": password})
        assert response.status_code == 201, response.json
        response = client.post("/auth/signin", json={"email": email, "password": password})
        assert response.status_code == 200, response.json
        return {"Authorization": f"Bearer {response.json['access_token']}"}

    return make


@pytest.fixture
def auth(signup) -> dict[str, str]:
    return signup()


@pytest.fixture
def online_peers(db):
    """Register `n` peers and mark them ONLINE, as the monitor does when their workers beat."""

    def make(n: int, prefix: str = "p") -> list[str]:
        names = [f"{prefix}{i}" for i in range(n)]
        for name in names:
            models.peer.register(name)
            models.peer.seen(name, f"peer.{name}@test")
        assert Peer.objects(name__in=names, status=ONLINE).count() == n
        return names

    return make


def pytest_terminal_summary(terminalreporter) -> None:
    """The figures tests measured against their (generous) deadlines, so a slow trend shows before a failure."""
    figures = [(report.nodeid, name, value) for reports in terminalreporter.stats.values() for report in reports
               if getattr(report, "when", None) == "call" for name, value in getattr(report, "user_properties", ())]
    if figures:
        terminalreporter.section("measured figures")
        for nodeid, name, value in figures:
            terminalreporter.write_line(f"{value!s:>8}  {name}  ({nodeid.split('::')[-1]})")
