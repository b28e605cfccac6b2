"""Every coordinator task is safe to deliver twice, and to run again after its worker died half-way.

The coordinator's tasks are acknowledged after they ran (acks_late, reject_on_worker_lost): a worker that
dies mid-task gets the message back from the broker, and a broker may deliver one twice. These run the
real tasks and strategies (tests/tasks/conftest.py `kit`: in-memory broker and backend, mongomock, a
local storage directory), and check what a user would see: how many tasks each peer was sent, how many
rounds were recorded, how the session ended.
"""

from __future__ import annotations

import sys
import threading

import pytest

from models import assignment as assignments
from models import session as sessions
from models import update as updates
from tasks import protocol, relay
from tasks.asynchronous import AsyncFederated
from tasks.collector import Collector
from tests.tasks.conftest import Crash

FEDERATED = {"mode": sessions.FEDERATED, "rounds": 3, "local_epochs": 1}
ASYNC = {"mode": sessions.FEDERATED, "schedule": sessions.ASYNC, "buffer_size": 2, "max_updates": 6,
         "local_epochs": 1}


def crash_once(monkeypatch, target, name):
    """Make `target.name` die the first time it is called (as the process would), and work after."""
    real = getattr(target, name)
    calls = []

    def dying(*args, **kwargs):
        calls.append(args)
        if len(calls) == 1:
            raise Crash(name)
        return real(*args, **kwargs)

    monkeypatch.setattr(target, name, dying)
    return calls


def run_session(kit, session):
    kit.app.tasks["peertrain.run_session"](str(session.id))


def sent_per_peer(kit, session) -> dict[str, int]:
    return {name: len(messages) for name, messages in kit.trains(session).items()}


# --- run_session ------------------------------------------------------------------------------------


@pytest.mark.parametrize("options", [{}, FEDERATED, ASYNC], ids=["sweep", "sync", "async"])
def test_run_session_delivered_twice_sends_each_peer_one_task(kit, options):
    session = kit.session(**options)
    run_session(kit, session)
    run_session(kit, session)
    assert kit.reload(session).status == sessions.RUNNING
    assert sent_per_peer(kit, session) == {run.name: 1 for run in session.peers}


@pytest.mark.parametrize(("options", "target", "name"), [
    ({}, relay, "send"),  # the round recorded, its chord never sent
    (FEDERATED, relay, "send"),
    (ASYNC, AsyncFederated, "_send"),  # running, the first tasks recorded, never sent
    (ASYNC, updates, "dispatched"),  # running, the first tasks not even recorded
], ids=["sweep", "sync", "async-unsent", "async-unrecorded"])
def test_run_session_that_died_half_way_is_completed_by_its_redelivery(kit, monkeypatch, options, target, name):
    session = kit.session(**options)
    crash_once(monkeypatch, target, name)
    with pytest.raises(Crash):
        run_session(kit, session)
    assert sent_per_peer(kit, session) == {run.name: 0 for run in session.peers}
    run_session(kit, session)  # the broker hands the message out again
    messages = kit.trains(session)
    assert {name: len(m) for name, m in messages.items()} == {run.name: 1 for run in session.peers}
    # Sent under the ids recorded before the crash: those are what the platform believes.
    recorded = {run.name: run.task_id for run in kit.reload(session).peers}
    assert {name: m[0]["id"] for name, m in messages.items()} == recorded
    assert all(assignments.get(task_id) is not None for task_id in recorded.values())


# --- the chord and aggregate -------------------------------------------------------------------------


def test_a_federated_session_runs_every_round_and_completes(kit):
    session = kit.session(**FEDERATED)
    run_session(kit, session)
    for _ in range(3):
        assert kit.answer_all(session) == 2
        kit.coordinate()
    done = kit.reload(session)
    assert done.status == sessions.COMPLETED, done.reason
    assert [r.round for r in done.rounds] == [0, 1, 2] and done.model_url


