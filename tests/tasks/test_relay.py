"""The one Celery behaviour the coordinator relies on beyond its public API, pinned (tasks/relay.py).

Peers cannot write the result backend, so the coordinator counts each header task of a round's chord
itself: the backend's `mark_as_done`, given the task's place in the chord (group, index, body), counts
it, and the last one sends the body with every result in header order. If a Celery upgrade changes
that, these fail, for the in-memory backend (`make run`) and for Redis's (deployments).
"""

from __future__ import annotations

import dataclasses
import uuid

import pytest
from celery import Celery

from settings import Settings
from tasks import relay
from tasks.celery import create_app
from tasks.gate import Outcome
from tests import conftest, services


def app_on(result_backend: str) -> Celery:
    settings = dataclasses.replace(Settings.from_env(), broker_url="memory://localhost/",
                                   result_backend=result_backend, coordinator_queue=f"relay-{uuid.uuid4().hex[:8]}")
    return create_app(settings)


def body_messages(app: Celery, queue: str) -> list[tuple[str, list]]:
    found = []
    with app.connection_for_read() as connection, connection.SimpleQueue(queue) as waiting:
        while True:
            try:
                message = waiting.get_nowait()
            except waiting.Empty:
                return found
            found.append((message.headers["task"], message.payload[0]))
            message.ack()


def a_round(app: Celery, queue: str, peers: int) -> list[dict]:
    """A round's chord as the coordinator sends it; its assignments as it records them."""
    group, body_id, session = uuid.uuid4().hex, f"s:0:aggregate-{uuid.uuid4().hex}", "s"
    ids = [f"s:0:{uuid.uuid4().hex}" for _ in range(peers)]
    header = [relay.train(app, f"peer.relay{i}", task_id, {"x": i}, 60, "test") for i, task_id in enumerate(ids)]
    relay.send(app, header, group, relay.body(app, queue, session, 0, body_id, peers))
    return [{"_id": task_id, "session_id": session, "peer": f"p{i}", "round": 0,
             "chord": {"group": group, "index": i, "size": peers, "body": body_id}} for i, task_id in enumerate(ids)]


def outcome(assignment: dict, i: int) -> Outcome:
    return Outcome(assignment["_id"], assignment["peer"], 0, "trained", result={"n": i})


def backends() -> list:
    redis = pytest.param(services.REDIS_URL, marks=pytest.mark.skipif(
        not conftest.REAL_BROKER and not services.ON_CI, reason="Redis is not available"), id="redis")
    return [pytest.param("cache+memory://", id="memory"), redis]


@pytest.mark.parametrize("backend", backends())
def test_the_last_part_counted_sends_the_body_with_every_outcome_in_header_order(backend):
    services.require(backend.startswith("cache") or services.redis_up(), "Redis")
    app = app_on(backend)
    queue = app.conf.task_default_queue
    parts = a_round(app, queue, 3)
    for i in (2, 0):  # out of order: the last peer to report is not the last in the header
        relay.settle(app, queue, parts[i], outcome(parts[i], i))
        assert body_messages(app, queue) == []
    relay.settle(app, queue, parts[1], outcome(parts[1], 1))
    [(task, args)] = body_messages(app, queue)
    assert task == "peertrain.aggregate" and args[1:] == ["s", 0]
    assert [Outcome.from_message(r).result for r in args[0]] == [{"n": 0}, {"n": 1}, {"n": 2}]


def test_redis_counts_a_part_settled_twice_once():
    """The coordinator settles again an outcome it decided but died before passing on: on Redis that is safe."""
    services.require(services.redis_up(), "Redis")
    app = app_on(services.REDIS_URL)
    queue = app.conf.task_default_queue
    parts = a_round(app, queue, 2)
    relay.settle(app, queue, parts[0], outcome(parts[0], 0))
    relay.settle(app, queue, parts[0], outcome(parts[0], 0))
    assert body_messages(app, queue) == []
    relay.settle(app, queue, parts[1], outcome(parts[1], 1))
    assert len(body_messages(app, queue)) == 1
