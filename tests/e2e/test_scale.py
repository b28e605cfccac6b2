"""Many peers: a federated session of 200 simulated peers against the real broker, coordinator and monitor.

The peers (bench/simulated.py) are registered as any peer is, each with its own broker login, consume
their own queues, send real worker and heartbeat events and upload real (tiny) weight updates through
their grants; the platform cannot tell them from peer machines. bench/scale.py runs the same at 1,000.
"""

from __future__ import annotations

import json

import pytest

from harness.datasets import blobs_csv
from harness.simulated import Fleet, Options
from harness.waiting import wait_until
from models import Peer
from settings import Settings
from tests import conftest

pytestmark = pytest.mark.e2e

PEERS, ROUNDS, LOCAL_EPOCHS = 200, 2, 2


def test_two_hundred_simulated_peers_train_a_federated_session_and_every_heartbeat_is_stored(platform, tmp_path):
    names = [f"sim{conftest.RUN_ID}{i:03d}" for i in range(PEERS)]
    logins = {name: platform.register(name)["BROKER_URL"] for name in names}
    settings = Settings.from_env()
    fleet = Fleet(logins, Options(settings.event_exchange, settings.results_queue, epoch_seconds=0.05), processes=1)
    fleet.start()
    try:
        wait_until(lambda: Peer.objects(name__in=names, status="ONLINE").count() == PEERS, 120,
                   f"{PEERS} simulated peers ONLINE", interval=0.5)
        monitor = platform.monitor
        accepted, dropped = monitor.accepted, sum(monitor.dropped.values())
        user = platform.user()
        csv = blobs_csv(tmp_path / "blobs.csv", rows=3000, features=6, classes=3)
        # A deadline of the user's: 200 peers simulated in one process on a busy 2-core machine answer minutes
        # apart at worst, and the platform's own deadline (3x the fastest's pace, tests/e2e/test_chaos.py) would
        # rightly leave the slowest out; this test is about every peer's work arriving, not about stragglers.
        response = user.start(csv, num_peers=PEERS, mode="federated", rounds=ROUNDS, local_epochs=LOCAL_EPOCHS,
                              round_timeout=120,
                              hyperparameters=json.dumps({"learning_rate": 0.01, "batch_size": 16, "hidden": [8]}))
        assert response.status_code == 202, response.text
        session_id = response.json()["session_id"]
        session = user.wait_finished(session_id, timeout=240)

        assert session["status"] == "COMPLETED", session["reason"]
        # The platform claims free peers by their record: mostly the simulated ones, and the real peers other
        # tests left ONLINE (their record is better). Nothing may tell the two apart, so both are welcome; but
        # a real peer's trained update points elsewhere than 200 simulated ones, and screening may refuse it.
        chosen = sorted(p["name"] for p in session["peers"])
        assert len(chosen) == PEERS
        assert set(chosen) <= set(names) | set(platform.peers)
        simulated = sorted(set(chosen) & set(names))
        assert len(simulated) >= PEERS - len(platform.peers)
        for r in session["rounds"]:
            assert sorted(set(r["peers"]) & set(names)) == simulated and set(r["rejected"]) <= set(platform.peers), r
        assert len(session["rounds"]) == ROUNDS
        assert {p["status"] for p in session["peers"]} == {"COMPLETED"}
        # Every chosen simulated peer got its task in every round and answered it; the others got none.
        seen, failures = fleet.seen()
        assert all(failures[name] == [] for name in names), failures
        for name in names:
            rounds = sorted(t.round for t in seen[name] if t.session == session_id)
            assert rounds == (list(range(ROUNDS)) if name in chosen else []), (name, rounds)
        # Every heartbeat reached the monitor, which believed it (none dropped), and is stored.
        expected = PEERS * ROUNDS * LOCAL_EPOCHS
        wait_until(lambda: monitor.accepted - accepted >= expected, 30, "the monitor to take every heartbeat")
        assert monitor.accepted - accepted == expected
        assert sum(monitor.dropped.values()) == dropped, monitor.dropped
        beats = user.heartbeats(session_id)
        assert sorted((b["peer"], b["round"], b["epoch"]) for b in beats) == sorted(
            (name, r, e) for name in chosen for r in range(ROUNDS) for e in range(1, LOCAL_EPOCHS + 1))
    finally:
        fleet.stop()
        # They said goodbye (worker-offline): no later test can claim them.
        wait_until(lambda: Peer.objects(name__in=names, status__ne="OFFLINE").count() == 0, 60,
                   "the simulated peers OFFLINE")
