"""An asynchronous session's updates move once each: dispatched, then buffered/rejected/lost, then folded."""

from __future__ import annotations

from bson import ObjectId

from models import update as updates


def task(seq: int, peer: str, base: int = 0) -> dict:
    return {"seq": seq, "peer": peer, "task_id": f"s:{seq}:{peer}", "base_version": base}


def test_an_update_is_received_once_and_folded_once(db):
    session = ObjectId()
    updates.dispatched(session, [task(0, "a"), task(1, "b")])
    assert updates.settle(session, 0, updates.BUFFERED, samples=10, metrics={"loss": 0.5})
    assert not updates.settle(session, 0, updates.REJECTED, reason="late")  # a redelivered result
    assert [u.seq for u in updates.buffered(session)] == [0]
    updates.folded(session, 0, version=1, staleness=0, weight=1.0)
    updates.folded(session, 0, version=2, staleness=1, weight=0.7)  # a second fold finds it folded
    first = updates.of_task(session, 0)
    assert (first.status, first.version, first.staleness, first.samples) == (updates.FOLDED, 1, 0, 10)
    assert updates.count(session, updates.TRAINING) == 1 and updates.buffered(session) == []


def test_a_task_number_is_taken_once_per_session(db):
    session = ObjectId()
    updates.dispatched(session, [task(0, "a")])
    updates.dispatched(session, [task(0, "b")])  # a dispatch run again: the first record stands
    assert updates.of_task(session, 0).peer == "a" and updates.for_session(session).count() == 1
    updates.dispatched(ObjectId(), [task(0, "b")])  # another session's own numbering
    assert [u.seq for u in updates.unsent(session)] == [0]
    updates.mark_sent(session, [0])
    assert updates.unsent(session) == []


def test_what_a_peer_was_handed_after_a_task_and_what_is_given_up(db):
    session = ObjectId()
    updates.dispatched(session, [task(0, "a"), task(1, "b"), task(2, "a", base=1)])
    assert updates.sent_after(session, "a", 0) and not updates.sent_after(session, "a", 2)
    assert not updates.sent_after(session, "b", 1)
    assert updates.lose_training(session, "a", "went offline") == 2
    assert updates.of_task(session, 2).reason == "went offline"
    assert not updates.settle(session, 2, updates.BUFFERED)  # a late result of a lost task
    assert updates.give_up_all(session, "the session ended CANCELLED") == 1
    assert {u.status for u in updates.for_session(session)} == {updates.LOST}
    assert [u.seq for u in updates.for_session(session)] == [0, 1, 2]
