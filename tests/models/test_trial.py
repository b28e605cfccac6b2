"""A search's trials: numbered once, each stretch recorded once, ended once, ranked by score then held-out loss."""

from __future__ import annotations

from datetime import datetime

from bson import ObjectId

from models import session as sessions
from models import trial as trials

AT = datetime(2026, 12, 7)


def make(session, number, seq, peer="a"):
    return trials.create(session, number, peer, {"batch_size": 32}, {"batch_size": 32, "epochs": 9}, 9, 1, seq,
                         f"t{seq}")


def test_a_trial_number_is_taken_once_and_each_stretch_recorded_once(db):
    session = ObjectId()
    assert make(session, 0, 0)
    assert not make(session, 0, 5, peer="b")  # a step run again: the first record stands
    assert trials.of_session(session)[0]["peer"] == "a" and trials.unsent(session)[0]["seq"] == 0
    trials.mark_sent(session, 0)
    assert trials.open_of(session, "a")["status"] == trials.RUNNING and trials.unsent(session) == []
    score = {"epoch": 1, "value": 0.8, "val_loss": 0.5}
    best = {"value": 0.8, "val_loss": 0.5, "best_epoch": 1, "model_url": "m"}
    after = trials.scored(session, 0, 0, 1, score, [{"epoch": 1}], 0.2, best)
    assert after["epochs_done"] == 1 and after["value"] == 0.8 and after["seconds"] == 0.2
    assert trials.scored(session, 0, 0, 1, score, [{"epoch": 1}], 0.2, best) is None  # delivered twice
    assert trials.next_task(session, 0, 0, 1, "t1", 3, {"rung": 0})
    assert not trials.next_task(session, 0, 0, 2, "t2", 3, {})  # its task moved on already
    trial = trials.of_task(session, 1)
    assert (trial["until"], trial["tasks"], trial["sent"], len(trial["scores"])) == (3, 2, False, 1)
    assert trials.end(session, 0, trials.PRUNED, AT, "pruned", seq=1)
    assert not trials.end(session, 0, trials.COMPLETED, AT, seq=1)  # ended once
    assert trials.count_open(session) == 0


def test_the_best_trial_is_the_highest_score_then_the_lower_held_out_loss_then_fewer_epochs(db):
    session = ObjectId()
    for number, value, loss, epoch in [(0, 0.9, 0.3, 9), (1, 0.95, 0.4, 9), (2, 0.95, 0.2, 27), (3, 0.95, 0.2, 9)]:
        make(session, number, number)
        trials.Trial.objects(session_id=session, number=number).update_one(
            set__value=value, set__val_loss=loss, set__best_epoch=epoch)
    make(session, 4, 4)  # not scored yet: never the best
    assert trials.best(session)["number"] == 3
    assert trials.best(ObjectId()) is None


def test_a_search_takes_trial_numbers_while_its_budget_of_trials_and_time_lasts(db):
    from datetime import timedelta

    from models import Dataset, TrainingSession

    search = sessions.SearchState(space={}, trials=2, stop_at=AT + timedelta(seconds=60))
    session = TrainingSession(owner_id=ObjectId(), target="label", status=sessions.RUNNING, search=search,
                              dataset=Dataset(filename="d.csv", url="u", bytes=1, sha256="0" * 64, rows=1,
                                              columns=2)).save()
    assert [sessions.take_trial(session.id, AT) for _ in range(3)] == [0, 1, None]
    assert [sessions.take_task_number(session.id) for _ in range(2)] == [0, 1]
    session.update(set__search__trials=5)
    assert sessions.take_trial(session.id, AT + timedelta(seconds=61)) is None  # past its time budget
