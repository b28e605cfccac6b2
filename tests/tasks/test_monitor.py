"""The monitor turns Celery events into peers' status, heartbeats and failed sessions."""

from __future__ import annotations

import threading
import uuid
from datetime import timedelta

import pytest
from bson import ObjectId

from harness.waiting import wait_until
from models import Dataset, Heartbeat, Peer, PeerRun, TrainingSession, utcnow
from models import assignment as assignments
from models import peer as peers
from models import session as sessions
from tasks.monitor import EventConsumer, Monitor
from tasks.services import FrozenClock


def online(*names: str, at=None) -> None:
    """Registered peers whose workers have been seen."""
    for name in names:
        peers.register(name)
        peers.seen(name, f"peer.{name}@h", at=at)


def task_id(session, peer, round=0) -> str:
    return f"{session.id}:{round}:{peer}"


def assign(session, peer, round=0, epochs=3, deadline=None, sent_at=None) -> str:
    """The coordinator's record of a task it sent `peer` (as a strategy records it before sending)."""
    sent_at = sent_at or utcnow()
    assignments.record([{"_id": task_id(session, peer, round), "session_id": session.id, "peer": peer, "round": round,
                         "epochs": epochs, "position": sessions.positions(session)[peer], "chord": None,
                         "sent_at": sent_at, "deadline": deadline}])
    return task_id(session, peer, round)


def make_session(names, status=sessions.RUNNING, **fields) -> TrainingSession:
    session = TrainingSession(
        owner_id=ObjectId(), target="label", status=status,
        dataset=Dataset(filename="d.csv", url="file:///x", bytes=1, sha256="0" * 64, rows=1, columns=1),
        peers=[PeerRun(name=n, status=sessions.RUNNING if status == sessions.RUNNING else sessions.PENDING,
                       hyperparameters={"epochs": 3}) for n in names],
        **fields,
    ).save()
    # These peers, as a start request would have claimed them, and their tasks as the coordinator sent them.
    assert Peer.objects(name__in=names, status="ONLINE").update(set__status="TRAINING",
                                                               set__session_id=session.id) == len(names)
    if status == sessions.RUNNING:
        for name in names:
            assign(session, name)
    return session


def heartbeat(session, peer, epoch, round=0, task=None, **metrics):
    return {"type": "task-heartbeat", "uuid": task or task_id(session, peer, round), "session": str(session.id),
            "peer": peer, "round": round, "epoch": epoch, "epochs": 3, "loss": 1.0 / (1 + epoch),
            "timestamp": 1.7e9, **metrics}


def test_worker_events_drive_peer_status(db):
    peers.register("a")
    monitor = Monitor(peer_timeout=10)
    monitor.on_event({"type": "worker-online", "hostname": "peer.a@host"}, "peer.a")
    monitor.on_event({"type": "worker-heartbeat", "hostname": "coordinator@host"}, "guest")
    assert [(p.name, p.status) for p in Peer.objects] == [("a", "ONLINE")]
    monitor.on_event({"type": "worker-offline", "hostname": "peer.a@host"}, "peer.a")
    assert Peer.objects.get(name="a").status == "OFFLINE"  # idle: it takes no work until heard again
    monitor.on_event({"type": "worker-heartbeat", "hostname": "peer.a@host"}, "peer.a")
    assert Peer.objects.get(name="a").status == "ONLINE"
    assert not monitor.dropped


def test_a_worker_that_is_not_registered_never_shows_online(db):
    monitor = Monitor(peer_timeout=10)
    monitor.on_event({"type": "worker-online", "hostname": "peer.mallory@host"}, "peer.mallory")
    monitor.on_event({"type": "worker-heartbeat", "hostname": "peer.mallory@host"}, "peer.mallory")
    assert Peer.objects.count() == 0 and monitor.dropped["unregistered peer"] == 2


def test_events_about_another_peer_are_dropped_and_counted(db):
    """Attack: peer `b` publishes worker events in `a`'s name to take it offline (and fail its session)."""
    online("a", "b")
    session = make_session(["a"])
    monitor = Monitor(peer_timeout=10)
    monitor.on_event({"type": "worker-offline", "hostname": "peer.a@host"}, "peer.b")
    monitor.on_event({"type": "worker-offline", "hostname": "peer.a@host"}, None)  # the platform's login, unstamped
    assert Peer.objects.get(name="a").status == "TRAINING"
    assert TrainingSession.objects.get(id=session.id).status == "RUNNING"
    assert monitor.dropped["not its own worker"] == 2


