"""Peers through HTTP: enrolling a machine with a one-time token, owners, sharing, pausing, removing, pools."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from kombu import Connection

from harness.datasets import blobs_csv
from models import Peer, TrainingSession, User
from models import peer as peers
from models.peer import ONLINE, TRAINING
from settings import Settings
from tasks import protocol
from tests import conftest, services
from tests.webapp.test_sessions import start as start_session
from webapp.extensions import DISPATCHER, Dispatcher


@pytest.fixture
def csv_path(tmp_path: Path) -> Path:
    return blobs_csv(tmp_path / "blobs.csv", rows=120, features=4, classes=3)


def start(client, headers, path: Path, **form):
    return start_session(client, headers, path, **{"num_peers": "1", **form})


def enrol(client, headers, name: str):
    return client.post("/peers", headers=headers, json={"name": name})


def online(name: str) -> None:
    """What the monitor does when the peer's worker shows up on its own queue."""
    peers.seen(name, f"peer.{name}@laptop")


def joined(name: str) -> None:
    conftest.PEER_USERS.append(protocol.broker_user(name, Settings.from_env().broker_scope))


def names(client, headers) -> dict[str, dict]:
    return {p["name"]: p for p in client.get("/peers", headers=headers).json["peers"]}


@pytest.fixture
def broker():
    services.require(bool(conftest.VHOST), "RabbitMQ with its management plugin")


def test_a_join_token_is_shown_once_stored_hashed_and_exchanged_once_for_the_peers_own_login(client, auth, broker):
    name = f"lap{conftest.RUN_ID}"
    before = datetime.now(UTC)
    answer = enrol(client, auth, name)
    assert answer.status_code == 201, answer.json
    body = answer.json
    token = body["join_token"]
    assert body["name"] == name and token.startswith("ptj_") and len(token) > 40
    expires = datetime.fromisoformat(body["expires_at"])
    assert timedelta(minutes=59) < expires - before <= timedelta(hours=1, seconds=5)
    assert body["command"] == f"peertrain peer join --url http://localhost --token {token} && peertrain peer run"
    stored = Peer.objects.get(name=name)
    assert stored.status == "OFFLINE" and stored.owner_id is not None
    assert token not in json.dumps(stored.to_mongo().to_dict(), default=str)  # only its hash

    first = client.post("/join", json={"token": token})
    assert first.status_code == 200, first.json
    joined(name)
    environment = first.json["environment"]
    assert set(environment) >= {"BROKER_URL", "EVENT_EXCHANGE", "RESULTS_QUEUE"}
    assert f"-Q peer.{name}" in first.json["command"]
    with Connection(environment["BROKER_URL"], connect_timeout=5) as login:
        login.ensure_connection(max_retries=1)
        assert login.userid == protocol.broker_user(name, Settings.from_env().broker_scope)

    again = client.post("/join", json={"token": token})
    assert again.status_code == 410 and "used already" in again.json["message"]
    tampered = client.post("/join", json={"token": token[:-2] + ("AA" if token[-2:] != "AA" else "BB")})
    assert tampered.status_code == 401 and "not valid" in tampered.json["message"]
    assert client.post("/join", json={}).status_code == 400


def test_an_expired_token_is_refused_and_a_new_one_replaces_it(app, client, auth, broker):
    name = f"old{conftest.RUN_ID}"
    app.config["JOIN_TOKEN_SECONDS"] = 0
    stale = enrol(client, auth, name).json["join_token"]
    answer = client.post("/join", json={"token": stale})
    assert answer.status_code == 410 and "expired" in answer.json["message"]
    app.config["JOIN_TOKEN_SECONDS"] = 3600
    fresh = enrol(client, auth, name)  # the same name again: the owner's new token
    assert fresh.status_code == 201
    assert client.post("/join", json={"token": stale}).status_code == 401  # replaced
    assert client.post("/join", json={"token": fresh.json["join_token"]}).status_code == 200
    joined(name)
    assert Peer.objects(name=name).count() == 1


def test_names_are_checked_and_anothers_name_is_not_taken_over(client, signup, broker):
    ann, bob = signup("ann"), signup("bob")
    assert enrol(client, ann, "gpu-box").status_code == 201
    taken = enrol(client, bob, "gpu-box")
    assert taken.status_code == 409 and "not yours" in taken.json["message"]
    peers.register("platform1")
    assert enrol(client, bob, "platform1").status_code == 409
    bad = enrol(client, ann, "a.b")
    assert bad.status_code == 400 and "letters, digits" in json.dumps(bad.json)


