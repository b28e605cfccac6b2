"""The platform assembled from real parts: RabbitMQ, Redis, moto's S3 server, peer worker processes.

The pieces that use mongomock (API, coordinator worker, monitor) share this test process, as the
embedded mode does; peers are separate `celery worker` processes that never touch the database.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest

import models
from harness.platform import Served
from settings import Settings
from tests import conftest, services

PEER_TIMEOUT = 6.0
DEADLINE_FLOOR = 10.0  # a task that never answers is left out this soon at least (its fellows take ~1 s)


@pytest.fixture(scope="package")
def platform(tmp_path_factory, s3_endpoint) -> Iterator[Served]:
    # Package scope: one platform for every end-to-end module, torn down before other packages run
    # (their `db` fixture reconnects the documents, which the platform's threads must not see).
    services.require(conftest.REAL_BROKER, "RabbitMQ (with its management plugin) and Redis")
    from tasks.storage import open_storage

    db_name = f"peertrain-e2e-{uuid.uuid4().hex[:8]}"
    storage_url = f"s3://peertrain-{conftest.RUN_ID}-{uuid.uuid4().hex[:6]}"
    open_storage(storage_url, s3_endpoint).ensure_bucket()
    # A short silence limit, so a peer killed mid-session is noticed within seconds.
    settings = dataclasses.replace(Settings.from_env(), mongodb_uri=conftest.database_uri(db_name),
                                   storage_url=storage_url, s3_endpoint_url=s3_endpoint,
                                   peer_timeout_seconds=PEER_TIMEOUT, deadline_floor=DEADLINE_FLOOR)
    assert settings.broker_url.startswith("amqp://"), settings.broker_url
    served = Served(settings, tmp_path_factory.mktemp("logs"), name=f"coordinator-{conftest.RUN_ID}").start()
    try:
        yield served
    finally:
        served.stop()
        import mongoengine

        mongoengine.get_connection().drop_database(db_name)
        models.disconnect()


@pytest.fixture(scope="package")
def shared_peers(platform) -> list[str]:
    """Two healthy peers, shared by the end-to-end tests (each test leaves them ONLINE)."""
    return platform.start_peers(f"a{conftest.RUN_ID}", f"b{conftest.RUN_ID}")


@pytest.fixture
def two_peers(shared_peers) -> list[str]:
    """The shared peers, once a session could claim both (ONLINE and heard from within the silence limit): the
    monitor may still be reading the backlog a test of hundreds of peers left."""
    from harness.waiting import wait_until
    from models import Peer
    from models.db import utcnow

    wait_until(lambda: Peer.objects(name__in=shared_peers, status="ONLINE",
                                    last_seen__gte=utcnow() - timedelta(seconds=PEER_TIMEOUT)).count() == 2,
               60, f"peers {shared_peers} to be claimable")
    return shared_peers


@pytest.fixture(scope="package")
def digits_csv(tmp_path_factory) -> Path:
    from harness.datasets import sklearn_csv

    return sklearn_csv(tmp_path_factory.mktemp("data") / "digits.csv", "digits")


@pytest.fixture
def unique() -> Callable[[str], str]:
    """Peer names unique to this run, so peers of other runs on the same broker never mix in."""
    return lambda name: f"{name}{conftest.RUN_ID}"


@pytest.fixture(scope="module")
def browser() -> Iterator:
    """Debian's chromium, through Playwright (tests/e2e/browsing.py drives it)."""
    from tests.e2e.browsing import ARGS, SCREENSHOTS

    services.require(services.chromium_installed(), f"Debian's chromium at {services.CHROMIUM}")
    from playwright.sync_api import sync_playwright

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=services.CHROMIUM, args=ARGS)
        yield browser
        browser.close()
