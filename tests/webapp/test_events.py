"""GET /sessions/<id>/events: a session's events replayed from the log, then live, once each, ending with `end`.

The writers here are the models' own state changes (what the coordinator and the monitor call), so the
stream sees exactly what a deployment's would; announcements travel over the test run's broker.
"""

from __future__ import annotations

import json
import queue
import threading
from pathlib import Path

import pytest
from bson import ObjectId

from harness.datasets import blobs_csv
from harness.http import sse
from models import TrainingSession, utcnow
from models import event as events
from models import session as sessions
from models.heartbeat import insert_many

EPOCHS = 3


@pytest.fixture
def csv_path(tmp_path: Path) -> Path:
    return blobs_csv(tmp_path / "blobs.csv", rows=60, features=3, classes=2)


@pytest.fixture
def started(client, auth, online_peers, csv_path) -> tuple[str, list[str]]:
    """A PENDING session on two peers: its id and peer names."""
    online_peers(2)
    with csv_path.open("rb") as f:
        response = client.post("/sessions/start", headers=auth, content_type="multipart/form-data",
                               data={"num_peers": "2", "file": (f, csv_path.name)})
    assert response.status_code == 202, response.json
    return response.json["session_id"], response.json["assigned_peers"]


def beats(session_id: str, peer: str, epochs=range(1, EPOCHS + 1)) -> list[dict]:
    return [{"session_id": ObjectId(session_id), "peer": peer, "round": 0, "epoch": e, "epochs": EPOCHS,
             "loss": 1.0 / e, "accuracy": 0.5 + e / 10} for e in epochs]


def start_running(sid: ObjectId, names: list[str]) -> bool:
    """What the coordinator records as it sends a sweep's round."""
    position = {run.name: i for i, run in enumerate(sessions.TrainingSession.objects.get(id=sid).peers)}
    return sessions.start_running(sid, {name: f"task-{name}" for name in names},
                                  sessions.Launch(round=0, peers=names), 60, position, utcnow())


def run_to_the_end(session_id: str, names: list[str]) -> None:
    """What the coordinator and the monitor write for a sweep, repeats included."""
    sid = ObjectId(session_id)
    assert start_running(sid, names)
    for name in names:
        insert_many(beats(session_id, name, [1, 2]))  # the monitor, epoch by epoch
    insert_many(beats(session_id, names[0]))  # the coordinator stores a returned history: 1 and 2 again
    sessions.record_peer_result(sid, names[0], "COMPLETED")
    insert_many(beats(session_id, names[1], [2, 3]))
    sessions.record_peer_result(sid, names[1], "COMPLETED")
    sessions.record_peer_result(sid, names[1], "COMPLETED")  # an errback or a redelivery says it again
    assert sessions.finish(sid, "COMPLETED")


def read(client, session_id: str, headers: dict, last: int | None = None) -> list[dict]:
    if last is not None:
        headers = {**headers, "Last-Event-ID": str(last)}
    response = client.get(f"/sessions/{session_id}/events", headers=headers)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.mimetype == "text/event-stream" and response.headers["Cache-Control"] == "no-cache"
    return list(sse([response.get_data()]))


def test_a_finished_session_replays_every_event_once_and_ends(client, auth, started):
    session_id, names = started
    run_to_the_end(session_id, names)
    stream = read(client, session_id, auth)
    assert [e["id"] for e in stream] == list(range(1, len(stream) + 1))
    assert [e["event"] for e in stream][:4] == ["status", "status", "peer", "peer"]
    assert [e["data"]["status"] for e in stream if e["event"] == "status"] == ["PENDING", "RUNNING", "COMPLETED"]
    assert stream[-1] == {"id": stream[-1]["id"], "event": "end", "data": {"status": "COMPLETED", "reason": None}}
    assert sum(e["event"] == "end" for e in stream) == 1
    heartbeats = [(e["data"]["peer"], e["data"]["epoch"]) for e in stream if e["event"] == "heartbeat"]
    assert sorted(heartbeats) == sorted((name, epoch) for name in names for epoch in range(1, EPOCHS + 1))
    first = next(e["data"] for e in stream if e["event"] == "heartbeat")
    assert set(first) == set(events.HEARTBEAT_FIELDS) and first["epochs"] == EPOCHS and first["loss"] == 1.0
    peers = [(e["data"]["peer"], e["data"]["status"]) for e in stream if e["event"] == "peer"]
    assert sorted(peers) == sorted((name, status) for name in names for status in ("RUNNING", "COMPLETED"))


def test_resuming_after_any_event_sends_exactly_the_rest(client, auth, started):
    session_id, names = started
    run_to_the_end(session_id, names)
    whole = read(client, session_id, auth)
    for last in range(len(whole)):
        assert read(client, session_id, auth, last=last) == whole[last:], last
    # A client that had the end already gets it again, and nothing else.
    assert read(client, session_id, auth, last=whole[-1]["id"] + 5) == whole[-1:]