def test_with_make_runs_in_process_broker_machines_cannot_join_and_are_told_how(db, storage_dir, signup):
    from webapp import create_app

    settings = Settings.from_env({"BROKER_URL": "memory://localhost/", "JWT_SECRET_KEY": "x" * 40})
    app = create_app({"TESTING": True, "MONGODB_URI": db, "STORAGE_URL": str(storage_dir)}, settings=settings)
    client = app.test_client()
    client.post("/auth/signup", json={"username": "ann", "email": "ann@example.com", "password": "correct horse"})
    token = client.post("/auth/signin", json={"email": "ann@example.com", "password": "correct horse"}).json
    answer = client.post("/peers", headers={"Authorization": f"Bearer {token['access_token']}"}, json={"name": "x1"})
    assert answer.status_code == 409
    assert "BROKER_URL" in answer.json["message"] and "make run" in answer.json["message"]
    assert Peer.objects.count() == 0


def test_an_owned_peer_serves_only_its_owner_until_shared_and_a_paused_one_no_one(client, signup, csv_path):
    ann, bob = signup("ann"), signup("bob")
    peers.register("platform1")
    online("platform1")
    mine = peers.enrol("anns-laptop", User.objects.get(username="ann").id, "t", datetime.now(UTC))
    online(mine.name)

    assert set(names(client, ann)) == {"platform1", "anns-laptop"}
    assert set(names(client, bob)) == {"platform1"}  # a private peer is not even listed
    listed = names(client, ann)
    assert listed["anns-laptop"]["owner"] == "ann" and listed["anns-laptop"]["mine"] is True
    assert listed["platform1"]["owner"] is None and listed["platform1"]["public"] is True

    # Bob's sessions never take Ann's peer: with the platform's peer busy, there is none for him.
    first = start(client, bob, csv_path)
    assert first.status_code == 202 and first.json["assigned_peers"] == ["platform1"]
    refused = start(client, bob, csv_path)
    assert refused.status_code == 400 and "0 online and free" in refused.json["message"]
    assert start(client, bob, csv_path, pool="mine").status_code == 400  # he owns none

    # Ann's `mine` session takes only hers.
    own = start(client, ann, csv_path, pool="mine")
    assert own.status_code == 202 and own.json["assigned_peers"] == ["anns-laptop"]
    assert TrainingSession.objects.get(id=own.json["session_id"]).pool == "mine"
    assert client.get(f"/sessions/{own.json['session_id']}", headers=ann).json["pool"] == "mine"
    peers.release(TrainingSession.objects.get(id=own.json["session_id"]).id)

    # Shared with everyone, Bob's public sessions may take it; paused, no one's.
    patched = client.patch("/peers/anns-laptop", headers=ann, json={"public": True})
    assert patched.status_code == 200 and patched.json["public"] is True
    assert client.patch("/peers/anns-laptop", headers=bob, json={"paused": True}).status_code == 403
    assert client.patch("/peers/platform1", headers=ann, json={"public": False}).status_code == 403
    assert client.patch("/peers/anns-laptop", headers=ann, json={"paused": True}).json["paused"] is True
    assert start(client, bob, csv_path).status_code == 400
    assert start(client, ann, csv_path, pool="mine").status_code == 400
    assert client.get("/peers", headers=bob).json["free"] == 0
    assert client.patch("/peers/anns-laptop", headers=ann, json={"paused": False}).status_code == 200
    taken = start(client, bob, csv_path)
    assert taken.status_code == 202 and taken.json["assigned_peers"] == ["anns-laptop"]
    assert Peer.objects.get(name="anns-laptop").status == TRAINING
    assert client.patch("/peers/anns-laptop", headers=ann, json={"owner": "bob"}).status_code == 400


def test_pools_share_chosen_peers_with_chosen_users(client, signup, csv_path):
    ann, bob, eve = signup("ann"), signup("bob"), signup("eve")
    ann_id = User.objects.get(username="ann").id
    for name in ("lab1", "lab2"):
        peers.enrol(name, ann_id, name, datetime.now(UTC))
        online(name)
    peers.register("platform1")
    online("platform1")

    assert client.post("/pools", headers=ann, json={"name": "lab", "members": ["nobody"]}).status_code == 400
    foreign = client.post("/pools", headers=ann, json={"name": "lab", "peers": ["platform1"]})
    assert foreign.status_code == 400 and "not yours" in foreign.json["message"]
    assert client.post("/pools", headers=ann, json={"name": "mine"}).status_code == 400
    made = client.post("/pools", headers=ann, json={"name": "lab", "members": ["bob"], "peers": ["lab1"]})
    assert made.status_code == 201, made.json
    assert made.json == {**made.json, "owner": "ann", "members": ["bob"], "peers": ["lab1"]}
    assert client.post("/pools", headers=bob, json={"name": "lab"}).status_code == 409

    assert [p["name"] for p in client.get("/pools", headers=bob).json["pools"]] == ["lab"]
    assert client.get("/pools", headers=eve).json["pools"] == []
    assert set(names(client, bob)) == {"platform1", "lab1"}
    assert names(client, ann)["lab1"]["pools"] == ["lab"]

    outsider = start(client, eve, csv_path, pool="lab")
    assert outsider.status_code == 400 and "no pool named 'lab'" in outsider.json["message"]
    assert client.patch("/pools/lab", headers=bob, json={"members": []}).status_code == 403
    inside = start(client, bob, csv_path, pool="lab")
    assert inside.status_code == 202 and inside.json["assigned_peers"] == ["lab1"]
    assert start(client, bob, csv_path, pool="lab").status_code == 400  # lab2 is not in it

    assert client.patch("/pools/lab", headers=ann, json={"members": []}).status_code == 200
    assert start(client, bob, csv_path, pool="lab").status_code == 400
    assert client.delete("/pools/lab", headers=ann).status_code == 204
    assert client.get("/pools", headers=ann).json["pools"] == []


