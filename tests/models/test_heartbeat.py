"""Heartbeats are stored once each, however often they arrive."""

from __future__ import annotations

from datetime import datetime

from bson import ObjectId

from models import Heartbeat
from models.heartbeat import insert_many


def beats(session, peer, epochs, round=0):
    return [{"session_id": session, "peer": peer, "round": round, "epoch": e, "epochs": epochs, "loss": 1.0 / e}
            for e in range(1, epochs + 1)]


def test_writing_a_heartbeat_twice_is_harmless(db):
    session = ObjectId()
    assert insert_many(beats(session, "a", 3)) == 3
    assert insert_many(beats(session, "a", 3) + beats(session, "b", 2)) == 2
    assert Heartbeat.objects(session_id=session).count() == 5
    stored = Heartbeat.objects(session_id=session, peer="a", epoch=2).get()
    assert (stored.loss, stored.epochs, stored.round, stored.accuracy) == (0.5, 3, 0, None)
    stored.validate()  # what insert_many writes directly is what the document declares


def test_rounds_are_distinct_heartbeats(db):
    session = ObjectId()
    assert insert_many(beats(session, "a", 2, round=0) + beats(session, "a", 2, round=1)) == 4
    assert insert_many([]) == 0


def test_a_heartbeat_from_a_returned_history_keeps_when_the_peer_sent_it(db):
    # The coordinator stores a peer's history when the monitor has not (yet) stored its events: the
    # epoch's end time the trainer recorded becomes sent_at, as the event's would have.
    session = ObjectId()
    insert_many([{**beats(session, "a", 1)[0], "finished_at": 1_800_000_000.25}])
    stored = Heartbeat.objects(session_id=session).get()
    assert stored.sent_at == datetime(2027, 1, 15, 8, 0, 0, 250000)
    from models import event as events

    [event] = events.after(session, 0)
    assert event["data"]["sent_at"] == "2027-01-15T08:00:00.250+00:00"
