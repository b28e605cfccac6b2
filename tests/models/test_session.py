"""Session lifecycle: transitions happen once, in order."""

from __future__ import annotations

import pytest
from bson import ObjectId
from mongoengine import ValidationError

from models import Dataset, PeerRun, TrainingSession
from models import session as sessions


def make_session(peers=("a", "b")) -> TrainingSession:
    return TrainingSession(
        owner_id=ObjectId(),
        target="label",
        features=["x"],
        dataset=Dataset(filename="d.csv", url="file:///tmp/d.csv", bytes=10, sha256="0" * 64, rows=5, columns=2),
        peers=[PeerRun(name=p, hyperparameters={"epochs": 2}, epochs=2) for p in peers],
    ).save()


def test_a_session_runs_then_ends_once(db):
    session = make_session()
    launch = {"round": 0, "group": "g", "body": "b", "peers": ["a", "b"]}
    assert sessions.start_running(session.id, {"a": "task-a", "b": "task-b"}, launch, deadline_seconds=60)
    assert not sessions.start_running(session.id, {"a": "x", "b": "y"}, launch, deadline_seconds=60)
    session.reload()
    assert session.status == "RUNNING" and [p.task_id for p in session.peers] == ["task-a", "task-b"]
    assert sessions.by_task_id("task-b").id == session.id and session.launch == launch
    assert sessions.run_of_task(session, "task-b").name == "b" and sessions.run_of_task(session, "x") is None
    assert sessions.finish(session.id, "FAILED", reason="peer b failed")
    assert not sessions.finish(session.id, "COMPLETED")
    session.reload()
    assert session.status == "FAILED" and session.reason == "peer b failed" and session.finished_at


def test_progress_and_results_land_on_the_right_peer(db):
    session = make_session()
    sessions.record_progress(session.id, "b", {"epoch": 1, "loss": 0.5})
    sessions.record_peer_result(session.id, "a", "COMPLETED", final={"val_accuracy": 0.9})
    session.reload()
    assert (session.peer("b").epoch, session.peer("b").loss) == (1, 0.5)
    assert session.peer("a").final == {"val_accuracy": 0.9} and session.peer("a").status == "COMPLETED"
    assert session.peer("a").epoch == 0


def test_a_peer_cannot_appear_twice(db):
    with pytest.raises(ValidationError):
        make_session(peers=("a", "a"))


def test_owned_lookup_hides_other_users_sessions(db):
    session = make_session()
    assert sessions.get_owned(str(session.id), session.owner_id).id == session.id
    assert sessions.get_owned(str(session.id), ObjectId()) is None
    assert sessions.get_owned("nonsense", session.owner_id) is None
