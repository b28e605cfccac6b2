"""The search strategy as a unit: trials asked, scored at rungs, pruned, failed, resumed, each step once."""

from __future__ import annotations

import json

import pytest

from models import peer as peers
from models import session as sessions
from models import trial as trials
from tasks.search import Search, trial_key
from tests.tasks.conftest import Crash
from tests.tasks.test_coordinator import crash_once, interrupt_and_resume, run_session
from trainer import search as space_

SPACE = space_.parse({"learning_rate": {"low": 1e-3, "high": 1e-1, "log": True}, "batch_size": [16, 32],
                      "hidden": [[8], [16]], "epochs": 9})


def search(kit, peers_=2, **options):
    return kit.session(peers_=peers_, search={"space": SPACE, "trials": 6, **options})


def stretches(kit, session):
    """The `train` tasks waiting on each peer's queue: (trial seed, from epoch, until) each."""
    return {name: [(m["args"][0]["seed"], m["args"][0]["until"]) for m in found]
            for name, found in kit.trains(session).items()}


def test_a_search_runs_its_trials_on_free_peers_and_the_best_trial_is_the_sessions_result(kit):
    session = search(kit)
    run_session(kit, session)
    done = kit.run_to_end(session)
    assert done.status == sessions.COMPLETED, done.reason
    found = trials.of_session(session.id)
    assert [t["number"] for t in found] == list(range(6))
    assert len({json.dumps(t["params"], sort_keys=True) for t in found}) == 6  # never the same configuration twice
    assert {t["status"] for t in found} <= {trials.COMPLETED, trials.PRUNED}
    assert {t["peer"] for t in found} == {run.name for run in session.peers}
    for t in found:
        assert [s["epoch"] for s in t["scores"]] == [r for r in (1, 3, 9) if r <= t["epochs_done"]]
        assert t["tasks"] == len(t["scores"])  # a task per stretch
    best = min(found, key=trials.rank)
    assert done.results["best_trial"] == best["number"] and done.results["best_value"] == best["value"]
    assert done.results["tie_breaker"] == "val_loss"
    assert done.model_url == best["model_url"]
    # Every peer is done and free again.
    assert {run.status for run in done.peers} == {sessions.COMPLETED}
    assert {p.status for p in peers.Peer.objects(name__in=[r.name for r in done.peers])} == {peers.ONLINE}


def test_a_trial_that_scores_below_the_best_at_a_rung_is_pruned_and_its_peer_takes_the_next(kit, monkeypatch):
    # The coordinator's measure, made to follow the learning rate, so the test knows which trials lose.
    session = search(kit, peers_=1, sampler="random")
    learning_rates = {}

    def measured(self, model):
        trial = trials.open_of(self.session.id, self.session.peers[0].name)
        learning_rates[trial["number"]] = trial["hyperparameters"]["learning_rate"]
        return {"val_loss": 1.0, "val_accuracy": trial["hyperparameters"]["learning_rate"], "val_rows": 24}

    monkeypatch.setattr(Search, "evaluate_held_out", measured)
    run_session(kit, session)
    done = kit.run_to_end(session)
    assert done.status == sessions.COMPLETED, done.reason
    found = trials.of_session(session.id)
    pruned = [t for t in found if t["status"] == trials.PRUNED]
    assert pruned, found
    for t in pruned:
        # One trial at a time: with fewer than three at a rung, only the best so far goes on.
        earlier = [learning_rates[u["number"]] for u in found[:t["number"]]
                   if any(s["epoch"] == t["epochs_done"] for s in u["scores"])]
        assert earlier and learning_rates[t["number"]] < max(earlier)
        assert t["epochs_done"] < 9 and t["reason"].startswith(f"pruned at epoch {t['epochs_done']}")
    assert done.results["best_value"] == max(learning_rates.values())


def test_a_result_delivered_twice_is_scored_once_and_the_trial_goes_on_once(kit):
    session = search(kit, peers_=1)
    run_session(kit, session)
    message = kit.trains(session)[kit.peer(0)][0]
    kit.answer(message, kit.peer(0))
    update = kit.take(kit.settings.coordinator_queue)
    assert [m["task"] for m in update] == ["peertrain.update"]
    for _ in range(2):
        kit.app.tasks["peertrain.update"](*update[0]["args"])
    trial = trials.of_session(session.id)[0]
    assert [s["epoch"] for s in trial["scores"]] == [1] and trial["epochs_done"] == 1
    # Its next stretch (the first trial is always promoted) from epoch 1 to 3, sent once.
    assert stretches(kit, session) == {kit.peer(0): [(0, 3)]}


def first_stretch_dying_in(kit, monkeypatch, step):
    """A one-peer search whose first stretch came back and whose `update` died in `step`; (session, update)."""
    session = search(kit, peers_=1)
    run_session(kit, session)
    kit.answer(kit.trains(session)[kit.peer(0)][0], kit.peer(0))
    update = kit.take(kit.settings.coordinator_queue)[0]
    crash_once(monkeypatch, Search, step)
    with pytest.raises(Crash):
        kit.app.tasks["peertrain.update"](*update["args"])
    return session, update


@pytest.mark.parametrize("step", ["_decide", "_send"])
def test_an_update_that_died_after_scoring_decides_and_sends_on_redelivery(kit, monkeypatch, step):
    session, update = first_stretch_dying_in(kit, monkeypatch, step)
    assert stretches(kit, session) == {kit.peer(0): []}
    kit.app.tasks["peertrain.update"](*update["args"])
    assert stretches(kit, session) == {kit.peer(0): [(0, 3)]}
    assert trials.of_session(session.id)[0]["tasks"] == 2


