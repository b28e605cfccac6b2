"""Which real services the tests can reach; absent ones skip a test locally and fail it on CI."""

from __future__ import annotations

import os

import pytest

from harness.waiting import reachable

RABBITMQ_URL = os.environ.get("TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672//")
# RabbitMQ's management API (the rabbitmq_management plugin): peers' logins are made through it.
RABBITMQ_ADMIN_URL = os.environ.get("TEST_RABBITMQ_ADMIN_URL", "http://guest:guest@127.0.0.1:15672")
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/14")
ON_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
# `make test-fast`: the unit lane, run as if no service were there (the tests that need one skip).
OFFLINE = os.environ.get("TEST_SERVICES", "").lower() == "off"


def rabbitmq_up() -> bool:
    return not OFFLINE and reachable("127.0.0.1", 5672)


def rabbitmq_admin_up() -> bool:
    return not OFFLINE and reachable("127.0.0.1", 15672)


def redis_up() -> bool:
    return not OFFLINE and reachable("127.0.0.1", 6379)


def require(available: bool, what: str) -> None:
    """Skip (locally) or fail (on CI) the calling test when `what` is not available."""
    if available:
        return
    if ON_CI and not OFFLINE:
        pytest.fail(f"{what} is required on CI but is not available")
    pytest.skip(f"{what} is not available")


# Debian's chromium (`apt-get install chromium`), driven by Playwright without a browser download of its own.
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")


def chromium_installed() -> bool:
    return not OFFLINE and os.access(CHROMIUM, os.X_OK)