def test_heartbeats_are_stored_once_and_show_as_progress(db):
    online("a")
    session = make_session(["a"])
    monitor = Monitor(peer_timeout=10)
    for epoch in (1, 2, 2, 3):
        monitor.on_event(heartbeat(session, "a", epoch, val_accuracy=0.5 + epoch / 10), "peer.a")
    monitor.on_event({"type": "task-heartbeat", "session": "not-an-id", "peer": "a", "epoch": 1}, "peer.a")
    monitor.on_event({"type": "task-heartbeat", "peer": "a"}, "peer.a")
    assert monitor.flush() == 3
    assert [h.epoch for h in Heartbeat.objects(session_id=session.id)] == [1, 2, 3]
    run = TrainingSession.objects.get(id=session.id).peer("a")
    assert (run.epoch, run.epochs, run.val_accuracy) == (3, 3, 0.8)
    assert run.updated_at is not None
    # Replayed events (a redelivery) change nothing.
    monitor.on_event(heartbeat(session, "a", 2), "peer.a")
    assert monitor.flush() == 0
    assert Heartbeat.objects(session_id=session.id).count() == 3


def test_heartbeats_that_come_as_a_session_ends_are_stored_but_its_record_stays_as_it_ended(db):
    online("a")
    session = make_session(["a"])
    clock = FrozenClock()
    monitor = Monitor(peer_timeout=10, clock=clock)
    monitor.on_event(heartbeat(session, "a", 1), "peer.a")
    monitor.flush()
    monitor.on_event(heartbeat(session, "a", 2), "peer.a")  # believed: the session is running
    assert sessions.finish(session.id, sessions.COMPLETED)
    ended = TrainingSession.objects.get(id=session.id).to_mongo()
    clock.advance(1)  # past the progress throttle: this flush would write progress
    assert monitor.flush() == 1
    assert Heartbeat.objects(session_id=session.id).count() == 2
    assert TrainingSession.objects.get(id=session.id).to_mongo() == ended


def test_an_asynchronous_peer_heartbeats_for_its_own_current_task(db):
    """No common round: each task is numbered on its own, and a heartbeat counts for the task it names."""
    online("a", "b")
    session = make_session(["a", "b"], mode=sessions.FEDERATED,
                           federated=sessions.FederatedSettings(schedule=sessions.ASYNC, local_epochs=3))
    a3, b7 = assign(session, "a", 3), assign(session, "b", 7)
    monitor = Monitor(peer_timeout=10, clock=FrozenClock())
    monitor.on_event(heartbeat(session, "a", 1, round=3), "peer.a")
    monitor.on_event(heartbeat(session, "b", 1, round=7), "peer.b")
    monitor.on_event(heartbeat(session, "a", 1, round=7, task=b7), "peer.a")  # b's task, not a's
    monitor.on_event(heartbeat(session, "a", 1, round=7, task=a3), "peer.a")  # a's task, another round
    assert monitor.dropped["not its task"] == 2
    # a answered and was given task 6 (numbered before b's 7, recorded after): believed at once all the same.
    assign(session, "a", 6)
    monitor.on_event(heartbeat(session, "a", 1, round=6), "peer.a")
    assert monitor.dropped["not its task"] == 2
    assert monitor.flush() == 3
    assert sorted((h.peer, h.round) for h in Heartbeat.objects(session_id=session.id)) == [
        ("a", 3), ("a", 6), ("b", 7)]


def test_a_heartbeat_long_after_its_task_was_decided_is_dropped(db):
    online("a")
    session = make_session(["a"])
    clock = FrozenClock()
    monitor = Monitor(peer_timeout=10, clock=clock)
    assignments.claim(task_id(session, "a"), {"kind": "trained", "result": {}, "reason": None}, clock.now())
    monitor.on_event(heartbeat(session, "a", 1), "peer.a")  # just decided: it may trail its result
    clock.advance(120)
    monitor.on_event(heartbeat(session, "a", 2), "peer.a")
    assert monitor.flush() == 1 and monitor.dropped["stale heartbeat"] == 1