def test_a_failed_trial_gives_its_peer_another_until_its_trials_keep_failing(kit):
    session = search(kit)
    run_session(kit, session)
    first = kit.trains(session)
    kit.answer(first[kit.peer(0)][0], kit.peer(0), fail="training diverged at epoch 1")
    kit.coordinate()
    assert trials.of_session(session.id)[0]["status"] == trials.FAILED
    second = kit.trains(session)[kit.peer(0)]
    assert len(second) == 1  # a new trial for the same peer
    kit.answer(second[0], kit.peer(0), fail="training diverged at epoch 1")
    kit.coordinate()
    assert kit.reload(session).peer(kit.peer(0)).status == sessions.FAILED
    assert kit.trains(session)[kit.peer(0)] == []
    # The other peer runs the rest of the search.
    kit.answer(first[kit.peer(1)][0], kit.peer(1))
    done = kit.run_to_end(session)
    assert done.status == sessions.COMPLETED, done.reason
    found = trials.of_session(session.id)
    assert [t["status"] for t in found].count(trials.FAILED) == 2 and len(found) == 6
    assert {t["peer"] for t in found if t["status"] != trials.FAILED} == {kit.peer(1)}


def test_a_peer_gone_offline_is_left_out_at_once_and_the_search_goes_on_without_it(kit):
    session = search(kit)
    run_session(kit, session)
    peers.gone(kit.peer(1))
    kit.app.tasks["peertrain.peer_lost"](str(session.id), kit.peer(1), "went offline")
    assert kit.reload(session).peer(kit.peer(1)).status == sessions.FAILED
    done = kit.run_to_end(session)
    assert done.status == sessions.COMPLETED, done.reason
    assert [t["status"] for t in trials.of_session(session.id)].count(trials.FAILED) == 1


def test_past_the_time_budget_no_trial_is_begun_or_continued_and_the_session_completes(kit):
    session = search(kit, time_budget=60)
    run_session(kit, session)
    assert kit.answer_all(session) == 2
    kit.coordinate()  # both first stretches scored, their trials go on
    kit.clock.advance(61)
    assert kit.answer_all(session) == 2
    kit.coordinate()
    done = kit.reload(session)
    assert done.status == sessions.COMPLETED, done.reason
    found = trials.of_session(session.id)
    assert len(found) == 2 and {t["status"] for t in found} == {trials.PRUNED}
    assert all("the time budget ran out" in t["reason"] and t["epochs_done"] == 3 for t in found)


def test_an_interrupted_search_goes_on_from_each_open_trials_last_rung(kit):
    session = search(kit)
    run_session(kit, session)
    assert kit.answer_all(session) == 2
    kit.coordinate()  # the first stretches scored, the next ones sent
    before = {t["number"]: t["epochs_done"] for t in trials.of_session(session.id)}
    prefix = Search(kit.reload(session), kit.services).prefix
    for number in before:  # the training state each trial's peer left at its first rung
        kit.storage.put_bytes(trial_key(prefix, number, "training"), b"state")
    interrupt_and_resume(kit, session)
    kit.clock.advance(5)
    run_session(kit, session)
    run_session(kit, session)  # delivered twice: still one task per open trial
    messages = kit.trains(session)
    specs = [m["args"][0] for found in messages.values() for m in found]
    assert len(specs) == 2
    for spec in specs:
        # The stretch it was in, again, from the state its peer left at the rung before.
        assert spec["attempt"] == 1 and spec["until"] == 3 and spec["resume_from"]
    for name, found in messages.items():
        for message in found:
            kit.answer(message, name)
    done = kit.run_to_end(session)
    assert done.status == sessions.COMPLETED and done.resumes == 1, done.reason
    after = trials.of_session(session.id)
    assert len(after) == 6 and all(t["epochs_done"] >= before.get(t["number"], 0) for t in after)


def test_a_cancelled_search_ends_its_open_trials(kit):
    session = search(kit)
    run_session(kit, session)
    kit.app.tasks["peertrain.cancel_session"](str(session.id))
    assert kit.reload(session).status == sessions.CANCELLED
    assert {t["status"] for t in trials.of_session(session.id)} == {trials.PRUNED}
    assert trials.count_open(session.id) == 0


def test_a_search_interrupted_with_a_stretch_recorded_and_not_sent_sends_each_open_trial_once(kit, monkeypatch):
    session, _ = first_stretch_dying_in(kit, monkeypatch, "_send")  # its next stretch recorded, never sent
    assert trials.unsent(session.id)
    interrupt_and_resume(kit, session)
    run_session(kit, session)
    specs = [m["args"][0] for m in kit.trains(session)[kit.peer(0)]]
    assert [(s["attempt"], s["until"]) for s in specs] == [(1, 3)]
    trial = trials.of_session(session.id)[0]
    assert trial["seq"] == specs[0]["round"] and trial["sent"] and trial["tasks"] == 3


def test_a_search_interrupted_after_scoring_a_stretch_decides_it_when_resumed(kit, monkeypatch):
    session, _ = first_stretch_dying_in(kit, monkeypatch, "_decide")  # scored at epoch 1, not decided
    interrupt_and_resume(kit, session)
    run_session(kit, session)
    # Decided now (the first trial always goes on), and its next stretch sent: 1 -> 3.
    assert [(m["args"][0]["attempt"], m["args"][0]["until"]) for m in kit.trains(session)[kit.peer(0)]] == [(1, 3)]
