"""Asynchronous federated sessions: a peer five times slower than the others holds nobody up.

Simulated peers (bench/simulated.py: each a registered peer with its own login and queue, real events
and real uploads through its grants) against the real broker, coordinator and monitor; one of them
takes five times as long per epoch.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime

import pytest

from harness.datasets import blobs_csv
from harness.simulated import Fleet, Options
from harness.waiting import wait_until
from models import Peer
from models import peer as peers
from settings import Settings
from tests import conftest

pytestmark = pytest.mark.e2e

SIMULATED, LOCAL_EPOCHS, EPOCH_SECONDS, SLOWDOWN = 4, 2, 0.1, 5.0


def when(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


REGISTERED: set[str] = set()  # every simulated peer this module registered


@contextmanager
def simulated(platform, names: list[str], **options) -> Iterator[Fleet]:
    """Simulated peers `names`, registered and ONLINE; OFFLINE again afterwards (no later test claims them)."""
    settings = Settings.from_env()
    # The real peers other tests left free are set aside (quarantined, as an operator would) while these
    # sessions run: a real peer's trained update and the simulated peers' small steps point different ways,
    # and screening would refuse whichever are fewer in a fold.
    REGISTERED.update(names)
    aside = [p.name for p in Peer.objects(status="ONLINE", name__nin=list(REGISTERED))]
    Peer.objects(name__in=aside).update(set__status=peers.QUARANTINED)
    fleet = Fleet({name: platform.register(name)["BROKER_URL"] for name in names},
                  Options(settings.event_exchange, settings.results_queue, **options), processes=1)
    fleet.start()
    try:
        wait_until(lambda: Peer.objects(name__in=names, status="ONLINE").count() == len(names), 60,
                   f"peers {names} ONLINE")
        yield fleet
    finally:
        fleet.stop()
        wait_until(lambda: Peer.objects(name__in=names, status__ne="OFFLINE").count() == 0, 60,
                   f"peers {names} OFFLINE")
        for name in aside:
            peers.restore(name)
        wait_until(lambda: Peer.objects(name__in=aside, status="ONLINE").count() == len(aside), 30,
                   f"peers {aside} back")


def peers_to_ask(names: list[str]) -> int:
    """`names` and any other simulated peer still free: the platform claims whichever it saw last."""
    return len(names) + Peer.objects(status="ONLINE", name__nin=names).count()


def test_a_slow_peer_never_blocks_the_others_and_its_stale_updates_count_less(platform, tmp_path):
    names = [f"async{conftest.RUN_ID}{i}" for i in range(SIMULATED)]
    slow = names[0]
    with simulated(platform, names, epoch_seconds=EPOCH_SECONDS, slowdown={slow: SLOWDOWN}) as fleet:
        num_peers = peers_to_ask(names)
        monitor = platform.monitor
        dropped = sum(monitor.dropped.values())
        user = platform.user()
        csv = blobs_csv(tmp_path / "blobs.csv", rows=1200, features=4, classes=3)
        response = user.start(csv, num_peers=num_peers, mode="federated", schedule="async", buffer_size=2,
                              rounds=6, local_epochs=LOCAL_EPOCHS,
                              hyperparameters=json.dumps({"learning_rate": 0.05, "batch_size": 32, "hidden": [8]}))
        assert response.status_code == 202, response.text
        session_id = response.json()["session_id"]
        session = user.wait_finished(session_id, timeout=180)
        assert session["status"] == "COMPLETED", session["reason"]

        tasks = user.get(f"/sessions/{session_id}/updates").json()["items"]
        versions = user.get(f"/sessions/{session_id}/rounds").json()["items"]
        # The budget: rounds x peers tasks in all (the same peer-epochs as 6 synchronous rounds), every one folded.
        assert len(tasks) == 6 * num_peers
        assert {t["status"] for t in tasks} == {"FOLDED"}, [t for t in tasks if t["status"] != "FOLDED"]
        assert sorted(t["seq"] for t in tasks) == list(range(len(tasks)))
        assert [v["round"] for v in versions] == list(range(len(versions)))
        assert sum(len(v["updates"]) for v in versions) == len(tasks)
        assert all(v["metrics"]["val_accuracy"] is not None for v in versions)

        done = {name: [t for t in tasks if t["peer"] == name] for name in names}
        # Never held up: while the slow peer trained its first task, the others' updates made versions,
        # and each of them did more tasks than it did.
        first_slow = done[slow][0]
        during = [v for v in versions if when(first_slow["dispatched_at"]) < when(v["finished_at"])
                  < when(first_slow["received_at"])]
        assert len(during) >= 2, (first_slow, [v["finished_at"] for v in versions])
        assert all(len(done[name]) > len(done[slow]) for name in names[1:]), {n: len(d) for n, d in done.items()}
        # Its updates count less: they are older (staleness) than the fast peers', so weighted down.
        assert all(t["staleness"] >= 1 and t["weight"] < 1 for t in done[slow]), done[slow]
        fast = [t for name in names[1:] for t in done[name]]
        mean = lambda items, key: sum(t[key] for t in items) / len(items)  # noqa: E731
        assert mean(done[slow], "weight") < mean(fast, "weight")
        assert mean(done[slow], "staleness") > mean(fast, "staleness")
        assert all(t["weight"] == pytest.approx((1 + t["staleness"]) ** -0.5, abs=1e-4) for t in tasks)

        # Every task's epochs are stored as heartbeats (its `round` is the task's number), none was refused.
        seen, failures = fleet.seen()
        assert all(failures[name] == [] for name in names), failures
        beats = user.heartbeats(session_id)
        assert sorted((b["peer"], b["round"], b["epoch"]) for b in beats) == sorted(
            (t["peer"], t["seq"], e) for t in tasks for e in range(1, LOCAL_EPOCHS + 1))
        assert sum(monitor.dropped.values()) == dropped, monitor.dropped
        # The result is the last version, and every peer was released.
        assert session["results"]["schedule"] == "async"
        assert session["results"]["versions"] == len(versions)
        assert user.get(f"/sessions/{session_id}/model").status_code == 200
        wait_until(lambda: Peer.objects(name__in=names, status="ONLINE").count() == SIMULATED, 30,
                   "the peers free again")


def test_a_time_budget_ends_the_session_with_what_was_trained_by_then(platform, tmp_path, record_property):
    names = [f"asyncbudget{conftest.RUN_ID}{i}" for i in range(2)]
    with simulated(platform, names, epoch_seconds=0.2):
        num_peers = peers_to_ask(names)
        user = platform.user()
        csv = blobs_csv(tmp_path / "blobs.csv", rows=400, features=4, classes=2)
        response = user.start(csv, num_peers=num_peers, mode="federated", schedule="async", max_updates=10_000,
                              time_budget=3, local_epochs=1, hyperparameters=json.dumps({"hidden": [8]}))
        assert response.status_code == 202, response.text
        session_id = response.json()["session_id"]
        session = user.wait_finished(session_id, timeout=60)
        assert session["status"] == "COMPLETED", session["reason"]
        tasks = user.get(f"/sessions/{session_id}/updates").json()["items"]
        # Far fewer than the 10,000 allowed: none was handed out after the budget; each one out then was
        # answered and folded.
        assert num_peers <= len(tasks) < 100 and {t["status"] for t in tasks} == {"FOLDED"}
        started = when(session["started_at"])
        assert all((when(t["dispatched_at"]) - started).total_seconds() < 3 for t in tasks)
        record_property("seconds from start to COMPLETED (time_budget 3 s)",
                        (when(session["finished_at"]) - started).total_seconds())
        assert session["results"]["versions"] == len(session["rounds"]) >= 1


def test_a_cancelled_asynchronous_session_shows_no_task_still_training(platform, tmp_path):
    names = [f"asynccancel{conftest.RUN_ID}{i}" for i in range(2)]
    with simulated(platform, names, epoch_seconds=1.0):
        num_peers = peers_to_ask(names)
        user = platform.user()
        csv = blobs_csv(tmp_path / "blobs.csv", rows=400, features=4, classes=2)
        session_id = user.start(csv, num_peers=num_peers, mode="federated", schedule="async", local_epochs=3,
                                hyperparameters=json.dumps({"hidden": [8]})).json()["session_id"]
        wait_until(lambda: user.get(f"/sessions/{session_id}/updates").json()["items"], 30, "tasks handed out")
        assert user.post(f"/sessions/{session_id}/cancel").status_code == 202
        session = user.wait_finished(session_id, timeout=30)
        assert session["status"] == "CANCELLED"
        tasks = user.get(f"/sessions/{session_id}/updates").json()["items"]
        assert tasks and all(t["status"] == "LOST" and "ended CANCELLED" in t["reason"] for t in tasks
                             if t["status"] not in ("FOLDED", "BUFFERED")), tasks
        wait_until(lambda: Peer.objects(name__in=names, status="ONLINE").count() == 2, 30, "the peers free again")


def test_a_peer_killed_mid_task_is_left_out_and_its_share_of_the_budget_goes_to_the_others(platform, tmp_path):
    names = [f"asyncdead{conftest.RUN_ID}{i}" for i in range(3)]
    doomed = f"asyncdead{conftest.RUN_ID}x"
    # The doomed one alone in its process, twice as slow: it is still training when it is killed.
    with (simulated(platform, names, epoch_seconds=0.4),
          simulated(platform, [doomed], epoch_seconds=0.4, slowdown={doomed: 2.0}) as dying):
        num_peers = peers_to_ask([*names, doomed])
        user = platform.user()
        csv = blobs_csv(tmp_path / "blobs.csv", rows=600, features=4, classes=2)
        response = user.start(csv, num_peers=num_peers, mode="federated", schedule="async", rounds=5,
                              local_epochs=2, min_peers=num_peers - 1,
                              hyperparameters=json.dumps({"hidden": [8]}))
        assert response.status_code == 202, response.text
        session_id = response.json()["session_id"]
        wait_until(lambda: any(t.session == session_id for t in dying.seen()[0][doomed]), 30,
                   "the doomed peer to take its task")
        dying.kill()

        session = user.wait_finished(session_id, timeout=120)
        assert session["status"] == "COMPLETED", session["reason"]
        run = next(p for p in session["peers"] if p["name"] == doomed)
        assert run["status"] == "FAILED" and "offline" in run["error"], run
        tasks = user.get(f"/sessions/{session_id}/updates").json()["items"]
        lost = [t for t in tasks if t["status"] == "LOST"]
        assert [t["peer"] for t in lost] == [doomed] and "offline" in lost[0]["reason"]
        # The whole budget was trained all the same: its lost task was handed to a live peer.
        assert sum(t["status"] == "FOLDED" for t in tasks) == 5 * num_peers, [
            (t["peer"], t["status"], t.get("reason")) for t in tasks]
        assert {t["status"] for t in tasks} == {"FOLDED", "LOST"}
        versions = user.get(f"/sessions/{session_id}/rounds").json()["items"]
        assert any(when(v["finished_at"]) > when(lost[0]["received_at"]) for v in versions), "it went on"


def test_a_peer_that_sends_bad_weights_spoils_only_its_own_updates(platform, tmp_path):
    """Its weights are read where the coordinator's plan puts them, and checked, when they would be folded."""
    names = [f"asyncspoil{conftest.RUN_ID}{i}" for i in range(3)]
    spoiler = names[0]
    with simulated(platform, names, epoch_seconds=0.1, spoil=frozenset({spoiler})):
        num_peers = peers_to_ask(names)
        user = platform.user()
        csv = blobs_csv(tmp_path / "blobs.csv", rows=600, features=4, classes=2)
        response = user.start(csv, num_peers=num_peers, mode="federated", schedule="async", rounds=3,
                              local_epochs=1, hyperparameters=json.dumps({"hidden": [8]}))
        assert response.status_code == 202, response.text
        session_id = response.json()["session_id"]
        session = user.wait_finished(session_id, timeout=60)
        assert session["status"] == "COMPLETED", session["reason"]
        tasks = user.get(f"/sessions/{session_id}/updates").json()["items"]
        spoiled = [t for t in tasks if t["peer"] == spoiler]
        assert spoiled and all(t["status"] == "REJECTED" and "NaN" in t["reason"] for t in spoiled), spoiled
        assert {t["status"] for t in tasks if t["peer"] != spoiler} == {"FOLDED"}
        versions = session["rounds"]
        assert all(spoiler not in v["peers"] for v in versions)
        assert any(v["rejected"] for v in versions)
        assert session["results"]["final"]["val_accuracy"] is not None
