"""Sessions survive what real machines do: peers killed or frozen, stops, messages delivered twice.

Each failure is made with real processes on the real broker (kill -9, SIGSTOP), each wait has a
deadline, and the peers' logs are read for tracebacks afterwards.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import pytest

from harness.waiting import wait_until
from tasks.protocol import TaskId

pytestmark = pytest.mark.e2e

FEDERATED = {"mode": "federated", "hyperparameters": json.dumps({"learning_rate": 0.003, "batch_size": 32,
                                                                  "hidden": [64]})}


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def test_a_federated_session_goes_on_when_a_peer_is_killed_and_min_peers_allows(platform, two_peers, digits_csv,
                                                                                unique):
    victim = unique("killed")
    platform.start_peers(victim)
    user = platform.user()
    response = user.start(digits_csv, num_peers=3, rounds=40, local_epochs=3, min_peers=2, **FEDERATED)
    assert response.status_code == 202, response.text
    session_id = response.json()["session_id"]
    wait_until(lambda: len(user.heartbeats(session_id, peer=victim)) >= 2, 60, "the victim to be training")
    platform.kill_peer(victim)
    session = user.wait_finished(session_id, timeout=180)
    assert session["status"] == "COMPLETED", (session["reason"], session["peers"])
    by_peer = {p["name"]: p for p in session["peers"]}
    assert by_peer[victim]["status"] == "FAILED" and "went offline" in by_peer[victim]["error"]
    assert all(by_peer[p]["status"] == "COMPLETED" for p in two_peers)
    assert len(session["rounds"]) == 40 and victim not in session["rounds"][-1]["peers"]
    assert session["rounds"][-1]["metrics"]["val_accuracy"] > 0.85


def test_a_frozen_peer_is_left_out_at_the_round_deadline_and_its_late_result_ignored(platform, two_peers,
                                                                                     digits_csv, unique, caplog):
    stalled = unique("frozen")
    platform.start_peers(stalled)
    try:
        frozen_peer_is_left_out(platform, two_peers, digits_csv, stalled, caplog)
    finally:
        platform.stop_peer(stalled)


def frozen_peer_is_left_out(platform, two_peers, digits_csv, stalled, caplog):
    user = platform.user()
    response = user.start(digits_csv, num_peers=3, rounds=3, local_epochs=2, min_peers=2, round_timeout=8,
                          **FEDERATED)
    assert response.status_code == 202, response.text
    session_id = response.json()["session_id"]
    wait_until(lambda: user.heartbeats(session_id, peer=stalled), 60, "the peer to be training")
    # Freeze its training process only: the worker itself still beats, so the peer looks alive.
    pool = children(platform.peers[stalled].process.pid)
    assert pool, "the peer's pool process"
    for pid in pool:
        os.kill(pid, signal.SIGSTOP)
    try:
        session = user.wait_finished(session_id, timeout=90)
    finally:
        for pid in pool:
            os.kill(pid, signal.SIGCONT)
    assert session["status"] == "COMPLETED", (session["reason"], session["peers"])
    by_peer = {p["name"]: p for p in session["peers"]}
    assert by_peer[stalled]["status"] == "FAILED" and "within its 8 s" in by_peer[stalled]["error"]
    # Left out from the round it froze in on: the rounds after it go on without it.
    took_part = [stalled in r["peers"] for r in session["rounds"]]
    assert len(took_part) == 3 and not took_part[-1] and took_part == sorted(took_part, reverse=True)
    # Thawed, it finishes its round and reports; the collector drops the result, the session is unchanged.
    wait_until(lambda: f"task {by_peer[stalled]['name']}" in caplog.text or "already reported" in caplog.text, 60,
               "the thawed peer's late result to be dropped")
    assert user.session(session_id) == session


def test_cancelling_ends_every_task_without_an_exception(platform, two_peers, digits_csv, record_property):
    user = platform.user()
    long = json.dumps({"learning_rate": 0.001, "epochs": 1000, "hidden": [64]})
    session_id = user.start(digits_csv, num_peers=2, hyperparameters=long).json()["session_id"]
    wait_until(lambda: len(user.heartbeats(session_id)) >= 4, 60, "both peers to be training")
    marks = {name: platform.peers[name].log_path.stat().st_size for name in two_peers}
    cancelled = time.monotonic()
    assert user.post(f"/sessions/{session_id}/cancel").status_code == 202
    assert user.wait_finished(session_id, timeout=10)["status"] == "CANCELLED"

    def stopped(name: str) -> bool:
        said = platform.peers[name].log_path.read_bytes()[marks[name]:].decode(errors="replace")
        return f"session {session_id}: peer {name} stopped after epoch " in said

    # A stop notice reaches a peer within a second (1,000 epochs would take minutes): 10 s is generous.
    wait_until(lambda: all(stopped(n) for n in two_peers), 10, "both tasks to end")
    record_property("seconds from cancel to both tasks ended", round(time.monotonic() - cancelled, 2))
    for name in two_peers:
        tail = platform.peers[name].log_path.read_bytes()[marks[name]:].decode(errors="replace")
        assert "Traceback" not in tail and "raised" not in tail and "ERROR" not in tail, tail


@contextmanager
def first_sent(task: str) -> Iterator[list[tuple]]:
    """The arguments of the first `task` message the platform sends while inside (to send it again)."""
    from celery.signals import before_task_publish

    sent: list[tuple] = []

    def capture(sender=None, body=None, headers=None, **_):
        if sender == task and not sent:
            sent.append(body[0])

    before_task_publish.connect(capture, weak=False)
    try:
        yield sent
    finally:
        before_task_publish.disconnect(capture)


def test_an_aggregate_delivered_twice_records_its_round_once(platform, two_peers, digits_csv):
    """A redelivered `aggregate` (its coordinator died after running it) must not record a round twice
    or launch the next round a second time."""
    app = platform.celery

    with first_sent("peertrain.aggregate") as sent:
        user = platform.user()
        session_id = user.start(digits_csv, num_peers=2, rounds=4, local_epochs=1, **FEDERATED).json()["session_id"]
        wait_until(lambda: sent, 60, "round 0's aggregate to be sent")
        wait_until(lambda: len(user.session(session_id)["rounds"]) >= 1, 60, "round 0 to be recorded")
        app.send_task("peertrain.aggregate", args=list(sent[0]), queue=app.conf.task_default_queue)
        session = user.wait_finished(session_id, timeout=120)
    assert session["status"] == "COMPLETED", (session["reason"], session["peers"])
    assert [r["round"] for r in session["rounds"]] == [0, 1, 2, 3]
    for peer in two_peers:
        assert [(b["round"], b["epoch"]) for b in user.heartbeats(session_id, peer=peer)] == [
            (r, 1) for r in range(4)]


def test_an_asynchronous_update_delivered_twice_hands_its_peer_one_next_task(platform, two_peers, digits_csv):
    """A redelivered `update` (its coordinator died after running it) must not buffer the update twice or
    give the peer a second task at once (its first would never be answered: the session would hang)."""
    app = platform.celery

    with first_sent("peertrain.update") as sent:
        user = platform.user()
        session_id = user.start(digits_csv, num_peers=2, schedule="async", max_updates=8, local_epochs=1,
                                **FEDERATED).json()["session_id"]
        wait_until(lambda: sent, 60, "the first update to be sent")
        seq = TaskId.parse(sent[0][1]).round

        def acted_on():
            tasks = user.get(f"/sessions/{session_id}/updates").json()["items"]
            peer = tasks[seq]["peer"]
            return tasks[seq]["status"] != "TRAINING" and any(t["peer"] == peer and t["seq"] > seq for t in tasks)

        wait_until(acted_on, 60, "the first update to be taken and its peer given its next task")
        app.send_task("peertrain.update", args=list(sent[0]), queue=app.conf.task_default_queue)
        session = user.wait_finished(session_id, timeout=120)
    assert session["status"] == "COMPLETED", (session["reason"], session["peers"])
    tasks = user.get(f"/sessions/{session_id}/updates").json()["items"]
    assert len(tasks) == 8 and {t["status"] for t in tasks} == {"FOLDED"}
    assert sum(len(r["updates"]) for r in session["rounds"]) == 8  # each folded once
    for peer in two_peers:  # one task at a time: each handed out after the one before was answered
        mine = [t for t in tasks if t["peer"] == peer]
        assert all(a["received_at"] <= b["dispatched_at"] for a, b in zip(mine, mine[1:], strict=False)), mine


def test_an_asynchronous_session_goes_on_when_its_fold_lease_was_left_by_a_dead_coordinator(platform, two_peers,
                                                                                            digits_csv, monkeypatch):
    from models import TrainingSession, utcnow
    from tasks.asynchronous import AsyncFederated

    monkeypatch.setattr(AsyncFederated, "lease", timedelta(seconds=3))
    user = platform.user()
    session_id = user.start(digits_csv, num_peers=2, schedule="async", max_updates=8, local_epochs=1,
                            **FEDERATED).json()["session_id"]
    wait_until(lambda: user.session(session_id)["rounds"], 60, "a first version")
    # A coordinator took the lease to fold, then died: nobody lets go of it.
    left = utcnow()
    TrainingSession.objects(id=session_id).update_one(set__asynchronous__folding=left)
    session = user.wait_finished(session_id, timeout=90)
    assert session["status"] == "COMPLETED", (session["reason"], session["peers"])
    tasks = user.get(f"/sessions/{session_id}/updates").json()["items"]
    assert len(tasks) == 8 and {t["status"] for t in tasks} == {"FOLDED"}
    # Folds waited for the lease to expire, then went on.
    later = [r for r in session["rounds"] if r["finished_at"] > left.isoformat()]
    assert later, session["rounds"]


def test_a_sweep_with_a_quorum_completes_with_the_peers_that_finished(platform, two_peers, digits_csv, unique):
    broken = unique("sweepbroken")
    # It cannot reach storage: its task fails after a few quick retries.
    platform.start_peers(broken, HTTP_PROXY="http://127.0.0.1:9", http_proxy="http://127.0.0.1:9")
    try:
        user = platform.user()
        hp = json.dumps({"learning_rate": 0.01, "epochs": 8, "hidden": [32]})
        response = user.start(digits_csv, num_peers=3, min_peers=2, hyperparameters=hp)
        assert response.status_code == 202, response.text
        session = user.wait_finished(response.json()["session_id"], timeout=90)
        assert session["status"] == "COMPLETED", session["reason"]
        by_peer = {p["name"]: p for p in session["peers"]}
        assert by_peer[broken]["status"] == "FAILED" and "TransferError" in by_peer[broken]["error"]
        assert set(session["results"]["peers"]) == set(two_peers)
        assert session["results"]["best_peer"] in two_peers and session["model_available"]
    finally:
        platform.stop_peer(broken)


def test_a_sweep_survives_its_broker_restarting(tmp_path):
    """The broker (a private RabbitMQ node) stops for ~10 s mid-sweep and comes back: the peers train on,
    everyone reconnects, the session completes with every heartbeat and no peer is blamed."""
    from harness import rabbitnode
    from harness.http import Api
    from harness.processes import make_target
    from settings import ROOT
    from tests import conftest, services

    services.require(rabbitnode.available() and conftest.REAL_BROKER,
                     "a private RabbitMQ node (rabbitmq-server, as root) and Redis")
    node = rabbitnode.RabbitNode()
    node.start()
    try:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("BROKER_", "MONGODB_", "STORAGE_", "S3_", "JWT_", "PEERTRAIN_", "COORDINATOR_",
                                    "MONITOR_", "RESULTS_", "EVENT_"))}
        env.update(BROKER_URL=node.url, BROKER_ADMIN_URL=node.admin_url, STORAGE_URL=str(tmp_path / "storage"),
                   LOCAL_PEERS="2", PEER_TIMEOUT_SECONDS="6")
        epochs = 300
        with make_target("run", env, tmp_path / "make-run.log") as base:
            user = Api(base).sign_up_and_in("ann")
            wait_until(lambda: user.get("/peers").json()["free"] == 2, 60, "the two peers")
            hp = json.dumps({"learning_rate": 0.001, "epochs": epochs, "hidden": [64], "batch_size": 16})
            response = user.start(ROOT / "samples" / "digits.csv", num_peers=2, hyperparameters=hp)
            assert response.status_code == 202, response.text
            session_id = response.json()["session_id"]
            wait_until(lambda: len(user.heartbeats(session_id)) >= 10, 60, "the peers to be training")
            node.stop()
            outage = time.monotonic()
            assert user.session(session_id)["status"] == "RUNNING"
            time.sleep(10)  # the outage itself: the broker stays away this long
            node.start()
            back = time.monotonic()
            session = user.wait_finished(session_id, timeout=90)
            recovered = time.monotonic() - back
            print(f"\nbroker down {back - outage:.1f} s; session COMPLETED {recovered:.1f} s after it was back "
                  f"(target <= 15 s)")
            assert session["status"] == "COMPLETED", session["reason"]
            assert {p["status"] for p in session["peers"]} == {"COMPLETED"}
            assert len(user.heartbeats(session_id)) == 2 * epochs
            assert all(p["status"] != "OFFLINE" for p in user.get("/peers").json()["peers"])
        assert "Traceback" not in (tmp_path / "make-run.log").read_text()
    finally:
        node.remove()
