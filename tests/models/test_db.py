"""The embedded mode's database (mongomock) shared by threads: conditional updates stay atomic."""

from __future__ import annotations

import sys
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import mongoengine
import pytest
from bson import ObjectId

import models
from models import Peer, PeerRun, TrainingSession
from models import peer as peers
from models import session as sessions
from models.session import Dataset

THREADS, ROUNDS, PEERS = 6, 60, 12


@contextmanager
def connected(client_class: Callable[..., object] | None) -> Iterator[None]:
    """The documents on a fresh mongomock database: through models.connect, or a plain client of `client_class`."""
    name = f"race-{uuid.uuid4().hex[:8]}"
    if client_class is None:
        models.connect(f"mongomock://localhost/{name}")
    else:
        mongoengine.connect(db=name, host="mongodb://localhost", mongo_client_class=client_class,
                            uuidRepresentation="standard")
    try:
        yield
    finally:
        mongoengine.get_connection().drop_database(name)
        mongoengine.disconnect()


@contextmanager
def switching_often() -> Iterator[None]:
    # The GIL hands over every microsecond instead of every 5 ms: the rare interleavings become common.
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(before)


def race() -> tuple[int, list[str]]:
    """THREADS sessions claim peers at once, ROUNDS times, while others update and read a session.

    Returns how many times one peer was claimed by two sessions at once, and the errors raised."""
    for i in range(PEERS):
        peers.register(f"p{i}")
        peers.seen(f"p{i}", f"peer.p{i}@h")
    session = TrainingSession(owner_id=ObjectId(), target="y", status=sessions.RUNNING,
                              dataset=Dataset(filename="d.csv", url="file:///d", bytes=1, sha256="0" * 64, rows=1,
                                              columns=1),
                              peers=[PeerRun(name=f"p{i}", status=sessions.RUNNING) for i in range(PEERS)]).save()
    barrier = threading.Barrier(THREADS + 2, timeout=60)
    claimed: list[list[list[str]]] = [[[] for _ in range(THREADS)] for _ in range(ROUNDS)]
    errors: list[str] = []

    def attempt(action: Callable[[], object]) -> object:
        try:
            return action()
        except Exception as exc:  # counted, and the race goes on
            errors.append(f"{type(exc).__name__}: {exc}")
            return None

    def claimer(t: int) -> None:
        owner = ObjectId()
        for r in range(ROUNDS):
            barrier.wait()
            claimed[r][t] = attempt(lambda: peers.claim(owner, PEERS // THREADS)) or []
            barrier.wait()
            if t == 0:
                attempt(lambda: Peer.objects.update(set__status=peers.ONLINE, unset__session_id=True))

    def progress() -> None:  # the monitor: a peer's latest epoch on the session, as heartbeats arrive
        for r in range(ROUNDS):
            barrier.wait()
            for i in range(PEERS):
                attempt(lambda i=i, r=r: sessions.record_progress(session.id, f"p{i}", {"epoch": r}))
            barrier.wait()

    def reader() -> None:  # the API or the coordinator reading the session while it changes
        for _ in range(ROUNDS):
            barrier.wait()
            for _ in range(PEERS):
                attempt(lambda: TrainingSession.objects(id=session.id).first())
            barrier.wait()

    threads = [threading.Thread(target=claimer, args=(t,)) for t in range(THREADS)]
    threads += [threading.Thread(target=progress), threading.Thread(target=reader)]
    with switching_often():
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
    twice = sum(sum(n > 1 for n in Counter(name for names in by_thread for name in names).values())
                for by_thread in claimed)
    return twice, errors


def test_threads_sharing_mongomock_never_claim_one_peer_twice():
    with connected(None):
        twice, errors = race()
    assert errors == []
    assert twice == 0


def test_without_the_lock_the_same_race_claims_peers_twice():
    # The probe above can fail: on a plain mongomock client the same threads do claim a peer twice.
    import mongomock

    with connected(mongomock.MongoClient):
        twice, errors = race()
    assert twice > 0 or errors, "the race did not show: the probe would not catch a regression"


@pytest.mark.usefixtures("db")
def test_cursors_and_snapshots_work_through_the_lock(tmp_path):
    for i in range(3):
        peers.register(f"p{i}")
    assert list(Peer.objects.order_by("name").scalar("name")) == ["p0", "p1", "p2"]
    assert [p.name for p in Peer.objects.order_by("-name").skip(1).limit(1)] == ["p1"]
    assert Peer.objects.count() == 3 and models.db.is_mock()
    assert models.db.save_snapshot(tmp_path) == 3


# A process writing as `make run`'s platform does, with the journal it keeps; it prints what it has written.
WRITER = """
import sys, time
import models
from models import db
from models import heartbeat as heartbeats
from models import peer as peers

models.connect("mongomock://localhost/journal")
journal = db.Journal(sys.argv[1], float(sys.argv[2]))
journal.start()
peers.register("p0")
for i in range(1, 1_000_000):
    heartbeats.insert_many([{"session_id": db.bson.ObjectId("0" * 24), "peer": "p0", "round": 0, "epoch": i,
                             "loss": 0.5}])
    peers.Peer.objects(name="p0").update_one(set__accepted=i)
    print(i, flush=True)
    time.sleep(0.002)
"""


def test_a_hard_kill_loses_at_most_the_last_interval(tmp_path):
    import signal
    import subprocess
    import time

    from harness.waiting import wait_until
    from models import Heartbeat
    from settings import ROOT

    interval = 0.25
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path / "kept"), str(interval)], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    written: list[tuple[float, int]] = []  # (when it was printed, how many were written by then)

    def read() -> bool:
        written.append((time.monotonic(), int(writer.stdout.readline())))
        return written[-1][0] - written[0][0] >= 4 * interval + 0.5  # several flushes in

    try:
        wait_until(read, 60, "the writer to write", interval=0)
        killed = time.monotonic()
        writer.send_signal(signal.SIGKILL)
    finally:
        writer.kill()
        writer.wait(10)
        writer.stdout.close()
    # Everything written an interval (and a margin for the flush itself) before the kill is there.
    safe = max(count for at, count in written if at <= killed - interval - 0.5)
    with connected(None):
        assert models.db.load_snapshot(tmp_path / "kept") > 0
        epochs = sorted(Heartbeat.objects.scalar("epoch"))
        assert epochs[:safe] == list(range(1, safe + 1)) and epochs == list(range(1, len(epochs) + 1))
        assert Peer.objects.get(name="p0").accepted >= safe  # the changed documents too, not only the inserted


