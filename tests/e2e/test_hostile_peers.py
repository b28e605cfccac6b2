"""Hostile peers: each attack is made with exactly what one registered peer holds, and does no harm.

A peer holds its enrolment (its own broker login, the names of the two exchanges it reports on) and,
while it trains, the grants in its tasks. Each test states the attack in its docstring; the victim
is another peer's work, another user's session, or the platform's state.
"""

from __future__ import annotations

import hashlib
import json

import pytest
import requests

from harness.processes import PeerProcess, peer_environment
from harness.waiting import wait_until
from models import Heartbeat, TrainingSession
from settings import Settings
from tests.e2e.attacker import REFUSED, Attacker

pytestmark = pytest.mark.e2e

EPOCHS = 12
QUICK = json.dumps({"learning_rate": 0.01, "epochs": EPOCHS, "hidden": [32], "batch_size": 32})


@pytest.fixture(scope="module")
def attacker(platform, unique) -> Attacker:
    """A registered peer that never runs a worker: only its login, used by hand."""
    return Attacker(platform.register(unique("mallory")))


@pytest.fixture(scope="module")
def unique():
    from tests import conftest

    return lambda name: f"{name}{conftest.RUN_ID}"


def sweep(platform, csv, peers=2, hp=QUICK):
    user = platform.user()
    response = user.start(csv, num_peers=peers, hyperparameters=hp)
    assert response.status_code == 202, response.text
    return user, response.json()["session_id"]


def test_a_peer_cannot_send_work_to_the_coordinator_or_to_another_peer(platform, two_peers, attacker):
    """Attack: with its own login, a peer publishes cancel_session, aggregate and round_failed to the
    coordinator's queue, a train task to another peer's queue, and anything through the default exchange."""
    settings = Settings.from_env()
    for name, args in (("peertrain.cancel_session", ["0" * 24]), ("peertrain.aggregate", [[], "0" * 24, 0]),
                       ("peertrain.round_failed", ["aggregate:x:0:y"])):
        with pytest.raises(REFUSED):
            attacker.task(settings.coordinator_queue, settings.coordinator_queue, name, args)
    with pytest.raises(REFUSED):
        attacker.task(f"peer.{two_peers[0]}", f"peer.{two_peers[0]}", "peertrain.train", [{}])
    with pytest.raises(REFUSED):
        attacker.task("", settings.coordinator_queue, "peertrain.cancel_session", ["0" * 24])


def test_a_peer_cannot_read_another_queue_nor_touch_shared_exchanges(platform, two_peers, attacker):
    """Attack: a peer consumes another peer's tasks, and deletes or redeclares the exchanges everyone shares."""
    settings = Settings.from_env()
    with pytest.raises(REFUSED):
        attacker.consume(f"peer.{two_peers[0]}")
    with pytest.raises(REFUSED):
        attacker.consume(settings.results_queue)
    for exchange in (settings.event_exchange, settings.results_queue):
        with pytest.raises(REFUSED):
            attacker.delete_exchange(exchange)
        with pytest.raises(REFUSED):
            attacker.declare_exchange(exchange, "fanout")


def test_a_peer_cannot_publish_in_another_peers_name(platform, two_peers, attacker):
    """Attack: a peer stamps its messages with another peer's broker user (user_id) to pass for it."""
    settings = Settings.from_env()
    with pytest.raises(REFUSED):
        attacker.event(settings.event_exchange, "worker-offline", user_id=f"peer.{two_peers[0]}",
                       hostname=f"peer.{two_peers[0]}@host")
    with pytest.raises(REFUSED):
        attacker.publish(settings.results_queue, "result", {"task_id": "x", "status": "SUCCESS"},
                         user_id=f"peer.{two_peers[0]}")


def test_forged_events_do_not_fail_or_spoil_another_users_session(platform, two_peers, attacker, digits_csv):
    """Attack: during another user's session, a peer publishes (under its own login, as it must) a
    worker-offline in a training peer's name, and heartbeats for that session: epoch 999 of 12, and
    epoch 1 before the genuine one, to take its place."""
    settings = Settings.from_env()
    user, session_id = sweep(platform, digits_csv)
    victim = two_peers[0]
    dropped = sum(platform.monitor.dropped.values())
    attacker.event(settings.event_exchange, "worker-offline", hostname=f"peer.{victim}@host")
    for epoch in (999, 1):
        attacker.event(settings.event_exchange, "task-heartbeat", hostname=f"peer.{victim}@host",
                       session=session_id, peer=victim, round=0, epoch=epoch, epochs=EPOCHS, loss=123.0)
    session = user.wait_finished(session_id, timeout=120)
    assert session["status"] == "COMPLETED", session
    beats = user.heartbeats(session_id)
    assert len(beats) == 2 * EPOCHS and all(b["loss"] != 123.0 for b in beats)
    assert Heartbeat.objects(session_id=session["id"], epoch__gt=EPOCHS).count() == 0
    wait_until(lambda: sum(platform.monitor.dropped.values()) >= dropped + 3, 10, "the forgeries to be counted")