def test_aggregate_delivered_twice_records_its_round_once_and_launches_the_next_once(kit):
    session = kit.session(**FEDERATED)
    run_session(kit, session)
    kit.answer_all(session)
    body = kit.take(kit.settings.coordinator_queue)
    assert [m["task"] for m in body] == ["peertrain.aggregate"]
    for _ in range(2):
        kit.app.tasks["peertrain.aggregate"](*body[0]["args"])
    assert [r.round for r in kit.reload(session).rounds] == [0]
    assert sent_per_peer(kit, session) == {run.name: 1 for run in session.peers}


@pytest.mark.parametrize(("target", "name"), [(sessions, "next_round"), (relay, "send"), (sessions, "measured_round")],
                         ids=["before-the-next-round-is-recorded", "before-it-is-sent", "before-it-is-measured"])
def test_aggregate_that_died_half_way_is_completed_by_its_redelivery(kit, monkeypatch, target, name):
    from models import event as events

    session = kit.session(**FEDERATED)
    run_session(kit, session)
    kit.answer_all(session)
    body = kit.take(kit.settings.coordinator_queue)[0]
    crash_once(monkeypatch, target, name)
    with pytest.raises(Crash):
        kit.app.tasks["peertrain.aggregate"](*body["args"])
    kit.app.tasks["peertrain.aggregate"](*body["args"])
    done = kit.reload(session)
    assert [r.round for r in done.rounds] == [0]
    assert sent_per_peer(kit, session) == {run.name: 1 for run in session.peers}
    assert done.launch.round == 1 and done.launch.sent
    # Measured once the next round was out, and announced once, whichever run did it.
    assert "val_accuracy" in done.rounds[0].metrics and done.rounds[0].model_url
    assert [e["data"]["metrics"] for e in events.after(done.id, 0) if e["kind"] == "round"] == [done.rounds[0].metrics]


def test_a_round_is_measured_after_the_next_rounds_tasks_are_out(kit, monkeypatch):
    session = kit.session(**FEDERATED)
    run_session(kit, session)
    kit.answer_all(session)
    order = []
    send, measured = relay.send, sessions.measured_round
    monkeypatch.setattr(relay, "send", lambda *a, **k: (order.append("sent"), send(*a, **k))[1])
    monkeypatch.setattr(sessions, "measured_round", lambda *a, **k: (order.append("measured"), measured(*a, **k))[1])
    kit.coordinate()
    assert order == ["sent", "measured"]


# --- results in: the collector ------------------------------------------------------------------------


def test_a_result_delivered_twice_counts_once_in_its_round(kit):
    session = kit.session(peers_=2, **FEDERATED)
    run_session(kit, session)
    trains = kit.trains(session)
    first, second = (kit.peer(0), trains[kit.peer(0)][0]), (kit.peer(1), trains[kit.peer(1)][0])
    assert kit.answer(first[1], first[0])
    assert not kit.answer(first[1], first[0])  # the same result again: nothing to count
    # The round waits for the other peer: a result counted twice would have closed it already.
    assert kit.take(kit.settings.coordinator_queue) == []
    assert kit.answer(second[1], second[0])
    assert [m["task"] for m in kit.take(kit.settings.coordinator_queue)] == ["peertrain.aggregate"]