def follow(client, session_id: str, headers: dict, into: queue.Queue) -> threading.Thread:
    def run() -> None:
        response = client.get(f"/sessions/{session_id}/events", headers=headers, buffered=False)
        try:
            for event in sse(response.response):
                into.put(event)
        finally:
            response.close()
            into.put(None)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def next_event(arrived: queue.Queue) -> dict:
    event = arrived.get(timeout=10)
    assert event is not None, "the stream closed early"
    return event


def test_a_live_stream_follows_the_session_and_closes_after_the_end(client, auth, started):
    session_id, names = started
    sid = ObjectId(session_id)
    arrived: queue.Queue = queue.Queue()
    thread = follow(client, session_id, auth, arrived)
    assert next_event(arrived)["data"]["status"] == "PENDING"
    assert start_running(sid, names)
    assert [next_event(arrived)["event"] for _ in range(3)] == ["status", "peer", "peer"]
    insert_many(beats(session_id, names[0], [1]))
    assert next_event(arrived)["data"]["epoch"] == 1
    # An announcement lost on the way (or overtaken by another writer's): the next one shows the gap,
    # and the stream finds the missing event in the log.
    events.announce_with(None)
    try:
        insert_many(beats(session_id, names[0], [2]))
    finally:
        from tasks import feed
        from webapp.extensions import CELERY

        feed.install(client.application.extensions[CELERY])
    insert_many(beats(session_id, names[0], [3]))
    assert [next_event(arrived)["data"]["epoch"] for _ in range(2)] == [2, 3]
    assert sessions.finish(sid, "CANCELLED", "cancelled by the user")
    finished_at = events.iso(TrainingSession.objects.get(id=session_id).finished_at)
    assert next_event(arrived)["data"] == {"status": "CANCELLED", "reason": "cancelled by the user", "at": finished_at}
    assert next_event(arrived)["event"] == "end"
    assert arrived.get(timeout=10) is None  # closed after the end
    thread.join(5)


def test_a_session_that_ended_without_its_end_in_the_log_gets_one(client, auth, started):
    session_id, _ = started
    # Ended by a writer that died before logging it (or before the log existed).
    TrainingSession.objects(id=session_id).update_one(set__status="FAILED", set__reason="the coordinator died")
    stream = read(client, session_id, auth)
    assert [(e["event"], e["data"]["status"]) for e in stream] == [("status", "PENDING"), ("status", "FAILED"),
                                                                   ("end", "FAILED")]
    assert stream[-1]["data"]["reason"] == "the coordinator died"
    assert read(client, session_id, auth) == stream  # healed once


def test_a_federated_round_is_an_event(client, auth, started):
    from models import Round

    session_id, names = started
    round_doc = Round(round=0, metrics={"val_loss": 0.4, "val_accuracy": 0.9, "val_rows": 12, "samples": 48},
                      peers=names, rejected={}, outliers={})
    events.record_round(session_id, round_doc)
    events.record_round(session_id, round_doc)  # a redelivered aggregate
    sessions.finish(ObjectId(session_id), "COMPLETED")
    rounds = [e["data"] for e in read(client, session_id, auth) if e["event"] == "round"]
    assert rounds == [{"round": 0, "metrics": {"val_loss": 0.4, "val_accuracy": 0.9, "val_rows": 12, "samples": 48},
                       "peers": names, "rejected": {}, "outliers": {}}]


def test_only_the_owner_may_follow_a_session(client, auth, signup, started):
    session_id, _ = started
    url = f"/sessions/{session_id}/events"
    bob = signup("bob")
    for headers, code in ((bob, 404), ({}, 401), ({"Authorization": "Bearer nonsense"}, 401)):
        response = client.get(url, headers=headers)
        assert response.status_code == code
        assert response.mimetype == "application/json" and response.json["code"] == code
    assert client.get("/sessions/not-an-id/events", headers=auth).status_code == 404
    response = client.get(url, headers={**auth, "Last-Event-ID": "seven"})
    assert response.status_code == 400 and "Last-Event-ID" in response.json["message"]
    assert client.head(url, headers=auth).status_code == 200


def test_numbers_json_cannot_carry_are_sent_as_null(client, auth, started):
    # A peer's event is not trusted: a NaN loss must not break the stream of its session.
    session_id, names = started
    insert_many([{**beats(session_id, names[0], [1])[0], "loss": float("nan"), "accuracy": float("inf")}])
    sessions.finish(ObjectId(session_id), "FAILED", "diverged")
    [beat] = [e["data"] for e in read(client, session_id, auth) if e["event"] == "heartbeat"]
    assert beat["loss"] is None and beat["accuracy"] is None and beat["epoch"] == 1


