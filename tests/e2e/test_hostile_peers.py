"""Hostile peers: each attack is made with exactly what one registered peer holds, and does no harm.

A peer holds its enrolment (its own broker login, the names of the two exchanges it reports on) and,
while it trains, the grants in its tasks. Each test states the attack in its docstring; the victim
is another peer's work, another user's session, or the platform's state.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager

import pytest
import requests
from kombu import Connection

from harness.processes import PeerProcess, peer_environment
from harness.waiting import wait_until
from models import Heartbeat, TrainingSession
from settings import Settings
from tasks import protocol, relay
from tests.e2e.attacker import REFUSED, Attacker, flood_apart

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


@contextmanager
def sweep_beside_a_keeper(platform, keeper, csv, tmp_path):
    """A 3-peer sweep with the two honest peers and peer `keeper`, which keeps every task it is sent (its spec,
    with its grants, one JSON line each): yields the user, the finished session and the file of kept specs.
    Each test names its own keeper: a registered name stays taken for the module's platform."""
    kept = tmp_path / "specs.jsonl"
    platform.start_peers(keeper, app="tests.e2e.faulty_peer", PEERTRAIN_TEST_FAULT="keep",
                         PEERTRAIN_TEST_KEEP=str(kept))
    try:
        user = platform.user()
        response = user.start(csv, num_peers=3, hyperparameters=QUICK)
        session = user.wait_finished(response.json()["session_id"], timeout=120)
        assert session["status"] == "COMPLETED", session
        yield user, session, kept
    finally:
        platform.stop_peer(keeper)


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
    for exchange in (settings.event_exchange, attacker.events, settings.results_queue):
        with pytest.raises(REFUSED):
            attacker.delete_exchange(exchange)
        with pytest.raises(REFUSED):
            attacker.declare_exchange(exchange, "fanout")


def test_a_peer_cannot_publish_in_another_peers_name(platform, two_peers, attacker):
    """Attack: a peer stamps its messages with another peer's broker user (user_id) to pass for it, or
    publishes its events where another peer's (or the platform's own) go."""
    settings = Settings.from_env()
    scope = settings.broker_scope
    with pytest.raises(REFUSED):
        attacker.event(attacker.events, "worker-offline", user_id=protocol.broker_user(two_peers[0], scope),
                       hostname=f"peer.{two_peers[0]}@host")
    for exchange in (protocol.event_exchange(settings.event_exchange, two_peers[0]), settings.event_exchange):
        with pytest.raises(REFUSED):
            attacker.event(exchange, "worker-heartbeat", hostname=f"peer.{two_peers[0]}@host")
    with pytest.raises(REFUSED):
        attacker.publish(settings.results_queue, "result", {"task_id": "x", "status": "SUCCESS"},
                         user_id=protocol.broker_user(two_peers[0], scope))