def test_a_result_for_a_task_the_peer_was_not_given_is_dropped(platform, two_peers, attacker, digits_csv):
    """Attack: a peer reports perfect results (and failures) for the tasks of another user's session."""
    settings = Settings.from_env()
    user, session_id = sweep(platform, digits_csv)
    wait_until(lambda: all(r.task_id for r in TrainingSession.objects.get(id=session_id).peers), 20,
               "the session's tasks to be sent")
    for run in TrainingSession.objects.get(id=session_id).peers:
        perfect = {"round": 0, "final": {"epoch": EPOCHS, "val_accuracy": 1.0, "val_loss": 0.0}, "history": [],
                   "stopped": False, "samples": 10**12}
        attacker.publish(settings.results_queue, "result", {"task_id": run.task_id, "status": "SUCCESS",
                                                            "result": perfect})
        attacker.publish(settings.results_queue, "result", {"task_id": run.task_id, "status": "FAILURE",
                                                            "result": {"exc_type": "Sabotage", "exc_message": "x"}})
    session = user.wait_finished(session_id, timeout=120)
    assert session["status"] == "COMPLETED", session
    for run in session["peers"]:
        assert run["status"] == "COMPLETED" and run["final"]["val_accuracy"] != 1.0
        assert len(user.heartbeats(session_id, peer=run["name"])) == EPOCHS
    assert session["results"]["best_value"] < 1.0


def test_a_peer_lying_about_its_result_cannot_outweigh_the_others(platform, two_peers, digits_csv, unique):
    """Attack: a federated peer claims 10^12 samples (to dominate FedAvg), perfect accuracy, another
    peer's name and weights somewhere else."""
    liar = unique("boaster")
    platform.start_peers(liar, app="tests.e2e.faulty_peer", PEERTRAIN_TEST_FAULT="claims")
    try:
        user = platform.user()
        form = {"num_peers": 3, "mode": "federated", "rounds": 2, "local_epochs": 1,
                "hyperparameters": json.dumps({"learning_rate": 0.003, "batch_size": 32, "hidden": [32]})}
        response = user.start(digits_csv, **form)
        assert response.status_code == 202, response.text
        session = user.wait_finished(response.json()["session_id"], timeout=120)
        assert session["status"] == "COMPLETED", session
        rows = TrainingSession.objects.get(id=session["id"]).plan.shard_rows
        by_peer = {p["name"]: p for p in session["peers"]}
        assert by_peer[liar]["samples"] == rows[liar]  # the coordinator's count, not the claim
        assert "someone-else" not in by_peer
        for r in session["rounds"]:
            assert r["metrics"]["samples"] == sum(rows.values()) and liar in r["peers"]
            assert r["metrics"]["val_accuracy"] < 1.0
    finally:
        platform.stop_peer(liar)


def test_a_peer_spec_out_of_range_is_refused_and_the_peer_stays_useful(platform, two_peers, digits_csv):
    """Attack (a compromised coordinator, or a forged message): a train task asking for 10^9 epochs and
    two layers of 12,000 units. The peer refuses it at once instead of burning its machine."""
    from celery import states

    app = platform.celery
    victim = two_peers[0]
    spec = {"session": "0" * 24, "round": 0, "data": "http://127.0.0.1:9/x", "data_id": "x",
            "weights": "http://127.0.0.1:9/y", "target": "label", "task": "classification", "features": ["a"],
            "hyperparameters": {"epochs": 10**9, "hidden": [12000, 12000]}}
    result = app.send_task("peertrain.train", args=[spec], queue=f"peer.{victim}")
    # The peer reports the refusal to the coordinator's collector, which drops it (no session gave that
    # task); the peer's own log says why, and it answers the next session at once.
    log = platform.peers[victim].log_path
    wait_until(lambda: "LimitError('each hidden layer must have 1 to 4096 units; got 12000')"
               in log.read_text(errors="replace"), 20, "the peer to refuse the task")
    assert result.state == states.PENDING  # nothing a peer says is stored without a task it was given
    user, session_id = sweep(platform, digits_csv, hp=json.dumps({"epochs": 2, "hidden": [16]}))
    assert user.wait_finished(session_id, timeout=60)["status"] == "COMPLETED"