@pytest.mark.parametrize(("peer", "sender", "session_round", "epoch", "own_task", "why"), [
    ("b", "peer.b", 0, 1, False, "unknown task"),            # b is registered but was sent no task here
    ("b", "peer.b", 0, 1, True, "not its own heartbeat"),    # b writes in a's name
    ("a", "peer.b", 0, 1, True, "not its own heartbeat"),    # b writes in a's name, a's task
    ("a", None, 0, 1, True, "not from a peer"),              # unstamped: not from a peer at all
    ("a", "peer.a", 1, 1, True, "not its task"),             # a round it has not been given
    ("a", "peer.a", 0, 999, True, "not its task"),           # epoch 999 of 3
    ("a", "peer.a", 0, 0, True, "malformed heartbeat"),
])
def test_a_forged_heartbeat_is_dropped_and_counted(db, peer, sender, session_round, epoch, own_task, why):
    """Attack: a heartbeat for a session, round or epoch the sender is not training, or in another's name."""
    online("a", "b")
    session = make_session(["a"])
    monitor = Monitor(peer_timeout=10)
    event = heartbeat(session, peer, epoch, round=session_round, task=task_id(session, "a") if own_task else None)
    if own_task and peer == "b":
        event["peer"] = "a"
    monitor.on_event(event, sender)
    assert monitor.flush() == 0 and Heartbeat.objects.count() == 0
    assert monitor.dropped[why] == 1
    # The genuine heartbeat for that slot is still stored when it comes.
    monitor.on_event(heartbeat(session, "a", 1), "peer.a")
    assert monitor.flush() == 1


def test_a_heartbeat_with_values_that_are_not_numbers_is_dropped(db):
    online("a")
    session = make_session(["a"])
    monitor = Monitor(peer_timeout=10)
    monitor.on_event(heartbeat(session, "a", 1, loss="lots"), "peer.a")
    monitor.on_event(heartbeat(session, "a", 1, loss=float("nan")), "peer.a")
    assert monitor.flush() == 0 and monitor.dropped["malformed heartbeat"] == 2


def judging_monitor(lost: list, clock: FrozenClock | None = None, **options) -> Monitor:
    """A monitor that has been receiving long enough to judge silence; lost peers go to `lost`."""
    clock = clock or FrozenClock(utcnow() - timedelta(seconds=10))  # it has been listening for 10 s, until now
    monitor = Monitor(peer_timeout=10, clock=clock, lose=lambda *args: lost.append(args), **options)
    monitor.receiving()
    clock.advance(10)
    return monitor


def test_worker_offline_takes_an_idle_peer_out_but_a_training_one_is_judged_on_its_silence(db):
    """Celery sends worker-offline on every lost broker connection too, and a warm shutdown finishes its
    task first: it is no evidence that a training peer's work is lost."""
    online("idle", "busy")
    make_session(["busy"])
    lost: list = []
    monitor = judging_monitor(lost)
    for name in ("idle", "busy"):
        monitor.on_event({"type": "worker-offline", "hostname": f"peer.{name}@h"}, f"peer.{name}")
    assert lost == []
    assert Peer.objects.get(name="idle").status == "OFFLINE" and Peer.objects.get(name="busy").status == "TRAINING"


def test_silent_peers_are_marked_offline_and_reported(db):
    online("quiet", at=utcnow() - timedelta(seconds=30))
    online("busy")
    session = make_session(["quiet", "busy"])
    lost: list = []
    assert judging_monitor(lost).sweep() == ["quiet"]
    assert lost == [(str(session.id), "quiet", "went offline (no heartbeat for 10 s)")]
    assert Peer.objects.get(name="quiet").status == "OFFLINE" and Peer.objects.get(name="busy").status == "TRAINING"


def test_silence_is_not_judged_while_the_monitor_cannot_hear(db):
    """A broker outage: the monitor was disconnected, so a peer's silence is no evidence."""
    online("quiet", at=utcnow() - timedelta(seconds=30))
    make_session(["quiet"])
    lost: list = []
    clock = FrozenClock(utcnow() - timedelta(seconds=10))
    monitor = judging_monitor(lost, clock, reconnect_grace=30)
    monitor.blind()
    assert monitor.sweep() == [] and not monitor.judging()
    monitor.receiving()  # back: every peer gets the reconnection grace to show up again
    clock.advance(10 + 29)
    assert monitor.sweep() == [] and lost == []
    clock.advance(1)
    assert monitor.sweep() == ["quiet"] and len(lost) == 1