class Recording(Dispatcher):
    """The API's dispatcher, keeping what it tells the coordinator about lost peers as well as sending it."""

    def __init__(self, real: Dispatcher) -> None:
        super().__init__(real.celery, real.queue)
        self.lost: list[tuple[str, str, str]] = []

    def peer_lost(self, session_id: str, peer: str, reason: str) -> None:
        self.lost.append((session_id, peer, reason))
        super().peer_lost(session_id, peer, reason)


def test_the_owner_sees_its_peers_history_and_removes_it_revoking_its_login(app, client, signup, csv_path, broker):
    told = app.extensions[DISPATCHER] = Recording(app.extensions[DISPATCHER])
    ann, bob = signup("ann"), signup("bob")
    name = f"rm{conftest.RUN_ID}"
    token = enrol(client, ann, name).json["join_token"]
    environment = client.post("/join", json={"token": token}).json["environment"]
    joined(name)
    online(name)
    started = start(client, ann, csv_path, pool="mine")
    assert started.status_code == 202

    detail = client.get(f"/peers/{name}", headers=ann).json
    assert [s["session_id"] for s in detail["sessions"]] == [started.json["session_id"]]
    assert detail["reputation"] == 0.5 and detail["status"] == TRAINING
    assert client.get(f"/peers/{name}", headers=bob).status_code == 404
    assert client.delete(f"/peers/{name}", headers=bob).status_code == 404

    assert client.delete(f"/peers/{name}", headers=ann).status_code == 204
    assert Peer.objects(name=name).count() == 0
    # The coordinator goes on without it (tests/e2e/test_enrolment.py: with real processes).
    assert told.lost == [(started.json["session_id"], name, f"peer {name} was removed by its owner")]
    with pytest.raises(Exception, match="ACCESS_REFUSED|refused"):
        with Connection(environment["BROKER_URL"], connect_timeout=5) as login:
            login.ensure_connection(max_retries=1)
    assert Peer.objects(status=ONLINE).count() == 0


def test_an_interrupted_session_resumes_only_on_peers_still_shared_with_its_owner(client, signup, csv_path):
    from bson import ObjectId

    from models import session as sessions

    ann, bob = signup("ann"), signup("bob")
    peers.enrol("anns-gpu", User.objects.get(username="ann").id, "t", datetime.now(UTC))
    online("anns-gpu")
    assert client.patch("/peers/anns-gpu", headers=ann, json={"public": True}).status_code == 200
    started = start(client, bob, csv_path)
    assert started.status_code == 202 and started.json["assigned_peers"] == ["anns-gpu"]
    session_id = ObjectId(started.json["session_id"])
    peers.release(session_id)
    assert sessions.finish(session_id, sessions.INTERRUPTED, "make run was stopped")

    # Ann stops sharing it meanwhile: Bob's session cannot take it back.
    assert client.patch("/peers/anns-gpu", headers=ann, json={"public": False}).status_code == 200
    refused = client.post(f"/sessions/{session_id}/resume", headers=bob)
    assert refused.status_code == 409 and "anns-gpu is no longer shared with you" in refused.json["message"]
    assert Peer.objects.get(name="anns-gpu").status == ONLINE
    assert client.patch("/peers/anns-gpu", headers=ann, json={"public": True, "paused": True}).status_code == 200
    paused = client.post(f"/sessions/{session_id}/resume", headers=bob)
    assert paused.status_code == 409 and "anns-gpu is paused by its owner" in paused.json["message"]
    assert client.patch("/peers/anns-gpu", headers=ann, json={"paused": False}).status_code == 200
    assert client.post(f"/sessions/{session_id}/resume", headers=bob).status_code == 202
