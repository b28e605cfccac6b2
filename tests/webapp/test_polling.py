"""Polled views are served from a short-lived cache: fresh after this API's own writes, at most
API_CACHE_SECONDS old after other processes' writes, per token, and never past a token's expiry."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from bson import ObjectId

from models import session as sessions
from models.session import RUNNING
from tests.datasets import blobs_csv
from tests.webapp.test_sessions import start
from webapp.polling import EXTENSION, ResponseCache


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(app) -> Clock:
    clock = Clock()
    app.extensions[EXTENSION].clock = clock
    return clock


@pytest.fixture
def csv_path(tmp_path: Path) -> Path:
    return blobs_csv(tmp_path / "blobs.csv", rows=60, features=3, classes=2)


def _progress_from_another_process(session_id: str, peer: str, epoch: int) -> None:
    # What a monitor in another process writes for a heartbeat: this process hears nothing of it.
    sessions.TrainingSession._get_collection().update_one(
        {"_id": ObjectId(session_id), "peers.name": peer}, {"$set": {"peers.$.epoch": epoch}}
    )


def test_others_writes_show_within_the_period(app, client, auth, online_peers, csv_path, clock):
    online_peers(1)
    started = start(client, auth, csv_path, num_peers="1").json
    session_id, peer = started["session_id"], started["assigned_peers"][0]
    path = f"/sessions/{session_id}"
    assert client.get(path, headers=auth).json["peers"][0]["epoch"] == 0

    _progress_from_another_process(session_id, peer, 3)
    assert client.get(path, headers=auth).json["peers"][0]["epoch"] == 0  # kept: within the period
    clock.now += app.config["API_CACHE_SECONDS"]
    assert client.get(path, headers=auth).json["peers"][0]["epoch"] == 3


def test_writes_made_in_this_process_show_at_once(client, auth, online_peers, csv_path, clock):
    # make run: the monitor and the coordinator write through the models in the API's own process.
    online_peers(1)
    started = start(client, auth, csv_path, num_peers="1").json
    session_id, peer = started["session_id"], started["assigned_peers"][0]
    assert client.get(f"/sessions/{session_id}", headers=auth).json["peers"][0]["epoch"] == 0
    assert client.get("/sessions/training-status", headers=auth).json["status"] == "PENDING"

    sessions.record_progress(ObjectId(session_id), peer, {"epoch": 4})
    assert client.get(f"/sessions/{session_id}", headers=auth).json["peers"][0]["epoch"] == 4
    sessions.finish(ObjectId(session_id), "FAILED", reason="peer p0 failed")
    assert client.get("/sessions/training-status", headers=auth).json["status"] == "FAILED"


def test_this_apis_own_writes_show_at_once(client, auth, online_peers, csv_path, clock):
    online_peers(2)
    first = start(client, auth, csv_path, num_peers="1").json["session_id"]
    assert client.get("/sessions/training-status", headers=auth).json["session_id"] == first
    assert client.get(f"/sessions/{first}", headers=auth).json["status"] == "PENDING"

    second = start(client, auth, csv_path, num_peers="1").json["session_id"]
    assert client.get("/sessions/training-status", headers=auth).json["session_id"] == second
    assert client.get(f"/sessions/{first}", headers=auth).json["status"] == "PENDING"  # kept again

    # The coordinator, in another process, marks it running: unannounced here.
    sessions.TrainingSession._get_collection().update_one({"_id": ObjectId(first)}, {"$set": {"status": RUNNING}})
    assert client.post(f"/sessions/{first}/cancel", headers=auth).status_code == 202
    # The cancel dropped what was kept for this user: the detail is read afresh.
    assert client.get(f"/sessions/{first}", headers=auth).json["status"] == "RUNNING"


def test_errors_are_never_kept(app, client, auth, online_peers, csv_path, clock):
    assert client.get("/sessions/training-status", headers=auth).status_code == 404
    online_peers(1)
    # Another API process (its own cache, the same database and secret) starts a session.
    from webapp import create_app

    other = create_app({**{k: app.config[k] for k in ("TESTING", "MONGODB_URI", "STORAGE_URL", "BCRYPT_ROUNDS")}})
    session_id = start(other.test_client(), auth, csv_path, num_peers="1").json["session_id"]
    assert client.get("/sessions/training-status", headers=auth).json["session_id"] == session_id


def test_a_kept_answer_is_only_for_the_token_that_got_it(client, signup, online_peers, csv_path, clock):
    online_peers(1)
    ann, bob = signup("ann"), signup("bob")
    session_id = start(client, ann, csv_path, num_peers="1").json["session_id"]
    assert client.get(f"/sessions/{session_id}", headers=ann).status_code == 200
    assert client.get(f"/sessions/{session_id}", headers=bob).status_code == 404
    assert client.get(f"/sessions/{session_id}", headers={"Authorization": "Bearer nonsense"}).status_code == 401
    assert client.get(f"/sessions/{session_id}").status_code == 401


def test_zero_seconds_turns_it_off(app, client, auth, online_peers, csv_path):
    app.extensions[EXTENSION].seconds = 0
    online_peers(1)
    started = start(client, auth, csv_path, num_peers="1").json
    path = f"/sessions/{started['session_id']}"
    assert client.get(path, headers=auth).json["peers"][0]["epoch"] == 0
    _progress_from_another_process(started["session_id"], started["assigned_peers"][0], 2)
    assert client.get(path, headers=auth).json["peers"][0]["epoch"] == 2


def test_an_entry_never_outlives_its_token():
    clock = Clock()
    cache = ResponseCache(60.0, clock, wall=clock)
    cache.put(("Bearer t", "/p"), "owner", token_expires=clock.now + 5, body=b"{}", mimetype="application/json")
    clock.now += 4.9
    assert cache.get(("Bearer t", "/p")) is not None
    clock.now += 0.2
    assert cache.get(("Bearer t", "/p")) is None


def test_entries_expire_spread_over_the_second_half_of_the_period():
    clock = Clock()
    cache = ResponseCache(10.0, clock, wall=clock)
    keys = [(f"Bearer {i}", "/p") for i in range(200)]
    for key in keys:
        cache.put(key, "owner", token_expires=clock.now + 3600, body=b"{}", mimetype="application/json")
    clock.now += 4.99
    assert all(cache.get(key) is not None for key in keys)
    clock.now += 2.5
    alive = sum(cache.get(key) is not None for key in keys)
    assert 40 < alive < 160  # about half expire in [5, 7.5) s
    clock.now += 2.52
    assert all(cache.get(key) is None for key in keys)


def test_the_least_recently_used_go_first_when_the_bytes_run_out(monkeypatch):
    monkeypatch.setattr("webapp.polling._BUDGET", 30)
    clock = Clock()
    cache = ResponseCache(10.0, clock, wall=clock)
    for key in ("a", "b", "c"):
        assert cache.put((key, "/p"), "owner", clock.now + 3600, b"x" * 10, "application/json")
    assert cache.get(("a", "/p")) is not None  # a is now the most recent
    cache.put(("d", "/p"), "owner", clock.now + 3600, b"x" * 10, "application/json")
    assert [cache.get((key, "/p")) is not None for key in "abcd"] == [True, False, True, True]


def test_a_body_too_large_to_share_the_budget_is_not_kept(monkeypatch):
    monkeypatch.setattr("webapp.polling._LARGEST", 100)
    cache = ResponseCache(10.0)
    assert not cache.put(("a", "/p"), "owner", math.inf, b"x" * 101, "application/json")
    assert cache.get(("a", "/p")) is None


def test_an_answer_computed_across_a_change_is_not_kept():
    # The view read the session, then the monitor (same process) wrote it, then the answer came back.
    cache = ResponseCache(10.0)
    ticket = cache.ticket()
    cache.session_changed("some-session")
    assert not cache.put(("a", "/p"), "owner", math.inf, b"{}", "application/json", "s", ticket)
    assert cache.put(("a", "/p"), "owner", math.inf, b"{}", "application/json", "s", cache.ticket())


def test_a_change_to_an_unnamed_session_drops_everything():
    cache = ResponseCache(10.0)
    cache.put(("a", "/p"), "owner", math.inf, b"{}", "application/json", "s")
    cache.session_changed(None)
    assert cache.get(("a", "/p")) is None


@pytest.mark.parametrize("seconds", [math.nan, math.inf, -1.0])
def test_the_period_must_be_a_finite_number_of_seconds(seconds):
    with pytest.raises(ValueError, match="API_CACHE_SECONDS"):
        ResponseCache(seconds)


def test_a_query_string_does_not_make_a_new_entry(client, auth, online_peers, csv_path, clock):
    online_peers(1)
    started = start(client, auth, csv_path, num_peers="1").json
    path = f"/sessions/{started['session_id']}"
    assert client.get(path, headers=auth).json["peers"][0]["epoch"] == 0
    _progress_from_another_process(started["session_id"], started["assigned_peers"][0], 5)
    for query in ("?x=1", "?x=2", "?"):
        assert client.get(path + query, headers=auth).json["peers"][0]["epoch"] == 0


def test_an_id_spelt_in_capitals_is_dropped_on_a_write_too(client, auth, online_peers, csv_path, clock):
    online_peers(1)
    started = start(client, auth, csv_path, num_peers="1").json
    path = f"/sessions/{started['session_id'].upper()}"
    assert client.get(path, headers=auth).json["peers"][0]["epoch"] == 0
    sessions.record_progress(ObjectId(started["session_id"]), started["assigned_peers"][0], {"epoch": 6})
    assert client.get(path, headers=auth).json["peers"][0]["epoch"] == 6
