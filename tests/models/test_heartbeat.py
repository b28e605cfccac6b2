"""Heartbeats are stored once each, however often they arrive."""

from __future__ import annotations

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