def test_silence_is_not_judged_while_events_wait_unread(db):
    """A burst fills a peer's queue of events: the events that show it alive may be in it."""
    online("quiet", at=utcnow() - timedelta(seconds=30))
    make_session(["quiet"])
    lost: list = []
    monitor = judging_monitor(lost)
    monitor.behind = lambda name: name == "quiet"
    assert monitor.sweep() == [] and lost == []
    monitor.behind = lambda name: False
    assert monitor.sweep() == ["quiet"] and len(lost) == 1


def test_silence_is_not_judged_while_the_monitor_has_events_it_has_not_read(db):
    """A busy monitor (its process starved it) holds unread what the broker sent it: the newest signs of life."""
    online("quiet", at=utcnow() - timedelta(seconds=30))
    make_session(["quiet"])
    lost: list = []
    monitor = judging_monitor(lost)
    assert monitor.sweep(caught_up=False) == [] and lost == []
    assert monitor.sweep(caught_up=True) == ["quiet"] and len(lost) == 1


def test_a_sweep_asks_about_a_bounded_number_of_silent_peers_the_longest_silent_first(db):
    """A monitor that fell behind sees many peers silent at once: asking the broker about each would hold it up
    further, so a sweep asks about a few, and the next sweeps about the rest."""
    from tasks.monitor import BEHIND_CHECKS

    names = [f"p{i:03d}" for i in range(BEHIND_CHECKS + 20)]
    for i, name in enumerate(names):
        online(name, at=utcnow() - timedelta(seconds=200 - i))
    asked: list[str] = []
    monitor = judging_monitor([])
    monitor.behind = lambda name: asked.append(name) or False
    first = monitor.sweep()
    assert asked == names[:BEHIND_CHECKS] and first == names[:BEHIND_CHECKS]
    assert monitor.sweep() == names[BEHIND_CHECKS:]  # the first sweep's are OFFLINE now: the rest's turn
    assert Peer.objects(name__in=names, status="OFFLINE").count() == len(names)


def test_tasks_past_their_deadline_are_reported_once(db):
    online("slow", "quick")
    clock = FrozenClock()
    session = make_session([])
    session.peers = [PeerRun(name="slow"), PeerRun(name="quick")]
    session.save()
    slow = assign(session, "slow", deadline=clock.now() - timedelta(seconds=1))
    quick = assign(session, "quick", deadline=clock.now() - timedelta(seconds=1))
    assign(session, "quick", round=1, deadline=clock.now() + timedelta(seconds=60))
    assignments.claim(quick, {"kind": "trained", "result": {}, "reason": None}, clock.now())  # it reported
    late: list = []
    monitor = Monitor(peer_timeout=10, clock=clock, overdue=lambda *args: late.append(args))
    monitor.sweep()
    monitor.sweep()
    assert late == [(str(session.id), [slow])]
    clock.advance(61)
    monitor.sweep()
    assert late[1:] == [(str(session.id), [task_id(session, "quick", 1)])]


def test_sweep_fails_sessions_past_their_deadline_or_never_started(db, settings):
    online("a", "b")
    late = make_session(["a"], deadline=utcnow() - timedelta(seconds=1))
    stuck = make_session(["b"], status=sessions.PENDING, created_at=utcnow() - timedelta(hours=1))
    fresh = make_session([], status=sessions.PENDING)
    from tasks.celery import create_app

    judging_monitor([], start_timeout=600, app=create_app(settings)).sweep()
    assert "deadline" in TrainingSession.objects.get(id=late.id).reason
    assert "no coordinator" in TrainingSession.objects.get(id=stuck.id).reason
    assert TrainingSession.objects.get(id=fresh.id).status == "PENDING"
    assert Peer.objects(status="TRAINING").count() == 0


