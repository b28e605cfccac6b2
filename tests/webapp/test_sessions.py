"""Starting and reading sessions through HTTP."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path

import pytest
from bson import ObjectId

from harness.datasets import blobs_csv
from models import Heartbeat, Peer, TrainingSession, User
from models.heartbeat import insert_many
from models.peer import ONLINE, TRAINING


@pytest.fixture
def csv_path(tmp_path: Path) -> Path:
    return blobs_csv(tmp_path / "blobs.csv", rows=120, features=4, classes=3)


def start(client, headers, path: Path, **form):
    data = {"num_peers": "2", **{k: v if isinstance(v, str) else json.dumps(v) for k, v in form.items()}}
    with path.open("rb") as f:
        data["file"] = (f, path.name)
        return client.post("/sessions/start", headers=headers, data=data, content_type="multipart/form-data")


def test_start_claims_peers_stores_the_csv_and_creates_a_pending_session(client, auth, online_peers, csv_path,
                                                                         storage_dir):
    online_peers(3)
    settings = [{"learning_rate": 0.01}, {"learning_rate": 0.1, "epochs": 3}]
    response = start(client, auth, csv_path, hyperparameters=settings)
    assert response.status_code == 202, response.json
    body = response.json
    assert body["status"] == "PENDING"
    assert len(body["assigned_peers"]) == 2
    assert {p.name for p in Peer.objects(status=TRAINING)} == set(body["assigned_peers"])
    assert Peer.objects(status=ONLINE).count() == 1

    session = TrainingSession.objects.get(id=body["session_id"])
    content = csv_path.read_bytes()
    assert session.dataset.bytes == len(content)
    assert session.dataset.sha256 == hashlib.sha256(content).hexdigest()
    assert session.dataset.rows == 120 and session.dataset.columns == 5
    assert session.dataset.classes == ["0", "1", "2"]
    user = User.objects.get(username="ann")
    stored = storage_dir / "users" / str(user.id) / "sessions" / body["session_id"] / "dataset.csv"
    assert stored.read_bytes() == content
    assert [p.hyperparameters["learning_rate"] for p in session.peers] == [0.01, 0.1]
    assert [p.epochs for p in session.peers] == [10, 3]

    detail = client.get(f"/sessions/{body['session_id']}", headers=auth).json
    assert detail["dataset"]["filename"] == "blobs.csv"
    assert detail["target"] == "label" and detail["features"] == ["f0", "f1", "f2", "f3"]
    assert [p["name"] for p in detail["peers"]] == body["assigned_peers"]
    assert detail["peers"][1]["hyperparameters"] == {
        "batch_size": 64, "epochs": 3, "learning_rate": 0.1, "hidden": [128, 64], "optimizer": "adam", "dropout": 0.0,
        "weight_decay": 0.0,
    }


def test_start_enqueues_the_coordinator_task_by_name(client, auth, online_peers, csv_path, settings):
    from webapp.extensions import CELERY

    celery_app = client.application.extensions[CELERY]
    online_peers(2)
    response = start(client, auth, csv_path)
    assert response.status_code == 202
    session_id = response.json["session_id"]
    # Other tests' starts share the queue: take messages until ours (or the deadline).
    with celery_app.connection_for_read() as conn:
        queue = conn.SimpleQueue(settings.coordinator_queue)
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                message = queue.get(timeout=max(0.1, deadline - time.monotonic()))
                message.ack()
                if session_id in message.headers["argsrepr"]:
                    break
        finally:
            queue.close()
    assert message.headers["task"] == "peertrain.run_session"
    assert message.headers["argsrepr"] in (repr([session_id]), repr((session_id,)))


@pytest.mark.parametrize(
    ("form", "field"),
    [
        ({"num_peers": "0"}, "num_peers"),
        ({"num_peers": "two"}, "num_peers"),
        ({"hyperparameters": "{not json"}, "hyperparameters"),
        ({"hyperparameters": [{"epochs": 2}]}, "hyperparameters"),
        ({"hyperparameters": {"learning_rate": -1}}, "hyperparameters"),
        ({"hyperparameters": {"optimizer": "rmsprop"}}, "hyperparameters"),
        ({"hyperparameters": {"batch": 5}}, "hyperparameters"),
        ({"mode": "swarm"}, "mode"),
    ],
)
def test_bad_fields_are_400_and_claim_nothing(client, auth, online_peers, csv_path, form, field):
    online_peers(2)
    response = start(client, auth, csv_path, **form)
    assert response.status_code == 400, response.json
    assert field in response.json["errors"]
    assert Peer.objects(status=TRAINING).count() == 0
    assert TrainingSession.objects.count() == 0


def test_missing_file_is_400(client, auth, online_peers):
    online_peers(2)
    response = client.post("/sessions/start", headers=auth, data={"num_peers": "1"}, content_type="multipart/form-data")
    assert response.status_code == 400
    assert "file" in response.json["errors"]


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"", "empty"),
        (b"a,b,label\n1,2,x\n", "rows"),
        (b"a,b,label\n1,oops,0\n2,3,1\n", "oops"),
        (b"a,b\n1,2\n3,4\n", "label"),
    ],
)
def test_a_bad_dataset_is_400_with_the_readers_message(client, auth, online_peers, tmp_path, content, words):
    online_peers(2)
    path = tmp_path / "bad.csv"
    path.write_bytes(content)
    response = start(client, auth, path)
    assert response.status_code == 400, response.json
    assert words in response.json["message"]
    assert "file" in response.json["errors"]
    assert Peer.objects(status=TRAINING).count() == 0


def test_features_and_target_are_checked_against_the_file(client, auth, online_peers, csv_path):
    online_peers(2)
    response = start(client, auth, csv_path, target="kind")
    assert response.status_code == 400
    assert "kind" in response.json["message"] and "f0" in response.json["message"]
    response = start(client, auth, csv_path, features="f0,f9")
    assert response.status_code == 400
    assert "f9" in response.json["message"]
    response = start(client, auth, csv_path, features="f0,f2")
    assert response.status_code == 202
    assert TrainingSession.objects.get(id=response.json["session_id"]).features == ["f0", "f2"]


def test_not_enough_peers_is_400_saying_how_many_are_online(client, auth, online_peers, csv_path):
    online_peers(1)
    response = start(client, auth, csv_path, num_peers="3")
    assert response.status_code == 400
    assert "1 online" in response.json["message"]
    assert Peer.objects(status=TRAINING).count() == 0
    assert TrainingSession.objects.count() == 0


def test_silent_peers_are_not_claimed(client, auth, online_peers, csv_path):
    from datetime import timedelta

    from models import utcnow

    online_peers(2)
    Peer.objects(name="p1").update_one(set__last_seen=utcnow() - timedelta(minutes=5))
    refused = start(client, auth, csv_path, num_peers="2")
    # The count is of the peers a session could take: the silent one is not among them.
    assert refused.status_code == 400 and "1 online and free" in refused.json["message"]
    assert start(client, auth, csv_path, num_peers="1").json["assigned_peers"] == ["p0"]


def test_an_upload_over_the_cap_is_413(app, auth, online_peers, tmp_path):
    online_peers(2)
    app.config["MAX_CONTENT_LENGTH"] = 4096
    path = blobs_csv(tmp_path / "big.csv", rows=400)
    response = start(app.test_client(), auth, path)
    assert response.status_code == 413
    assert response.json["code"] == 413 and "larger" in response.json["message"]
    assert Peer.objects(status=TRAINING).count() == 0


def test_a_token_whose_user_is_gone_is_404(client, auth, online_peers, csv_path):
    online_peers(2)
    User.objects(username="ann").delete()
    response = start(client, auth, csv_path)
    assert response.status_code == 404
    assert "no longer exists" in response.json["message"]


def test_when_the_coordinator_cannot_be_reached_peers_are_released(app, auth, online_peers, csv_path):
    from celery import Celery

    from webapp.extensions import DISPATCHER, Dispatcher

    # A real broker connection to a port nothing listens on.
    unreachable = Celery("unreachable", broker="amqp://guest:guest@127.0.0.1:1//")
    unreachable.conf.broker_connection_retry = False
    unreachable.conf.broker_connection_timeout = 1
    unreachable.conf.task_publish_retry = False
    app.extensions[DISPATCHER] = Dispatcher(unreachable, "coordinator")
    online_peers(2)
    response = start(app.test_client(), auth, csv_path)
    assert response.status_code == 503
    assert "try again" in response.json["message"] and int(response.headers["Retry-After"]) > 0
    assert Peer.objects(status=TRAINING).count() == 0
    assert Peer.objects(status=ONLINE).count() == 2
    session = TrainingSession.objects.get()
    assert session.status == "FAILED" and "coordinator" in session.reason


def test_concurrent_starts_never_share_a_peer(app, signup, online_peers, csv_path):
    online_peers(5)
    headers = [signup(f"user{i}") for i in range(8)]
    results: list = [None] * len(headers)

    def run(i: int) -> None:
        results[i] = start(app.test_client(), headers[i], csv_path, num_peers="2")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(headers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    codes = sorted(r.status_code for r in results)
    assert codes == [202, 202] + [400] * 6
    claimed = [name for r in results if r.status_code == 202 for name in r.json["assigned_peers"]]
    assert len(claimed) == len(set(claimed)) == 4
    assert {p.name for p in Peer.objects(status=TRAINING)} == set(claimed)
    assert Peer.objects(status=ONLINE).count() == 1
    for r in results:
        if r.status_code == 202:
            owner = TrainingSession.objects.get(id=r.json["session_id"])
            assert {p.session_id for p in Peer.objects(name__in=r.json["assigned_peers"])} == {owner.id}


def test_sessions_list_newest_first_and_training_status_is_the_latest(client, auth, online_peers, csv_path):
    online_peers(4)
    assert client.get("/sessions/training-status", headers=auth).status_code == 404
    first = start(client, auth, csv_path, num_peers="1").json["session_id"]
    second = start(client, auth, csv_path, num_peers="1").json["session_id"]
    listing = client.get("/sessions", headers=auth).json
    assert [s["id"] for s in listing["items"]] == [second, first]
    assert listing["total"] == 2
    status = client.get("/sessions/training-status", headers=auth).json
    assert status == {"session_id": second, "status": "PENDING", "reason": None}


def test_another_users_session_is_404_on_every_route(client, signup, online_peers, csv_path):
    online_peers(2)
    ann, bob = signup("ann"), signup("bob")
    session_id = start(client, ann, csv_path, num_peers="1").json["session_id"]
    for suffix in ("", "/heartbeats", "/rounds", "/updates", "/model"):
        assert client.get(f"/sessions/{session_id}{suffix}", headers=bob).status_code == 404, suffix
        assert client.get(f"/sessions/{session_id}{suffix}", headers=ann).status_code in (200, 409), suffix
    assert client.post(f"/sessions/{session_id}/cancel", headers=bob).status_code == 404
    assert client.get("/sessions", headers=bob).json["items"] == []
    assert client.get("/sessions/training-status", headers=bob).status_code == 404
    assert client.get("/sessions/not-an-id", headers=ann).status_code == 404


def test_heartbeats_are_paged_and_filtered(client, auth, online_peers, csv_path):
    online_peers(2)
    body = start(client, auth, csv_path).json
    session = TrainingSession.objects.get(id=body["session_id"])
    a, b = body["assigned_peers"]
    insert_many(
        {"session_id": session.id, "peer": peer, "round": 0, "epoch": epoch, "epochs": 5, "loss": 1 / epoch}
        for peer in (a, b)
        for epoch in range(1, 6)
    )
    url = f"/sessions/{body['session_id']}/heartbeats"
    page = client.get(url, query_string={"page_size": 4}, headers=auth).json
    assert page["total"] == 10 and len(page["items"]) == 4
    first, second = sorted((a, b))
    assert [(h["epoch"], h["peer"]) for h in page["items"]] == [(1, first), (1, second), (2, first), (2, second)]
    last = client.get(url, query_string={"page_size": 4, "page": 3}, headers=auth).json
    assert len(last["items"]) == 2
    only_a = client.get(url, query_string={"peer": a}, headers=auth).json
    assert only_a["total"] == 5 and {h["peer"] for h in only_a["items"]} == {a}
    assert [h["epoch"] for h in only_a["items"]] == [1, 2, 3, 4, 5]
    assert client.get(url, query_string={"page": 0}, headers=auth).status_code == 400
    assert Heartbeat.objects.count() == 10


def test_model_is_409_until_there_is_one(client, auth, online_peers, csv_path):
    online_peers(1)
    session_id = start(client, auth, csv_path, num_peers="1").json["session_id"]
    response = client.get(f"/sessions/{session_id}/model", headers=auth)
    assert response.status_code == 409
    assert "no model" in response.json["message"]


@pytest.mark.parametrize(
    ("form", "field", "words"),
    [
        ({"mode": "federated", "task": "regression", "partition": "label_skew"}, "partition", "class labels"),
        ({"mode": "federated", "min_peers": "3"}, "min_peers", "num_peers"),
        ({"mode": "federated", "hyperparameters": [{"hidden": [32]}, {"hidden": [64]}]}, "hyperparameters",
         "same hidden"),
        ({"mode": "federated", "aggregation": "mean"}, "aggregation", "Must be one of"),
        ({"mode": "federated", "rounds": "0"}, "rounds", "greater than or equal to 1"),
        ({"schedule": "async"}, "schedule", "mode=federated"),
        ({"mode": "federated", "schedule": "async", "buffer_size": "3"}, "buffer_size", "num_peers"),
        ({"mode": "federated", "schedule": "async", "max_updates": "1"}, "max_updates", "at least num_peers"),
        ({"mode": "federated", "buffer_size": "1"}, "buffer_size", "schedule=async"),
        ({"mode": "federated", "schedule": "sometimes"}, "schedule", "Must be one of"),
    ],
)
def test_bad_federated_settings_are_400(client, auth, online_peers, csv_path, form, field, words):
    online_peers(2)
    response = start(client, auth, csv_path, **form)
    assert response.status_code == 400, response.json
    assert field in response.json["errors"]
    assert words in response.json["message"]
    assert Peer.objects(status=TRAINING).count() == 0


def test_a_federated_start_records_its_settings(client, auth, online_peers, csv_path):
    online_peers(2)
    response = start(client, auth, csv_path, mode="federated", rounds="4", local_epochs="3",
                     partition="label_skew", alpha="0.3", aggregation="median")
    assert response.status_code == 202, response.json
    detail = client.get(f"/sessions/{response.json['session_id']}", headers=auth).json
    assert detail["mode"] == "federated"
    assert detail["federated"] == {"rounds": 4, "local_epochs": 3, "partition": "label_skew", "alpha": 0.3,
                                   "aggregation": "median", "schedule": "sync", "algorithm": "scaffold"}
    assert detail["min_peers"] is None  # every peer must finish each round
    assert [p["epochs"] for p in detail["peers"]] == [12, 12]


def test_an_asynchronous_start_records_its_budget_with_defaults_of_equal_peer_epochs(client, auth, online_peers,
                                                                                   csv_path):
    online_peers(2)
    response = start(client, auth, csv_path, mode="federated", schedule="async", rounds="4", time_budget="60")
    assert response.status_code == 202, response.json
    detail = client.get(f"/sessions/{response.json['session_id']}", headers=auth).json
    assert detail["federated"]["schedule"] == "async"
    assert (detail["federated"]["buffer_size"], detail["federated"]["max_updates"]) == (1, 8)
    assert detail["federated"]["time_budget"] == 60
    assert client.get(f"/sessions/{response.json['session_id']}/updates", headers=auth).json == {"items": []}


def test_too_few_rows_for_one_shard_per_peer_is_400(client, auth, online_peers, tmp_path):
    online_peers(6)
    path = blobs_csv(tmp_path / "tiny.csv", rows=6, classes=2)
    response = start(client, auth, path, mode="federated", num_peers="6")
    assert response.status_code == 400, response.json
    assert "shards" in response.json["message"]
    assert Peer.objects(status=TRAINING).count() == 0


def test_polled_routes_answer_conditional_gets(client, auth, online_peers, csv_path):
    online_peers(2)
    session_id = start(client, auth, csv_path, num_peers="1").json["session_id"]
    for path in (f"/sessions/{session_id}", "/sessions/training-status", "/sessions", "/peers",
                 f"/sessions/{session_id}/heartbeats", f"/sessions/{session_id}/rounds"):
        first = client.get(path, headers=auth)
        assert first.status_code == 200 and first.headers["ETag"], path
        again = client.get(path, headers={**auth, "If-None-Match": first.headers["ETag"]})
        assert again.status_code == 304 and again.data == b"", path
        assert again.headers["ETag"] == first.headers["ETag"]
        stale = client.get(path, headers={**auth, "If-None-Match": '"something-else"'})
        assert stale.status_code == 200 and stale.json == first.json, path
    # A change shows: the old tag no longer matches.
    tag = client.get(f"/sessions/{session_id}", headers=auth).headers["ETag"]
    from models import session as sessions

    sessions.record_progress(ObjectId(session_id), Peer.objects(status=TRAINING).first().name, {"epoch": 1})
    changed = client.get(f"/sessions/{session_id}", headers={**auth, "If-None-Match": tag})
    assert changed.status_code == 200 and changed.headers["ETag"] != tag
    # Another user's tag for the same path is no key to this one's data.
    bob = client.get(f"/sessions/{session_id}", headers={**signup_other(client), "If-None-Match": tag})
    assert bob.status_code == 404


def signup_other(client) -> dict[str, str]:
    client.post("/auth/signup", json={"username": "bob", "email": "bob@example.com", "password": "correct horse"})
    token = client.post("/auth/signin", json={"email": "bob@example.com", "password": "correct horse"}).json
    return {"Authorization": f"Bearer {token['access_token']}"}


def test_peers_counts_reachable_and_free_apart(client, auth, online_peers, csv_path):
    online_peers(3)
    start(client, auth, csv_path, num_peers="1")  # one is TRAINING now
    Peer.objects(status=ONLINE).first().update(set__status="OFFLINE")
    body = client.get("/peers", headers=auth).json
    assert (body["online"], body["free"], body["total"]) == (2, 1, 3)


@pytest.mark.parametrize(
    ("form", "field", "words"),
    [
        ({"features": "[abc"}, "features", "not valid JSON"),
        ({"features": "[" * 100_000}, "features", "nested too deeply"),
        ({"hyperparameters": "[" * 100_000}, "hyperparameters", "nested too deeply"),
    ],
)
def test_json_text_that_cannot_be_decoded_is_400_naming_the_field(client, auth, online_peers, csv_path, form, field,
                                                                  words):
    online_peers(2)
    response = start(client, auth, csv_path, **form)
    assert response.status_code == 400, response.json
    assert list(response.json["errors"]) == [field]
    assert words in response.json["message"]
    assert Peer.objects(status=TRAINING).count() == 0


def test_a_file_sent_as_a_plain_field_is_400_showing_the_at_sign(client, auth, online_peers):
    # curl -F file=samples/wine.csv (without the @) sends the path as text, not the file.
    online_peers(2)
    response = client.post("/sessions/start", headers=auth, data={"num_peers": "1", "file": "samples/wine.csv"},
                           content_type="multipart/form-data")
    assert response.status_code == 400, response.json
    assert list(response.json["errors"]) == ["file"]
    assert "-F file=@samples/wine.csv" in response.json["message"]


def test_an_unknown_hyperparameter_lists_the_valid_keys(client, auth, online_peers, csv_path):
    online_peers(2)
    response = start(client, auth, csv_path, hyperparameters={"lr": 0.1})
    assert response.status_code == 400, response.json
    message = response.json["message"]
    assert "lr" in message
    for key in ("batch_size", "epochs", "learning_rate", "hidden", "optimizer", "dropout"):
        assert key in message


def test_a_bug_while_starting_is_a_logged_500_not_a_503(app, auth, online_peers, csv_path, caplog):
    from webapp.extensions import DISPATCHER, Dispatcher

    class Broken(Dispatcher):
        def run_session(self, session_id: str) -> None:
            raise KeyError("a bug, not an outage")

    app.extensions[DISPATCHER] = Broken(None, "coordinator")
    online_peers(2)
    response = start(app.test_client(), auth, csv_path)
    assert response.status_code == 500
    assert response.json["message"] == "internal error; it has been logged"
    assert "a bug, not an outage" not in response.get_data(as_text=True)
    assert "Traceback" in caplog.text and "a bug, not an outage" in caplog.text
    assert Peer.objects(status=TRAINING).count() == 0
    assert TrainingSession.objects.get().status == "FAILED"


@pytest.fixture
def storage_goes_down(app):
    """Make object storage stop answering: a real S3 client aimed at a port nothing listens on."""
    import boto3
    from botocore.config import Config

    from tasks.storage import S3Storage
    from webapp.extensions import STORAGE

    def down() -> None:
        client = boto3.client("s3", endpoint_url="http://127.0.0.1:1", region_name="us-east-1",
                              aws_access_key_id="x", aws_secret_access_key="x",
                              config=Config(retries={"max_attempts": 1}, connect_timeout=1))
        app.extensions[STORAGE] = S3Storage("peertrain", client=client)

    return down


def test_storage_not_answering_a_start_is_503_and_keeps_nothing(app, auth, online_peers, csv_path,
                                                               storage_goes_down):
    online_peers(2)
    storage_goes_down()
    response = start(app.test_client(), auth, csv_path)
    assert response.status_code == 503, response.json
    assert "try again" in response.json["message"] and "127.0.0.1" not in response.json["message"]
    assert int(response.headers["Retry-After"]) > 0
    assert Peer.objects(status=ONLINE).count() == 2
    assert TrainingSession.objects.count() == 0


def test_storage_not_answering_a_download_is_503(app, client, auth, online_peers, csv_path, storage_goes_down):
    online_peers(1)
    session_id = start(client, auth, csv_path, num_peers="1").json["session_id"]
    TrainingSession.objects(id=session_id).update_one(set__status="COMPLETED",
                                                      set__model_url="s3://peertrain/model.safetensors")
    storage_goes_down()
    response = client.get(f"/sessions/{session_id}/model", headers=auth)
    assert response.status_code == 503
    assert response.json["message"] == "a service the API needs did not answer; try again shortly"
    assert int(response.headers["Retry-After"]) > 0


def test_resume_goes_on_with_an_interrupted_session_on_its_own_peers(client, auth, online_peers, csv_path):
    from models import event as events
    from models import session as sessions
    from webapp.stream import Cursor

    online_peers(3)
    started = start(client, auth, csv_path)
    session_id = started.json["session_id"]
    mine = started.json["assigned_peers"]
    assert client.post(f"/sessions/{session_id}/resume", headers=auth).status_code == 409  # it is not interrupted

    # The platform stops under it: its peers are released, its log ends.
    events.append(session_id, [events.heartbeat({"peer": mine[0], "round": 0, "epoch": 1, "loss": 0.5})])
    Peer.objects(session_id=ObjectId(session_id)).update(set__status=ONLINE, unset__session_id=True)
    assert sessions.finish(ObjectId(session_id), sessions.INTERRUPTED, "make run was stopped")
    interrupted_end = events.last_seq(ObjectId(session_id))

    # One of its peers is busy elsewhere: refused, nothing taken.
    Peer.objects(name=mine[1]).update_one(set__status=TRAINING, set__session_id=ObjectId())
    refused = client.post(f"/sessions/{session_id}/resume", headers=auth)
    assert refused.status_code == 409 and f"{mine[1]} is TRAINING" in refused.json["message"], refused.json
    assert Peer.objects(name=mine[0]).first().status == ONLINE
    assert client.get(f"/sessions/{session_id}", headers=auth).json["status"] == "INTERRUPTED"

    Peer.objects(name=mine[1]).update_one(set__status=ONLINE, unset__session_id=True)
    resumed = client.post(f"/sessions/{session_id}/resume", headers=auth)
    assert resumed.status_code == 202 and resumed.json["status"] == "PENDING", resumed.json
    detail = client.get(f"/sessions/{session_id}", headers=auth).json
    assert detail["status"] == "PENDING" and detail["resumes"] == 1 and detail["reason"] is None
    assert {p.name for p in Peer.objects(status=TRAINING, session_id=ObjectId(session_id))} == set(mine)
    assert client.post(f"/sessions/{session_id}/resume", headers=auth).status_code == 409  # once
    other = client.post(f"/sessions/{session_id}/resume", headers=auth_of(client, "bob"))
    assert other.status_code == 404  # another user's session does not exist for them

    # Its stream read from the start passes the interruption's end by and goes on to the real one.
    events.append(session_id, [events.status("RUNNING"),
                               events.heartbeat({"peer": mine[0], "round": 0, "epoch": 1, "loss": 0.5}),
                               events.heartbeat({"peer": mine[0], "round": 0, "epoch": 2, "loss": 0.4})])
    assert sessions.finish(ObjectId(session_id), sessions.COMPLETED)
    replay = Cursor(ObjectId(session_id)).start()
    kinds = [(e["kind"], e["data"].get("status") or e["data"].get("epoch")) for e in replay]
    assert kinds.count(("end", "COMPLETED")) == 1 and kinds[-1] == ("end", "COMPLETED")
    assert ("end", "INTERRUPTED") not in kinds and ("status", "INTERRUPTED") in kinds
    assert kinds.count(("status", "PENDING")) == 2 and kinds.count(("status", "RUNNING")) == 1  # created, resumed
    assert [k for k in kinds if k[0] == "heartbeat"] == [("heartbeat", 1), ("heartbeat", 1), ("heartbeat", 2)]
    # A client that had the interruption's end goes on from there.
    after = Cursor(ObjectId(session_id), interrupted_end).start()
    assert after[0]["data"]["reason"] == "resumed" and after[-1]["data"]["status"] == "COMPLETED"


def auth_of(client, username: str) -> dict[str, str]:
    client.post("/auth/signup", json={"username": username, "email": f"{username}@example.com",
                                      "password": "correct horse"})
    token = client.post("/auth/signin", json={"email": f"{username}@example.com", "password": "correct horse"})
    return {"Authorization": f"Bearer {token.json['access_token']}"}


def test_a_session_is_named_by_the_beginning_of_its_id_when_only_it_begins_so(client, auth, online_peers, csv_path):
    online_peers(4)
    first = start(client, auth, csv_path).json["session_id"]
    second = start(client, auth, csv_path).json["session_id"]
    common = next(i for i, (a, b) in enumerate(zip(first, second, strict=True)) if a != b)
    assert common >= 8  # started within a second by one process: ids share their time and process parts

    for session_id in (first, second):
        prefix = session_id[:common + 1]
        shown = client.get(f"/sessions/{prefix}", headers=auth)
        assert shown.status_code == 200 and shown.json["id"] == session_id, shown.json
        assert client.get(f"/sessions/{prefix.upper()}/heartbeats", headers=auth).status_code == 200
    both = client.get(f"/sessions/{first[:8]}", headers=auth)
    assert both.status_code == 400, both.json
    assert both.json["message"] == f"more than one of your sessions begins with {first[:8]}: give more of its id"
    assert client.get(f"/sessions/{first[:5]}", headers=auth).status_code == 404  # under 6 characters: no route
    bob = auth_of(client, "bob")
    assert client.get(f"/sessions/{first[:common + 1]}", headers=bob).status_code == 404  # nobody else's
    cancelled = client.post(f"/sessions/{first[:common + 1]}/cancel", headers=auth)
    assert cancelled.status_code == 202 and cancelled.json["session_id"] == first


# --- sweeps that search -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("form", "field", "words"),
    [
        ({"search": {"learning_rate": {"low": 0.1, "high": 0.01}}}, "search", "must be below high"),
        ({"search": {"momentum": [0.9, 0.99]}}, "search", "not a setting a search can vary"),
        ({"search": {"epochs": 5}}, "search", "varies nothing"),
        ({"search": "[1, 2]"}, "search", "JSON object"),
        ({"search": {"batch_size": [16, 32]}, "trials": "1"}, "trials", "at least num_peers (2)"),
        ({"search": {"batch_size": [16, 32]}, "hyperparameters": [{}, {}]}, "search", "not both"),
        ({"search": {"batch_size": [16, 32]}, "mode": "federated"}, "search", "mode=sweep"),
        ({"search": {"batch_size": [16, 32]}, "sampler": "grid"}, "sampler", "Must be one of"),
        ({"search": {"batch_size": [16, 32]}, "pruner": "hyperband"}, "pruner", "Must be one of"),
        ({"hyperparameters": {"epochs": 3}, "trials": "4"}, "trials", "only for sweeps that search"),
        ({"hyperparameters": {"epochs": 3}, "time_budget": "60"}, "time_budget", "only for sweeps that search"),
        ({"mode": "federated", "pruner": "asha"}, "pruner", "only for sweeps that search"),
    ],
)
def test_bad_search_settings_are_400_and_claim_nothing(client, auth, online_peers, csv_path, form, field, words):
    online_peers(2)
    response = start(client, auth, csv_path, **form)
    assert response.status_code == 400, response.json
    assert field in response.json["errors"]
    assert words in response.json["message"]
    assert Peer.objects(status=TRAINING).count() == 0 and TrainingSession.objects.count() == 0


def test_a_search_start_records_its_space_and_budget_with_an_object_of_settings_held_fixed(client, auth,
                                                                                         online_peers, csv_path):
    online_peers(2)
    response = start(client, auth, csv_path, search={"learning_rate": {"low": 1e-4, "high": 1e-2, "log": True}},
                     hyperparameters={"epochs": 4, "hidden": [32]}, pruner="median", time_budget="120")
    assert response.status_code == 202, response.json
    detail = client.get(f"/sessions/{response.json['session_id']}", headers=auth).json
    search = detail["search"]
    assert (search["trials"], search["sampler"], search["pruner"], search["time_budget"]) == (8, "tpe", "median", 120)
    assert search["space"]["learning_rate"] == {"low": 1e-4, "high": 1e-2, "log": True, "int": False}
    assert search["space"]["epochs"] == {"value": 4} and search["space"]["hidden"] == {"value": [32]}
    assert [p["epochs"] for p in detail["peers"]] == [4, 4]


def test_a_sweep_given_no_settings_searches_and_one_given_them_does_not(client, auth, online_peers, csv_path):
    online_peers(4)
    searching = start(client, auth, csv_path)
    assert searching.status_code == 202, searching.json
    detail = client.get(f"/sessions/{searching.json['session_id']}", headers=auth).json
    assert detail["search"]["trials"] == 8
    assert {"choices"} <= set(detail["search"]["space"]["batch_size"])
    fixed = start(client, auth, csv_path, hyperparameters={"epochs": 3})
    assert client.get(f"/sessions/{fixed.json['session_id']}", headers=auth).json["search"] is None


def test_trials_are_listed_by_number_with_the_best_by_score_then_held_out_loss(client, auth, online_peers, csv_path):
    from models import trial as trials

    online_peers(2)
    session_id = start(client, auth, csv_path, search={"batch_size": [16, 32]}).json["session_id"]
    for number, value, loss in [(0, 0.9, 0.30), (1, 0.95, 0.40), (2, 0.95, 0.20), (3, None, None)]:
        assert trials.create(ObjectId(session_id), number, "p", {"batch_size": 16}, {"batch_size": 16}, 10, 1,
                             number, f"t{number}")
        if value is not None:
            trials.Trial.objects(session_id=session_id, number=number).update_one(
                set__value=value, set__val_loss=loss, set__status=trials.COMPLETED, set__epochs_done=10)
    listed = client.get(f"/sessions/{session_id[:8]}/trials", headers=auth).json
    assert [t["number"] for t in listed["items"]] == [0, 1, 2, 3]
    assert [t["status"] for t in listed["items"]] == ["COMPLETED"] * 3 + ["WAITING"]
    assert listed["best"]["number"] == 2  # tied on accuracy: the lower held-out loss wins
    assert (listed["metric"], listed["tie_breaker"]) == ("val_accuracy", "val_loss")
    assert client.get(f"/sessions/{ObjectId()}/trials", headers=auth).status_code == 404


@pytest.mark.parametrize(
    ("form", "field", "words"),
    [
        ({"algorithm": "fedadam"}, "algorithm", "only for federated sessions"),
        ({"mode": "federated", "algorithm": "scaffolding"}, "algorithm", "Must be one of"),
        ({"mode": "federated", "mu": "0.1"}, "mu", "only with algorithm=fedprox"),
        ({"mode": "federated", "algorithm": "fedprox", "server_lr": "0.1"}, "server_lr",
         "only with a server optimizer"),
        ({"mode": "federated", "algorithm": "fedprox", "mu": "0"}, "mu", "greater than 0"),
    ],
)
def test_bad_federated_algorithms_are_400(client, auth, online_peers, csv_path, form, field, words):
    online_peers(2)
    response = start(client, auth, csv_path, **form)
    assert response.status_code == 400, response.json
    assert field in response.json["errors"] and words in response.json["message"]
    assert Peer.objects(status=TRAINING).count() == 0


def test_a_federated_start_records_its_algorithm_with_its_defaults(client, auth, online_peers, csv_path):
    online_peers(6)
    prox = start(client, auth, csv_path, mode="federated", algorithm="fedprox")
    adam = start(client, auth, csv_path, mode="federated", algorithm="fedadam", server_lr="0.05")
    plain = start(client, auth, csv_path, mode="federated")
    settings = [client.get(f"/sessions/{r.json['session_id']}", headers=auth).json["federated"]
                for r in (prox, adam, plain)]
    assert (settings[0]["algorithm"], settings[0]["mu"]) == ("fedprox", 0.01)
    assert (settings[1]["algorithm"], settings[1]["server_lr"]) == ("fedadam", 0.05)
    assert settings[2]["algorithm"] == "fedavg"


def test_label_skewed_shards_get_scaffold_unless_the_user_picks(client, auth, online_peers, csv_path):
    online_peers(4)
    skewed = start(client, auth, csv_path, mode="federated", partition="label_skew", alpha="0.1")
    chosen = start(client, auth, csv_path, mode="federated", partition="label_skew", algorithm="fedavg")
    settings = [client.get(f"/sessions/{r.json['session_id']}", headers=auth).json["federated"]
                for r in (skewed, chosen)]
    assert [s["algorithm"] for s in settings] == ["scaffold", "fedavg"]