def test_the_journal_appends_inserts_rewrites_changes_and_drops_a_torn_end(tmp_path):
    from models import Heartbeat

    with connected(None):
        wrote(tmp_path)
    with (tmp_path / "heartbeats.bson").open("ab") as out:
        out.write(b"\x40\x00\x00\x00\x02torn")  # a hard kill in the middle of an append
    with connected(None):
        models.db.load_snapshot(tmp_path)
        assert sorted(Heartbeat.objects.scalar("epoch")) == [1, 2, 3]  # the repeated epoch 2 once, the torn end gone
        assert Peer.objects.get(name="p0").accepted == 3 and Peer.objects.get(name="p0").hostname == "after"
        assert Peer.objects(name="gone").count() == 0


def wrote(directory) -> None:
    from models import heartbeat as heartbeats

    journal = models.db.Journal(directory, interval=0)  # flushed by hand
    journal.start()
    try:
        peer = peers.register("p0")
        session = ObjectId()
        heartbeats.insert_many([{"session_id": session, "peer": "p0", "round": 0, "epoch": e} for e in (1, 2)])
        journal.flush()

        def inodes() -> dict[str, int]:
            return {name: (directory / f"{name}.bson").stat().st_ino for name in ("heartbeats", "peers")}

        before = inodes()
        heartbeats.insert_many([{"session_id": session, "peer": "p0", "round": 0, "epoch": e} for e in (2, 3)])
        Peer.objects(id=peer.id).update_one(inc__accepted=2)  # named by its id: its new version is appended
        peers.count("p0", accepted=1)  # by name: the document it matched is appended too
        journal.flush()
        assert inodes() == before  # appended to, not written again
        peers.register("gone")
        Peer.objects(name="gone").delete()  # a delete: the collection is written whole, beside its file
        journal.flush()
        assert inodes()["peers"] != before["peers"] and inodes()["heartbeats"] == before["heartbeats"]
        Peer.objects(id=peer.id).update_one(set__hostname="after")
    finally:
        journal.stop()


def test_a_write_that_fails_is_made_good_by_the_next(tmp_path, monkeypatch):
    from models import Heartbeat
    from models import heartbeat as heartbeats

    with connected(None):
        journal = models.db.Journal(tmp_path, interval=0)
        journal.start()
        try:
            heartbeats.insert_many([{"session_id": ObjectId(), "peer": "p0", "round": 0, "epoch": 1}])
            def full(*args, **kwargs):
                raise OSError(28, "No space left on device")

            monkeypatch.setattr(models.db.Path, "open", full)
            with pytest.raises(OSError):
                journal.flush()
            monkeypatch.undo()
            heartbeats.insert_many([{"session_id": ObjectId(), "peer": "p0", "round": 0, "epoch": 2}])
        finally:
            journal.stop()
    with connected(None):
        models.db.load_snapshot(tmp_path)
        assert sorted(Heartbeat.objects.scalar("epoch")) == [1, 2]