def get_scope(path: str, headers: dict) -> dict:
    """A GET's ASGI scope, as granian builds it."""
    return {"type": "http", "method": "GET", "path": path, "raw_path": path.encode(), "query_string": b"",
            "root_path": "", "scheme": "http", "http_version": "1.1", "server": ("127.0.0.1", 80),
            "client": ("127.0.0.1", 5000), "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}


def asgi_get(api, path: str, headers: dict, disconnect: threading.Event | None = None,
             loop=None) -> tuple[int, bytes]:
    """One GET through the ASGI app (as granian calls it), in an event loop of its own, or on the running
    `loop` when one is given (from another thread)."""
    import asyncio

    async def call() -> tuple[int, bytes]:
        status, body, asked = 0, b"", False

        async def receive() -> dict:
            nonlocal asked
            if not asked:
                asked = True
                return {"type": "http.request", "body": b"", "more_body": False}
            while disconnect is None or not disconnect.is_set():
                await asyncio.sleep(0.02)
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            nonlocal status, body
            if message["type"] == "http.response.start":
                status = message["status"]
            else:
                body += message.get("body", b"")

        await api(get_scope(path, headers), receive, send)
        return status, body

    if loop is None:
        return asyncio.run(call())
    return asyncio.run_coroutine_threadsafe(call(), loop).result(20)


def test_the_asgi_app_streams_as_a_coroutine_and_refuses_in_flasks_words(app, client, auth, signup, started):
    from webapp.asgi import Api

    session_id, names = started
    run_to_the_end(session_id, names)
    api = Api(app)
    status, body = asgi_get(api, f"/sessions/{session_id}/events", auth)
    assert status == 200 and list(sse([body])) == read(client, session_id, auth)
    status, body = asgi_get(api, f"/sessions/{session_id}/events", {**auth, "Last-Event-ID": "4"})
    assert [e["id"] for e in sse([body])][0] == 5
    status, body = asgi_get(api, f"/sessions/{session_id[:12]}/events", auth)  # the beginning of its id
    assert status == 200 and list(sse([body])) == read(client, session_id, auth)
    status, body = asgi_get(api, f"/sessions/{session_id}/events", signup("bob"))
    assert status == 404 and json_body(body)["code"] == 404
    status, body = asgi_get(api, f"/sessions/{session_id}/events", {**auth, "Last-Event-ID": "x"})
    assert status == 400 and "Last-Event-ID" in json_body(body)["message"]
    status, body = asgi_get(api, "/peers", auth)  # everything else is Flask's, through the adapter
    assert status == 200 and json_body(body)["total"] == 2


def test_a_client_that_goes_away_leaves_no_subscription_behind(app, auth, started):
    from webapp.asgi import Api

    session_id, _ = started  # PENDING: the stream would stay open
    api = Api(app)
    gone = threading.Event()
    threading.Timer(1.0, gone.set).start()
    status, body = asgi_get(api, f"/sessions/{session_id}/events", auth, disconnect=gone)
    assert status == 200 and [e["data"]["status"] for e in sse([body])] == ["PENDING"]
    assert api.hub.open_streams() == 0


def json_body(body: bytes) -> dict:
    return json.loads(body)


def test_stopping_tells_every_open_stream_closes_it_and_refuses_new_ones(app, auth, started):
    """A server waits for open connections before it stops: an open stream must end when it is told to stop."""
    import asyncio

    from webapp.asgi import Api

    session_id, _ = started  # PENDING: the stream would stay open
    stopped: list[int] = []
    api = Api(app, on_shutdown=lambda: stopped.append(1))
    path = f"/sessions/{session_id}/events"

    async def both() -> tuple[tuple[int, bytes], tuple[int, bytes]]:
        loop = asyncio.get_running_loop()
        opened = loop.run_in_executor(None, lambda: asgi_get(api, path, auth, loop=loop))
        await asyncio.wait_for(_until(lambda: api.hub.open_streams() == 1), 10)
        await asyncio.gather(api.stop(), api.stop())
        first = await asyncio.wait_for(opened, 10)
        return first, await loop.run_in_executor(None, lambda: asgi_get(api, path, auth, loop=loop))

    (status, body), (again, refusal) = asyncio.run(both())
    events = list(sse([body]))
    assert status == 200 and [e["event"] for e in events] == ["status", "stopping"]
    assert events[-1]["id"] is None  # a client resumes from the log's last event, not from this one
    assert stopped == [1]  # the platform stops once, however often it is asked
    assert again == 503 and json_body(refusal)["code"] == 503


async def _until(condition) -> None:
    import asyncio

    while not condition():
        await asyncio.sleep(0.01)
