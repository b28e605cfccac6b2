"""Writes to a session announce it to this process's listeners (the API's polling cache listens)."""

from __future__ import annotations

import gc

from bson import ObjectId

from models import TrainingSession, changes
from models import session as sessions
from tests.models.test_session import make_session


class Listener:
    def __init__(self) -> None:
        self.heard: list[str] = []

    def on_change(self, session_id: str) -> None:
        self.heard.append(session_id)


def test_every_kind_of_session_write_is_announced(db):
    session = make_session()
    listener = Listener()
    changes.subscribe(listener.on_change)
    sid = session.id
    sessions.start_running(sid, {"a": "task-a", "b": "task-b"}, {}, deadline_seconds=60)
    sessions.record_progress(sid, "a", {"epoch": 1})
    sessions.add_bytes_fetched(sid, "a", 100)
    sessions.record_peer_result(sid, "a", "COMPLETED")
    sessions.finish(sid, "COMPLETED")
    session.reload()
    session.reason = "rewritten"
    session.save()
    assert listener.heard == [str(sid)] * 6


def test_a_write_that_matched_nothing_is_not_announced(db):
    session = make_session()
    listener = Listener()
    changes.subscribe(listener.on_change)
    sessions.finish(session.id, "FAILED")
    assert not sessions.finish(session.id, "COMPLETED")  # already ended: nothing changes
    assert not sessions.start_running(ObjectId(), {}, {}, deadline_seconds=60)
    assert listener.heard == [str(session.id)]


def test_a_failing_listener_neither_fails_the_write_nor_silences_the_others(db, caplog):
    class Broken:
        def on_change(self, session_id: str) -> None:
            raise RuntimeError("boom")

    session = make_session()
    broken, listener = Broken(), Listener()
    changes.subscribe(broken.on_change)
    changes.subscribe(listener.on_change)
    assert sessions.finish(session.id, "CANCELLED")
    assert listener.heard == [str(session.id)]
    assert "listener failed" in caplog.text


def test_listeners_are_not_kept_alive_by_subscribing(db):
    listener = Listener()
    changes.subscribe(listener.on_change)
    heard = listener.heard
    del listener
    gc.collect()
    sessions.finish(make_session().id, "FAILED")
    assert heard == []


def test_a_write_whose_filter_names_no_session_says_something_changed(db):
    session = make_session()
    listener = Listener()
    changes.subscribe(listener.on_change)
    assert TrainingSession.objects(status="PENDING", target="label").update(set__reason="swept") == 1
    assert listener.heard == [None]
    assert TrainingSession.objects.get(id=session.id).reason == "swept"