def test_events_sent_while_the_monitor_is_down_are_applied_when_it_returns(db, settings):
    from tasks import peer as peer_app
    from tasks import protocol, registry
    from tasks.celery import create_app
    from tests import conftest

    app = create_app(settings)
    queue = f"test-monitor-{uuid.uuid4().hex[:8]}"
    name = f"a{conftest.RUN_ID}"
    enrolment = registry.add(name, settings).environment  # a real broker user when there is one
    conftest.PEER_USERS.append(protocol.broker_user(name, settings.broker_scope))
    peers.seen(name, f"peer.{name}@h")
    session = make_session([name])

    def run_consumer() -> tuple[EventConsumer, threading.Thread]:
        consumer = EventConsumer(app, Monitor(peer_timeout=60), queue, flush_every=0.05)
        thread = threading.Thread(target=consumer.run, daemon=True)
        thread.start()
        assert consumer.ready.wait(10)
        return consumer, thread

    consumer, thread = run_consumer()
    consumer.stop()
    thread.join(10)
    # The monitor is down: these go to its durable queue of the peer's events, stamped with the peer's own login.
    peer = peer_app.create_app(enrolment["BROKER_URL"], settings, enrolment["EVENT_EXCHANGE"])
    with peer.events.default_dispatcher(hostname=f"peer.{name}@h") as dispatcher:
        for epoch in range(1, 4):
            event = heartbeat(session, name, epoch)
            event.pop("type")
            event.pop("timestamp")
            dispatcher.send("task-heartbeat", **event)
    consumer, thread = run_consumer()
    try:
        wait_until(lambda: Heartbeat.objects(session_id=session.id).count() == 3, 10, "the queued heartbeats")
    finally:
        consumer.stop()
        thread.join(10)
        with app.connection_for_write() as connection:
            connection.default_channel.queue_delete(consumer.queue(name).name)


def test_a_peer_past_its_budget_is_read_no_more_and_a_removed_peers_queue_goes(db, settings, caplog):
    """Each peer's events wait in a queue of its own: one that sends past its budget is left unread there
    while another's are read at once; and once a peer is removed, the monitor deletes its queue."""
    from tasks import peer as peer_app
    from tasks import protocol, registry
    from tasks.celery import create_app
    from tasks.gate import Budget
    from tests import conftest

    app = create_app(settings)
    flooder, quiet = f"flood{conftest.RUN_ID}", f"quiet{conftest.RUN_ID}"
    logins = {name: registry.add(name, settings).environment for name in (flooder, quiet)}
    conftest.PEER_USERS.extend(protocol.broker_user(name, settings.broker_scope) for name in logins)
    consumer = EventConsumer(app, Monitor(peer_timeout=60), f"test-budget-{uuid.uuid4().hex[:8]}",
                             flush_every=0.05, sweep_every=0.2, prefetch=10, budget=Budget(rate=0.1, burst=5))
    thread = threading.Thread(target=consumer.run, daemon=True)
    thread.start()
    assert consumer.ready.wait(10)

    def send(name: str, count: int) -> None:
        enrolment = logins[name]
        peer = peer_app.create_app(enrolment["BROKER_URL"], settings, enrolment["EVENT_EXCHANGE"])
        with peer.events.default_dispatcher(hostname=f"peer.{name}@h") as dispatcher:
            for _ in range(count):
                dispatcher.send("worker-heartbeat", freq=2.0)

    def unread(name: str) -> int:
        with app.connection_for_write() as connection:
            return connection.default_channel.queue_declare(consumer.queue(name).name, passive=True).message_count

    try:
        send(flooder, 200)
        wait_until(lambda: consumer.monitor.dropped["over budget"] > 0, 10, "the flood to pass its budget")
        send(quiet, 1)
        wait_until(lambda: Peer.objects.get(name=quiet).last_seen is not None, 10, "the quiet peer's event")
        assert unread(quiet) == 0
        assert unread(flooder) > 100  # left where it is, for 50 s: the budget refills at 0.1/s
        assert consumer.monitor.dropped["over budget"] < 100
        registry.remove(quiet, settings)

        def gone() -> bool:
            try:
                unread(quiet)
            except Exception:
                return True
            return False

        wait_until(gone, 10, "the removed peer's queue to be deleted")
        with app.connection_for_write() as connection:
            if connection.transport.driver_type == "amqp":
                with pytest.raises(connection.channel_errors):  # its exchange is gone too
                    connection.default_channel.exchange_declare(
                        protocol.event_exchange(settings.event_exchange, quiet), "topic", passive=True)
        assert "lost its connection" not in caplog.text  # the monitor read on through all this
    finally:
        consumer.stop()
        thread.join(10)
        registry.remove(flooder, settings)
