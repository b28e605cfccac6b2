"""Session lifecycle: transitions happen once, in order."""

from __future__ import annotations

import pytest
from bson import ObjectId
from mongoengine import ValidationError

from models import Dataset, PeerRun, TrainingSession, utcnow
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
    launch = sessions.Launch(round=0, group="g", body="b", peers=["a", "b"])
    position = sessions.positions(session)
    now = utcnow()
    assert sessions.start_running(session.id, {"a": "task-a", "b": "task-b"}, launch, 60, position, now)
    assert not sessions.start_running(session.id, {"a": "x", "b": "y"}, launch, 60, position, now)
    session.reload()
    assert session.status == "RUNNING" and [p.task_id for p in session.peers] == ["task-a", "task-b"]
    assert session.launch.group == "g" and not session.launch.sent
    sessions.launched(session.id, 0)
    assert TrainingSession.objects.get(id=session.id).launch.sent
    assert sessions.finish(session.id, "FAILED", reason="peer b failed")
    assert not sessions.finish(session.id, "COMPLETED")
    session.reload()
    assert session.status == "FAILED" and session.reason == "peer b failed" and session.finished_at


def test_ending_a_session_ends_its_active_runs_with_it_and_spares_one_that_ended_meanwhile(db, monkeypatch):
    session = make_session(peers=("a", "b", "c"))
    position = sessions.positions(session)
    sessions.record_runs(session.id, position, {"a": {"status": "RUNNING"}, "c": {"status": "FAILED"}})
    from mongoengine.queryset import QuerySet

    update_one, interleaved = QuerySet.update_one, []

    def b_completes_first(queryset, *args, **kwargs):  # b's result lands between finish's read and its update
        if not interleaved:
            interleaved.append(True)
            sessions.record_peer_result(session.id, "b", "COMPLETED")
        return update_one(queryset, *args, **kwargs)

    monkeypatch.setattr(QuerySet, "update_one", b_completes_first)
    assert sessions.finish(session.id, "INTERRUPTED", "stopped", runs_to="INTERRUPTED")
    session.reload()
    assert session.status == "INTERRUPTED"
    assert {run.name: run.status for run in session.peers} == {"a": "INTERRUPTED", "b": "COMPLETED", "c": "FAILED"}
    assert not sessions.finish(session.id, "CANCELLED", runs_to="CANCELLED")


def test_a_round_is_launched_once_and_recorded_once(db):
    session = make_session()
    position = sessions.positions(session)
    first = sessions.Launch(round=0, peers=["a", "b"])
    assert sessions.start_running(session.id, {"a": "0a", "b": "0b"}, first, 60, position, utcnow())
    second = sessions.Launch(round=1, peers=["a", "b"])
    assert sessions.next_round(session.id, {"a": "1a", "b": "1b"}, second, position)
    assert not sessions.next_round(session.id, {"a": "x", "b": "y"}, second, position)  # a redelivered launch
    assert [p.round for p in TrainingSession.objects.get(id=session.id).peers] == [1, 1]
    done = sessions.Round(round=1, metrics={"val_accuracy": 0.5})
    assert sessions.record_round(session.id, done, "file:///g1", sessions.History(norms=[1.0], gains=[-0.1]))
    assert not sessions.record_round(session.id, done, "file:///g1", sessions.History())
    session.reload()
    assert [r.round for r in session.rounds] == [1] and session.plan.global_url == "file:///g1"
    assert session.history.norms == [1.0]


def test_an_asynchronous_budget_is_taken_once_per_task_and_folds_take_turns(db):
    from datetime import timedelta

    session = make_session()
    now = utcnow()
    state = sessions.AsyncState(version=0, sent=2, remaining=1)
    session.plan = sessions.Plan(global_url="file:///v0")
    session.save()
    assert sessions.start_running(session.id, {"a": "t0", "b": "t1"}, sessions.Launch(round=0), 60,
                                  sessions.positions(session), now, state=state, rounds={"a": 0, "b": 1})
    assert [p.round for p in TrainingSession.objects.get(id=session.id).peers] == [0, 1]
    assert sessions.take_task(session.id, "a", now, 3) == (2, 0, "file:///v0")
    assert sessions.take_task(session.id, "b", now, 3) is None  # the budget is spent
    sessions.give_back(session.id, 1)
    assert sessions.take_task(session.id, "b", now, 3) == (3, 0, "file:///v0")
    lease = timedelta(seconds=30)
    assert sessions.take_fold_lease(session.id, now, lease) and not sessions.take_fold_lease(session.id, now, lease)
    assert sessions.take_fold_lease(session.id, now + 2 * lease, lease)  # its holder died: it expired
    sessions.drop_fold_lease(session.id)
    assert not sessions.fold_leased(session.id)
    assert sessions.record_fold(session.id, 0, sessions.Round(round=0), "file:///v1", sessions.History())
    assert not sessions.record_fold(session.id, 0, sessions.Round(round=0), "file:///v1", sessions.History())


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