def test_forged_events_do_not_fail_or_spoil_another_users_session(platform, two_peers, attacker, digits_csv):
    """Attack: during another user's session, a peer publishes (under its own login, as it must) a
    worker-offline in a training peer's name, and heartbeats for that session: epoch 999 of 12, and
    epoch 1 before the genuine one, to take its place."""
    user, session_id = sweep(platform, digits_csv)
    victim = two_peers[0]
    dropped = sum(platform.monitor.dropped.values())
    attacker.event(attacker.events, "worker-offline", hostname=f"peer.{victim}@host")
    for epoch in (999, 1):
        attacker.event(attacker.events, "task-heartbeat", hostname=f"peer.{victim}@host",
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
        # The peer's own result, not the forged one: an honest peer may well score 1.0 on its share of the digits
        # (it did, once in a full run), but its loss is never exactly 0 and its epochs were all reported.
        assert run["status"] == "COMPLETED" and run["final"]["val_loss"] > 0.0
        assert run["final"].get("samples_per_sec")  # the forged final had none
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
    result = relay.train(app, victim, "0" * 24 + ":0:forged", spec, 60, "forged").apply_async()
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
    with sweep_beside_a_keeper(platform, unique("keeper"), digits_csv, tmp_path) as (user, session, kept):
        before = hashlib.sha256(user.get(f"/sessions/{session['id']}/model").content).hexdigest()
        grant = json.loads(kept.read_text().splitlines()[-1])["weights"]
        assert requests.put(grant, data=b"\0" * 1000, headers={"Content-Type": "application/octet-stream"},
                            timeout=10).status_code == 200  # its own grant still works, for its own object
        after = hashlib.sha256(user.get(f"/sessions/{session['id']}/model").content).hexdigest()
        assert after == before


def test_an_unregistered_worker_never_shows_online(platform, attacker, unique, tmp_path):
    """Attack: a machine runs a peer worker under a name nobody registered, with the platform's own
    broker login (a leaked one; its events sent where a registered peer's go, which the monitor reads) —
    and one with a made-up login."""
    stranger = unique("stranger")
    settings = Settings.from_env()
    leaked = PeerProcess(stranger, platform.log_dir, peer_environment(
        BROKER_URL=settings.broker_url, EVENT_EXCHANGE=attacker.events, RESULTS_QUEUE=settings.results_queue))
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
        login = Connection(environment["BROKER_URL"]).userid
        assert login == protocol.broker_user(name, platform.settings.broker_scope) and login != "guest"


# --- the second layer: liveness, names, floods, held-out rows, robust rounds, records, deadlines ----------


def test_a_login_that_runs_no_worker_is_never_online_nor_claimed(platform, two_peers, attacker, digits_csv):
    """Attack: a registered login with no worker sends `worker-heartbeat` events under changing hostnames,
    hoping to look the freshest peer and be claimed (in a sweep that is a grant to the user's whole data)."""
    from models import Peer

    name = protocol.peer_of(attacker.user)
    for i in range(20):
        attacker.event(attacker.events, "worker-heartbeat", hostname=f"peer.{name}@fresh{i}", freq=2.0)
    assert Peer.objects.get(name=name).status == "OFFLINE"  # the broker shows no consumer of its queue
    for _ in range(3):
        user, session_id = sweep(platform, digits_csv, hp=json.dumps({"epochs": 2, "hidden": [16]}))
        session = user.wait_finished(session_id, timeout=60)
        assert session["status"] == "COMPLETED" and name not in [p["name"] for p in session["peers"]]
        attacker.event(attacker.events, "worker-heartbeat", hostname=f"peer.{name}@later", freq=2.0)
    assert Peer.objects.get(name=name).status == "OFFLINE"


def test_a_peer_can_declare_nothing_so_no_name_the_platform_uses(platform, two_peers, attacker, digits_csv):
    """Attack: a peer re-declares `peer.<its name>` (the exchange its tasks used to come through) as fanout, or
    its own queue with other arguments, so that every session it is given fails at start."""
    name = protocol.peer_of(attacker.user)
    with pytest.raises(REFUSED):
        attacker.declare_exchange(f"peer.{name}", "fanout")
    for exchange in (protocol.TASKS_EXCHANGE, protocol.STOPS_EXCHANGE):
        with pytest.raises(REFUSED):
            attacker.declare_exchange(exchange, "fanout")
    with pytest.raises(REFUSED):
        attacker.declare_queue(protocol.task_queue(name), **{"x-max-length": 1})
    user, session_id = sweep(platform, digits_csv, hp=json.dumps({"epochs": 2, "hidden": [16]}))
    assert user.wait_finished(session_id, timeout=60)["status"] == "COMPLETED"


def test_one_peers_flood_costs_only_that_peer(platform, two_peers, attacker, digits_csv, record_property):
    """Attack: a peer floods its event exchange with its own heartbeats as fast as one connection goes for
    30 s while other users' sessions run one after another: no honest peer is judged offline, every session
    completes, their streams keep up, their peers' events wait unread no longer than the flood's, and
    what of the flood waits unread stays bounded."""
    import threading
    import time
    from datetime import datetime

    from kombu import Connection

    from models import Heartbeat, Peer

    settings = Settings.from_env()
    platform_login = Connection(settings.broker_url)
    name, seconds = protocol.peer_of(attacker.user), 30
    sent: list[int] = []
    flooding = threading.Thread(target=lambda: sent.append(flood_apart(
        attacker.environment, attacker.events, seconds, uuid="0" * 24 + ":0:x", session="0" * 24, peer=name,
        round=0, loss=1.0)))
    dropped = platform.monitor.dropped["over budget"]

    def unread(peer: str) -> int:
        queue = protocol.events_queue(settings.event_exchange, settings.monitor_queue, peer).name
        return platform_login.default_channel.queue_declare(queue, passive=True).message_count

    depths, flooded, statuses, latencies, sessions = [], [], set(), [], 0
    until = time.monotonic() + seconds
    user = platform.user()
    flooding.start()
    try:
        while time.monotonic() < until - 5:
            response = user.start(digits_csv, num_peers=2, hyperparameters=json.dumps({"epochs": 30, "hidden": [64]}))
            assert response.status_code == 202, response.text
            session_id = response.json()["session_id"]
            for event in user.events(session_id):
                if event["event"] == "heartbeat" and event["data"]["sent_at"]:
                    sent_at = datetime.fromisoformat(event["data"]["sent_at"].replace("Z", "+00:00"))
                    latencies.append(time.time() - sent_at.timestamp())
                    depths.append(max(unread(peer) for peer in two_peers))
                    flooded.append(unread(name))
                    statuses.update(p.status for p in Peer.objects(name__in=two_peers))
                if event["event"] == "end":
                    break
            session = user.session(session_id)
            assert session["status"] == "COMPLETED", session["reason"]
            assert Heartbeat.objects(session_id=session_id).count() == 2 * 30
            sessions += 1
    finally:
        flooding.join(seconds + 30)
        platform_login.release()
    assert sessions >= 2 and statuses <= {"ONLINE", "TRAINING"}, (sessions, statuses)
    assert platform.monitor.dropped["over budget"] > dropped, platform.monitor.dropped
    latencies.sort()
    p95 = latencies[int(0.95 * (len(latencies) - 1))]
    record_property("flood events sent / s", round(sent[0] / seconds))
    record_property("sessions run during the flood", sessions)
    record_property("p95 s from a heartbeat to the other session's stream", round(p95, 3))
    record_property("most events of an honest peer's waiting unread", max(depths))
    record_property("most of the flood waiting unread", max(flooded))
    assert p95 <= 1.0, latencies[-10:]
    # The broker keeps each peer's events apart and serves the monitor each queue in turn: however fast the
    # flood comes, the honest peers' events are read at once, and the flood waits (bounded) in its own queue.
    assert max(depths) < 50, depths
    assert max(flooded) <= protocol.PEER_EVENT_BACKLOG, flooded


def test_a_sweep_peer_never_holds_the_rows_it_is_judged_on(platform, two_peers, digits_csv, unique, tmp_path):
    """Attack: a sweep peer trains on the validation rows (it used to get the whole CSV and the split's seed)
    to win. Now its task holds the training rows only, and no seed tells it which rows are held out."""
    with sweep_beside_a_keeper(platform, unique("peeker"), digits_csv, tmp_path) as (_, session, kept):
        spec = json.loads(kept.read_text().splitlines()[-1])
        given = requests.get(spec["data"], timeout=10).content.decode().splitlines()
        from tasks.storage import open_storage

        store = open_storage(platform.storage_url, platform.s3_endpoint)
        prefix = f"users/{TrainingSession.objects.get(id=session['id']).owner_id}/sessions/{session['id']}"
        held_out = store.get_bytes(store.url(f"{prefix}/shards/validation.csv")).decode().splitlines()
        whole = digits_csv.read_text().splitlines()
        assert given[0] == held_out[0] == whole[0]  # the header
        from collections import Counter

        # Every row once: either the peer was given it, or it is held out (rows, not just their count).
        assert Counter(given[1:]) + Counter(held_out[1:]) == Counter(whole[1:]) and len(held_out) > 300
        assert "split_seed" not in json.dumps(spec)
        assert session["results"]["peers"][session["results"]["best_peer"]]["val_accuracy"] > 0.8


@pytest.mark.parametrize("aggregation", ["fedavg", "median"])
def test_a_peer_scaling_its_update_a_hundredfold_is_bounded_and_named(platform, two_peers, digits_csv, unique,
                                                                       aggregation):
    """Attack: one peer uploads its update x100 (the right shape, under the size cap) to drag FedAvg along."""
    from tests.e2e.test_federated import start_federated

    liar = unique(f"scaler{aggregation[:3]}")
    platform.start_peers(liar, app="tests.e2e.faulty_peer", PEERTRAIN_TEST_FAULT="scale")
    try:
        user = platform.user()
        session = user.wait_finished(start_federated(user, digits_csv, 3, aggregation=aggregation), timeout=180)
        assert session["status"] == "COMPLETED", session["reason"]
        for r in session["rounds"]:
            assert liar in r["outliers"] or liar in r["rejected"], r
        assert session["rounds"][-1]["metrics"]["val_accuracy"] >= 0.85
    finally:
        platform.stop_peer(liar)


def test_a_peer_that_never_answers_is_left_out_without_a_round_timeout(platform, two_peers, digits_csv, unique):
    """Attack: a claimed peer keeps its worker beating and never finishes its task, with no `round_timeout`
    given: its deadline comes from how long the others took, not from the hour-long training limit."""
    silent = unique("silent")
    platform.start_peers(silent, app="tests.e2e.faulty_peer", PEERTRAIN_TEST_FAULT="silent")
    try:
        user = platform.user()
        response = user.start(digits_csv, num_peers=3, hyperparameters=QUICK, min_peers=2)
        session = user.wait_finished(response.json()["session_id"], timeout=60)
        assert session["status"] == "COMPLETED", session["reason"]
        run = {p["name"]: p for p in session["peers"]}[silent]
        assert run["status"] == "FAILED" and "did not finish round 0" in run["error"], run
    finally:
        platform.stop_peer(silent)


def test_a_peer_whose_updates_are_refused_three_sessions_running_is_quarantined(platform, two_peers, digits_csv,
                                                                                 unique):
    """Its record follows it: three sessions of refused updates, and it is never claimed again until an
    operator restores it."""
    from models import Peer
    from tasks import registry
    from tests.e2e.test_federated import start_federated

    liar = unique("repeat")
    platform.start_peers(liar, app="tests.e2e.faulty_peer", PEERTRAIN_TEST_FAULT="nan")
    try:
        user = platform.user()
        for _ in range(3):
            session = user.wait_finished(start_federated(user, digits_csv, 3, min_peers=2), timeout=180)
            assert session["status"] == "COMPLETED", session["reason"]
        record = {p["name"]: p for p in user.get("/peers").json()["peers"]}[liar]
        assert record["status"] == "QUARANTINED" and record["rejected"] >= 3 and record["reputation"] < 0.5
        assert "finite" in record["last_rejection"]
        assert user.start(digits_csv, num_peers=3, hyperparameters=QUICK).status_code == 400  # two free, not three
        assert registry.main(["restore", liar]) == 0
        wait_until(lambda: Peer.objects.get(name=liar).status == "ONLINE", 30, "the restored peer ONLINE")
    finally:
        platform.stop_peer(liar)