def test_two_collectors_taking_one_result_at_once_count_it_once(kit):
    """Two coordinator processes consume the results queue; a redelivered message reaches both at once."""
    session = kit.session(peers_=8, **FEDERATED)
    run_session(kit, session)
    trains = kit.trains(session)
    counted: dict[str, list[bool]] = {}

    def collect(name: str, start: threading.Barrier) -> None:
        collector = Collector(kit.services)
        start.wait()
        counted.setdefault(name, []).append(kit.answer(trains[name][0], name, via=collector))

    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # the interpreter switches threads every microsecond: races become common
    try:
        for run in session.peers[:7]:  # each peer's result taken by two collectors at the same moment
            start = threading.Barrier(2)
            threads = [threading.Thread(target=collect, args=(run.name, start)) for _ in range(2)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(10)
    finally:
        sys.setswitchinterval(before)
    assert all(sorted(taken) == [False, True] for taken in counted.values()), counted
    # Each second taker left the coordinator a note to look again (the first might have died passing it on);
    # looked at, they find every outcome passed on once. 7 of 8 peers counted: the round still waits.
    kit.clock.advance(31)
    assert set(kit.coordinate()) <= {"peertrain.deliver"}
    assert all(assignments.get(trains[run.name][0]["id"])["settled"] for run in session.peers[:7])
    assert kit.take(kit.settings.coordinator_queue) == []


def decided_by_a_dead_collector(kit, monkeypatch) -> dict:
    """A one-peer round whose result a collector decided, then died before passing it on; the task's message."""
    session = kit.session(peers_=1, **FEDERATED)
    run_session(kit, session)
    message = kit.trains(session)[kit.peer(0)][0]
    crash_once(monkeypatch, relay, "settle")
    with pytest.raises(Crash):
        kit.answer(message, kit.peer(0))
    assert assignments.get(message["id"])["outcome"] and kit.take(kit.settings.coordinator_queue) == []
    return message


def test_a_result_decided_by_a_collector_that_died_before_passing_it_on_is_passed_on_after_its_lease(
        kit, monkeypatch):
    message = decided_by_a_dead_collector(kit, monkeypatch)
    # Redelivered while the dead collector's lease on passing it on still holds: the coordinator looks again later.
    assert not kit.answer(message, kit.peer(0))
    [retry] = kit.take(kit.settings.coordinator_queue)
    assert retry["task"] == "peertrain.deliver"
    kit.clock.advance(31)
    kit.app.tasks[retry["task"]](*retry["args"])
    assert [m["task"] for m in kit.take(kit.settings.coordinator_queue)] == ["peertrain.aggregate"]
    assert not kit.answer(message, kit.peer(0))  # counted: a later copy changes nothing
    assert kit.take(kit.settings.coordinator_queue) == []


# --- update (asynchronous) ---------------------------------------------------------------------------


def test_an_asynchronous_session_folds_every_update_and_completes(kit):
    session = kit.session(**ASYNC)
    run_session(kit, session)
    for _ in range(10):
        if not kit.answer_all(session):
            break
        kit.coordinate()
    done = kit.reload(session)
    assert done.status == sessions.COMPLETED, done.reason
    tasks = list(updates.for_session(session.id))
    assert len(tasks) == 6 and {t.status for t in tasks} == {updates.FOLDED}
    assert sum(len(r.updates) for r in done.rounds) == 6


def test_update_delivered_twice_buffers_once_and_sends_one_next_task(kit):
    session = kit.session(**ASYNC)
    run_session(kit, session)
    message = kit.trains(session)[kit.peer(0)][0]
    kit.answer(message, kit.peer(0))
    update = kit.take(kit.settings.coordinator_queue)
    assert [m["task"] for m in update] == ["peertrain.update"]
    for _ in range(2):
        kit.app.tasks["peertrain.update"](*update[0]["args"])
    assert sent_per_peer(kit, session) == {kit.peer(0): 1, kit.peer(1): 0}
    assert updates.count(session.id, updates.BUFFERED) == 1


def test_update_that_died_after_recording_the_next_task_sends_it_on_redelivery(kit, monkeypatch):
    session = kit.session(**ASYNC)
    run_session(kit, session)
    message = kit.trains(session)[kit.peer(0)][0]
    kit.answer(message, kit.peer(0))
    update = kit.take(kit.settings.coordinator_queue)[0]
    crash_once(monkeypatch, AsyncFederated, "_send")
    with pytest.raises(Crash):
        kit.app.tasks["peertrain.update"](*update["args"])
    assert sent_per_peer(kit, session) == {kit.peer(0): 0, kit.peer(1): 0}
    kit.app.tasks["peertrain.update"](*update["args"])
    assert sent_per_peer(kit, session) == {kit.peer(0): 1, kit.peer(1): 0}


# --- peer_lost, deadline ------------------------------------------------------------------------------


@pytest.mark.parametrize("options", [{}, FEDERATED], ids=["sweep", "sync"])
def test_peer_lost_delivered_twice_leaves_the_peer_out_once_and_the_round_closes(kit, options):
    session = kit.session(peers_=3, min_peers=2, **options)
    run_session(kit, session)
    trains = kit.trains(session)
    for _ in range(2):
        kit.app.tasks["peertrain.peer_lost"](str(session.id), kit.peer(2), "went offline")
    for i in (0, 1):
        kit.answer(trains[kit.peer(i)][0], kit.peer(i))
    kit.coordinate()
    done = kit.reload(session)
    assert done.peer(kit.peer(2)).status == sessions.FAILED and done.peer(kit.peer(2)).error == "went offline"
    assert done.status == sessions.RUNNING if options else done.status == sessions.COMPLETED
    assert done.rounds[0].peers == [kit.peer(0), kit.peer(1)] if options else True


def test_peer_lost_that_died_before_counting_its_verdict_counts_it_on_redelivery(kit, monkeypatch):
    session = kit.session(peers_=2, min_peers=1)
    run_session(kit, session)
    trains = kit.trains(session)
    crash_once(monkeypatch, relay, "settle")
    with pytest.raises(Crash):
        kit.app.tasks["peertrain.peer_lost"](str(session.id), kit.peer(1), "went offline")
    kit.app.tasks["peertrain.peer_lost"](str(session.id), kit.peer(1), "went offline")
    kit.answer(trains[kit.peer(0)][0], kit.peer(0))
    kit.clock.advance(31)  # the dead run's lease on passing its verdict on expires
    kit.coordinate()
    done = kit.reload(session)
    assert done.status == sessions.COMPLETED, done.reason
    assert done.results["best_peer"] == kit.peer(0) and done.peer(kit.peer(1)).status == sessions.FAILED


def test_a_late_result_of_a_peer_left_out_is_dropped(kit):
    session = kit.session(peers_=2, min_peers=1)
    run_session(kit, session)
    trains = kit.trains(session)
    kit.app.tasks["peertrain.peer_lost"](str(session.id), kit.peer(1), "went offline")
    assert not kit.answer(trains[kit.peer(1)][0], kit.peer(1))
    assert kit.services.gate.dropped["already reported"] == 1


def test_a_peer_past_its_deadline_is_left_out_once(kit):
    session = kit.session(peers_=2, min_peers=1, **FEDERATED)
    run_session(kit, session)
    trains = kit.trains(session)
    kit.answer(trains[kit.peer(0)][0], kit.peer(0))
    kit.clock.advance(61)  # round_timeout 60
    late = [a["_id"] for a in assignments.overdue(kit.clock.now())]
    assert late == [trains[kit.peer(1)][0]["id"]]
    for _ in range(2):
        kit.app.tasks["peertrain.deadline"](str(session.id), late)
    kit.coordinate()
    done = kit.reload(session)
    assert done.peer(kit.peer(1)).error == "did not finish round 0 within its 60 s"
    assert [r.round for r in done.rounds] == [0] and done.rounds[0].peers == [kit.peer(0)]


def test_a_session_that_cannot_go_on_without_a_lost_peer_fails_naming_it(kit):
    session = kit.session(peers_=2, **FEDERATED)
    run_session(kit, session)
    kit.trains(session)
    kit.app.tasks["peertrain.peer_lost"](str(session.id), kit.peer(1), "went offline")
    done = kit.reload(session)
    assert done.status == sessions.FAILED and done.reason == f"peer {kit.peer(1)} went offline"
    assert assignments.open_of(session.id) == []  # nothing it sent is still waiting for an answer


# --- failures of the coordinator's own: round_failed, cancel_session -----------------------------------


def test_round_failed_and_cancel_session_delivered_twice_end_the_session_once(kit):
    failing, cancelled = kit.session(**FEDERATED), kit.session(**FEDERATED)
    for session in (failing, cancelled):
        run_session(kit, session)
    body_id = kit.reload(failing).launch.body
    for _ in range(2):
        kit.app.tasks["peertrain.round_failed"](body_id)
        kit.app.tasks["peertrain.cancel_session"](str(cancelled.id))
    assert kit.reload(failing).status == sessions.FAILED and "round 0" in kit.reload(failing).reason
    assert kit.reload(cancelled).status == sessions.CANCELLED
    events = [e["kind"] for e in sessions.events.after(cancelled.id, 0)]
    assert events.count("end") == 1


def test_deadline_that_died_before_counting_its_verdict_counts_it_on_redelivery(kit, monkeypatch):
    session = kit.session(peers_=2, min_peers=1, **FEDERATED)
    run_session(kit, session)
    trains = kit.trains(session)
    kit.answer(trains[kit.peer(0)][0], kit.peer(0))
    kit.clock.advance(61)
    late = [a["_id"] for a in assignments.overdue(kit.clock.now())]
    crash_once(monkeypatch, relay, "settle")
    with pytest.raises(Crash):
        kit.app.tasks["peertrain.deadline"](str(session.id), late)
    kit.clock.advance(31)  # its lease on passing the verdict on expires
    kit.app.tasks["peertrain.deadline"](str(session.id), late)
    kit.coordinate()
    done = kit.reload(session)
    assert [r.round for r in done.rounds] == [0] and done.rounds[0].peers == [kit.peer(0)]
    assert done.peer(kit.peer(1)).status == sessions.FAILED


def test_deliver_delivered_twice_or_after_dying_passes_an_outcome_on_once(kit, monkeypatch):
    message = decided_by_a_dead_collector(kit, monkeypatch)
    kit.clock.advance(31)
    crash_once(monkeypatch, relay, "settle")
    with pytest.raises(Crash):
        kit.app.tasks["peertrain.deliver"](message["id"])
    kit.clock.advance(31)
    for _ in range(2):
        kit.app.tasks["peertrain.deliver"](message["id"])
    assert [m["task"] for m in kit.take(kit.settings.coordinator_queue)] == ["peertrain.aggregate"]


@pytest.mark.parametrize("task", ["peertrain.cancel_session", "peertrain.round_failed"])
def test_ending_a_session_that_died_half_way_ends_it_once_on_redelivery(kit, monkeypatch, task):
    session = kit.session(**FEDERATED)
    run_session(kit, session)
    argument = str(session.id) if task == "peertrain.cancel_session" else kit.reload(session).launch.body
    crash_once(monkeypatch, sessions, "finish")  # its peers stopped and released; its status not yet written
    with pytest.raises(Crash):
        kit.app.tasks[task](argument)
    assert kit.reload(session).status == sessions.RUNNING
    kit.app.tasks[task](argument)
    done = kit.reload(session)
    assert done.status == (sessions.CANCELLED if task == "peertrain.cancel_session" else sessions.FAILED)
    assert [e["kind"] for e in sessions.events.after(session.id, 0)].count("end") == 1
    assert not sessions.TrainingSession.objects(id=session.id, peers__status=sessions.RUNNING).count()


# --- resuming ------------------------------------------------------------------------------------------


def interrupt_and_resume(kit, session) -> None:
    """The platform stops under the session (make run's stop), then its owner resumes it (the API's part)."""
    from bson import ObjectId

    from models import peer as peers
    from models.db import utcnow
    from tasks import lifecycle

    assert lifecycle.end(kit.app, session.id, sessions.INTERRUPTED, "the platform was stopped")
    kit.trains(session)  # what was queued for it is gone with the stop (its peers would drop it)
    assert peers.claim_named(ObjectId(session.id), [run.name for run in session.peers]) == []
    assert sessions.resume(session.id, utcnow())


def test_an_interrupted_federated_session_resumes_from_its_first_round_not_recorded(kit):
    session = kit.session(**FEDERATED)
    run_session(kit, session)
    assert kit.answer_all(session) == 2
    kit.coordinate()  # round 0 recorded, round 1 sent
    before = kit.reload(session).rounds
    interrupt_and_resume(kit, session)
    run_session(kit, session)
    run_session(kit, session)  # delivered twice: still one task per peer
    messages = kit.trains(session)
    assert {name: [m["args"][0]["round"] for m in found] for name, found in messages.items()} == {
        run.name: [1] for run in session.peers}
    assert all(m["args"][0]["attempt"] == 1 for found in messages.values() for m in found)
    for name, found in messages.items():
        for message in found:
            kit.answer(message, name)
    kit.coordinate()
    assert kit.answer_all(session) == 2
    kit.coordinate()
    done = kit.reload(session)
    assert done.status == sessions.COMPLETED and done.resumes == 1, done.reason
    assert [r.round for r in done.rounds] == [0, 1, 2] and done.rounds[0].to_mongo() == before[0].to_mongo()


@pytest.mark.parametrize("dies_in", [None, "dispatched"], ids=["whole", "died-half-way"])
def test_an_interrupted_asynchronous_session_resumes_with_its_lost_tasks_given_back(kit, monkeypatch, dies_in):
    session = kit.session(**ASYNC)
    run_session(kit, session)
    first = kit.trains(session)
    for name, found in first.items():  # one peer answers, the other's task is out when it stops
        if name == session.peers[0].name:
            for message in found:
                kit.answer(message, name)
    kit.coordinate()
    interrupted, out = kit.reload(session).asynchronous, updates.count(session.id, updates.TRAINING)
    assert out == 2  # the unanswered first task, and the next one of the peer that answered
    interrupt_and_resume(kit, session)
    assert kit.reload(session).asynchronous.remaining == interrupted.remaining + out  # the lost tasks given back
    if dies_in:
        crash_once(monkeypatch, updates, dies_in)
        with pytest.raises(Crash):
            run_session(kit, session)
    run_session(kit, session)
    run_session(kit, session)
    assert {name: len(found) for name, found in kit.trains(session).items()} == {run.name: 1 for run in session.peers}


def test_a_run_dispatched_while_its_session_is_being_interrupted_ends_interrupted(kit, monkeypatch):
    """An asynchronous dispatch (or a result) writes a run RUNNING while `end` is stopping the session: once
    `end` returns, every run has ended with it, and a writer coming later changes nothing."""
    from tasks import lifecycle

    session = kit.session(**ASYNC)
    run_session(kit, session)
    position = {run.name: i for i, run in enumerate(kit.reload(session).peers)}
    running = {name: {"status": sessions.RUNNING} for name in position}
    give_up_all = updates.give_up_all

    def dispatched_meanwhile(*args, **kwargs):  # a writer of an active session's runs, between end's steps
        sessions.record_runs(session.id, position, running, active_only=True)
        return give_up_all(*args, **kwargs)

    monkeypatch.setattr(updates, "give_up_all", dispatched_meanwhile)
    assert lifecycle.end(kit.app, session.id, sessions.INTERRUPTED, "the platform was stopped")
    sessions.record_runs(session.id, position, running, active_only=True)
    ended = kit.reload(session)
    assert ended.status == sessions.INTERRUPTED
    assert {run.status for run in ended.peers} == {sessions.INTERRUPTED}


# --- federated algorithms -------------------------------------------------------------------------------------


@pytest.mark.parametrize("options", [{"rounds": 3}, {"schedule": "async", "max_updates": 6, "buffer_size": 2}],
                         ids=["sync", "async"])
def test_a_server_optimizer_steps_every_round_from_the_state_it_kept(kit, options):
    import torch

    from tasks.federated import Federated
    from trainer import serveropt

    session = kit.session(mode=sessions.FEDERATED, algorithm="fedadam", server_lr=0.05, **options)
    run_session(kit, session)
    done = kit.run_to_end(session)
    assert done.status == sessions.COMPLETED, done.reason
    last = len(done.rounds) - 1
    assert done.plan.server_url.endswith(f"/rounds/{last}/server.safetensors")
    strategy = Federated(done, kit.services)
    state = serveropt.state_from_bytes(kit.storage.get_bytes(done.plan.server_url), strategy.global_state(
        done.plan.global_url))
    assert {k.split(".")[0] for k in state} == {"m", "v"} and all(torch.isfinite(v).all() for v in state.values())
    assert done.results["algorithm"] == "fedadam"


def first_aggregate(kit, algorithm):
    """A 2-round session of `algorithm` whose first round every peer answered; its `aggregate` task's arguments."""
    session = kit.session(mode=sessions.FEDERATED, algorithm=algorithm, rounds=2)
    run_session(kit, session)
    kit.answer_all(session)
    body = kit.take(kit.settings.coordinator_queue)
    assert [m["task"] for m in body] == ["peertrain.aggregate"]
    return session, body[0]["args"]


def test_a_round_of_a_server_optimizer_delivered_twice_steps_once(kit):
    session, args = first_aggregate(kit, "fedavgm")
    for _ in range(2):
        kit.app.tasks["peertrain.aggregate"](*args)
    first = kit.reload(session)
    assert len(first.rounds) == 1 and first.plan.server_url.endswith("/rounds/0/server.safetensors")


@pytest.mark.parametrize(("algorithm", "mu"), [("fedprox", 0.1), ("fedavg", None)])
def test_fedprox_peers_are_told_the_proximal_terms_weight(kit, algorithm, mu):
    session = kit.session(mode=sessions.FEDERATED, algorithm=algorithm, mu=mu, rounds=1)
    run_session(kit, session)
    specs = [protocol.train_spec(m["args"][0]) for found in kit.trains(session).values() for m in found]
    assert len(specs) == 2 and {s["proximal_mu"] for s in specs} == {mu or 0.0}


def _state(kit, session, key_or_url):
    from tasks.federated import Federated
    from trainer.weights import max_state_bytes, state_from_bytes

    strategy = Federated(kit.reload(session), kit.services)
    if key_or_url.startswith("data:"):  # a grant holding the object itself
        return state_from_bytes(kit.granted(key_or_url, max_state_bytes(strategy.config)), strategy.config)
    url = key_or_url if "://" in key_or_url or key_or_url.startswith("/") else kit.storage.url(key_or_url)
    return strategy._read(url)


def test_scaffold_peers_are_sent_c_minus_their_own_control_which_the_coordinator_derives_from_their_weights(kit):
    import torch

    from trainer import scaffold

    session = kit.session(mode=sessions.FEDERATED, algorithm="scaffold", rounds=2)
    run_session(kit, session)
    first = {name: found[0] for name, found in kit.trains(session).items()}
    # Round 0: no control variate yet, a correction of zeros.
    for name, message in first.items():
        spec = protocol.train_spec(message["args"][0])
        assert all(not v.any() for v in _state(kit, session, spec["correction"]).values())
        kit.answer(message, name)
    kit.coordinate()
    done = kit.reload(session)
    assert len(done.rounds) == 1 and done.plan.server_url.endswith("/rounds/0/server.safetensors")
    prefix = f"users/{done.owner_id}/sessions/{done.id}"
    initial = _state(kit, session, done.plan.initial_url)
    rows, controls = done.plan.shard_rows, {}
    for name in first:
        sent_back = _state(kit, session, f"{prefix}/rounds/0/peers/{name}.safetensors")
        steps = scaffold.local_steps(rows[name], 16, 1)  # the kit's batch size, one local epoch
        controls[name] = _state(kit, session, f"{prefix}/rounds/0/controls/{name}.safetensors")
        for key, value in controls[name].items():
            assert torch.allclose(value, (initial[key] - sent_back[key]) / (steps * 0.05), atol=1e-4)
    # c is the rows-weighted mean of the controls (every peer used, from zeros).
    server = _state(kit, session, done.plan.server_url)
    total = sum(rows.values())
    for key, value in server.items():
        assert torch.allclose(value, sum(controls[n][key] * rows[n] / total for n in first), atol=1e-5)
    # Round 1: each peer is sent c − c_i.
    for name, found in kit.trains(session).items():
        spec = protocol.train_spec(found[0]["args"][0])
        correction = _state(kit, session, spec["correction"])
        assert all(torch.allclose(correction[k], server[k] - controls[name][k], atol=1e-6) for k in server)


def test_a_scaffold_round_delivered_twice_moves_c_once(kit):
    session, args = first_aggregate(kit, "scaffold")
    kit.app.tasks["peertrain.aggregate"](*args)
    done = kit.reload(session)
    once = _state(kit, session, done.plan.server_url)
    kit.app.tasks["peertrain.aggregate"](*args)
    again = kit.reload(session)
    assert len(again.rounds) == 1 and again.plan.server_url == done.plan.server_url
    assert all((once[k] == v).all() for k, v in _state(kit, session, again.plan.server_url).items())


def test_a_scaffold_peer_whose_update_is_refused_moves_no_control_and_is_sent_c_as_its_correction(kit):
    import torch

    session = kit.session(peers_=3, mode=sessions.FEDERATED, algorithm="scaffold", rounds=2)
    run_session(kit, session)
    spoiled = kit.peer(0)
    for name, found in kit.trains(session).items():
        kit.answer(found[0], name, spoil="nan" if name == spoiled else None)
    kit.coordinate()
    done = kit.reload(session)
    assert spoiled in done.rounds[0].rejected and spoiled not in done.rounds[0].peers
    server = _state(kit, session, done.plan.server_url)
    assert any(v.any() for v in server.values())
    spec = protocol.train_spec(kit.trains(session)[spoiled][0]["args"][0])
    correction = _state(kit, session, spec["correction"])
    assert all(torch.equal(correction[k], server[k]) for k in server)  # c − 0: it has no control variate


@pytest.mark.parametrize("aggregation", ["fedavg", "median"])
def test_an_asynchronous_scaffold_session_keeps_c_fold_by_fold(kit, aggregation):
    import torch

    session = kit.session(peers_=3, mode=sessions.FEDERATED, algorithm="scaffold", schedule="async", max_updates=9,
                          buffer_size=2, local_epochs=1, aggregation=aggregation)
    run_session(kit, session)
    done = kit.run_to_end(session)
    assert done.status == sessions.COMPLETED, done.reason
    assert done.plan.server_url.endswith(f"/rounds/{len(done.rounds) - 1}/server.safetensors")
    server = _state(kit, session, done.plan.server_url)
    assert all(torch.isfinite(v).all() for v in server.values()) and any(v.any() for v in server.values())
    assert done.results["algorithm"] == "scaffold"


def test_an_asynchronous_session_whose_every_peer_is_refused_ends_at_once_rather_than_at_its_deadline(kit):
    session = kit.session(**{**ASYNC, "max_updates": 40})
    run_session(kit, session)
    done = kit.run_to_end(session, spoil="nan")
    assert done.status == sessions.FAILED and done.reason == "no peer returned a usable update"
    # Each given up on after its third refused update (a task or so more: one was out while they were judged),
    # far from the 40 the budget allowed; no task is out, none waits.
    assert all(3 <= run.rejected <= 4 for run in done.peers)
    assert sum(1 for _ in updates.for_session(session.id)) <= 8


@pytest.mark.parametrize("sent", ["in the task", "a large model", "many peers"])
def test_a_small_models_global_weights_travel_in_the_task_and_a_large_ones_behind_a_grant(kit, monkeypatch, sent):
    from tasks import federated
    from trainer.weights import max_state_bytes

    inline = sent == "in the task"
    if sent == "a large model":
        monkeypatch.setattr(federated, "INLINE_BYTES", 1024)  # the test's model is larger than this
    session = kit.session(mode=sessions.FEDERATED, rounds=2)
    run_session(kit, session)
    if sent == "many peers":  # room for one peer's copy of the weights, not for the round's two
        config = federated.ModelConfig.from_dict(kit.reload(session).plan.model)
        monkeypatch.setattr(federated, "ROUND_INLINE_BYTES", max_state_bytes(config) + 1)
    for name, found in kit.trains(session).items():
        kit.answer(found[0], name)
    kit.coordinate()
    done = kit.reload(session)
    assert len(done.rounds) == 1
    specs = [protocol.train_spec(found[-1]["args"][0]) for found in kit.trains(session).values()]
    assert len(specs) == 2 and {s["round"] for s in specs} == {1}
    stored = kit.storage.get_bytes(done.plan.global_url)  # round 0's aggregate: what round 1 starts from
    for spec in specs:
        assert spec["initial_weights"].startswith("data:") is inline
        assert kit.granted(spec["initial_weights"], len(stored)) == stored