def test_a_peer_cannot_change_the_model_after_its_session(platform, two_peers, digits_csv, unique, tmp_path):
    """Attack: a peer keeps the grants of its task and, after the session, uploads other weights
    through its write grant, hoping to replace the model users download."""
    keeper, kept = unique("keeper"), tmp_path / "grants.jsonl"
    platform.start_peers(keeper, app="tests.e2e.faulty_peer", PEERTRAIN_TEST_FAULT="keep",
                         PEERTRAIN_TEST_KEEP=str(kept))
    try:
        user = platform.user()
        response = user.start(digits_csv, num_peers=3, hyperparameters=QUICK)
        session = user.wait_finished(response.json()["session_id"], timeout=120)
        assert session["status"] == "COMPLETED", session
        before = hashlib.sha256(user.get(f"/sessions/{session['id']}/model").content).hexdigest()
        grant = json.loads(kept.read_text().splitlines()[-1])["weights"]
        assert requests.put(grant, data=b"\0" * 1000, headers={"Content-Type": "application/octet-stream"},
                            timeout=10).status_code == 200  # its own grant still works, for its own object
        after = hashlib.sha256(user.get(f"/sessions/{session['id']}/model").content).hexdigest()
        assert after == before
    finally:
        platform.stop_peer(keeper)


def test_an_unregistered_worker_never_shows_online(platform, unique, tmp_path):
    """Attack: a machine runs a peer worker under a name nobody registered, with the platform's own
    broker login (a leaked one) — and one with a made-up login."""
    stranger = unique("stranger")
    settings = Settings.from_env()
    leaked = PeerProcess(stranger, platform.log_dir, peer_environment(
        BROKER_URL=settings.broker_url, EVENT_EXCHANGE=settings.event_exchange, RESULTS_QUEUE=settings.results_queue))
    made_up = settings.broker_url.replace("guest:guest", f"peer.{stranger}:guess")
    guessed = PeerProcess(f"{stranger}x", platform.log_dir, peer_environment(
        BROKER_URL=made_up, EVENT_EXCHANGE=settings.event_exchange, RESULTS_QUEUE=settings.results_queue))
    try:
        wait_until(lambda: platform.monitor.dropped["unregistered peer"] > 0
                   or platform.monitor.dropped["not its own worker"] > 0, 30, "the stranger's events")
        wait_until(lambda: "ACCESS_REFUSED" in guessed.log() or "Login was refused" in guessed.log(), 30,
                   "the made-up login to be refused")
        from models import Peer

        assert Peer.objects(name__in=[stranger, f"{stranger}x"]).count() == 0
    finally:
        leaked.stop()
        guessed.stop()


def test_a_removed_peer_loses_its_login_and_gets_no_more_work(platform, digits_csv, unique):
    """A peer is removed (`python -m tasks.registry remove`): its worker is cut off at once, cannot log in
    again, and new sessions do not get it."""
    from models import Peer
    from tasks import registry

    gone = unique("leaver")
    platform.start_peers(gone)
    process = platform.peers[gone]
    assert registry.remove(gone, Settings.from_env())
    assert Peer.objects(name=gone).count() == 0
    wait_until(lambda: "ACCESS_REFUSED" in process.log() or "Login was refused" in process.log(), 30,
               "the removed peer's login to be refused")
    user = platform.user()
    peers = user.get("/peers").json()["peers"]
    assert gone not in [p["name"] for p in peers]
    platform.stop_peer(gone)


def test_peers_hold_no_platform_credentials(platform, two_peers):
    """What a peer machine is given is all it has: its login and exchange names, nothing of the platform's."""
    for name in two_peers:
        environment = platform.environments[name]
        assert not any(key.startswith(("MONGODB_", "RESULT_", "STORAGE_", "S3_", "AWS_", "JWT_"))
                       for key in environment)
        assert f"peer.{name}:" in environment["BROKER_URL"] and "guest" not in environment["BROKER_URL"]
