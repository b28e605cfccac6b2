"""A sweep session end to end: HTTP in, real peer processes training, results and model out."""

from __future__ import annotations

import io
import json
import time

import numpy as np
import pytest

pytestmark = pytest.mark.e2e

EPOCHS = 5


def test_a_sweep_trains_each_peer_with_its_own_settings(platform, two_peers, digits_csv):
    user = platform.user()
    settings = [
        {"learning_rate": 0.01, "epochs": EPOCHS, "hidden": [64], "batch_size": 32},
        {"learning_rate": 0.0005, "epochs": EPOCHS, "hidden": [64], "batch_size": 32},
    ]
    response = user.start(digits_csv, num_peers=2, hyperparameters=json.dumps(settings))
    assert response.status_code == 202, response.text
    started = response.json()
    assert sorted(started["assigned_peers"]) == sorted(two_peers)
    session = user.wait_finished(started["session_id"], timeout=120)
    assert session["status"] == "COMPLETED", session

    # Each peer trained with the settings it was given, and the curves show it.
    by_peer = {p["name"]: p for p in session["peers"]}
    curves = {}
    for name, hp in zip(started["assigned_peers"], settings, strict=True):
        run = by_peer[name]
        assert run["status"] == "COMPLETED"
        assert run["hyperparameters"]["learning_rate"] == hp["learning_rate"]
        beats = user.heartbeats(started["session_id"], peer=name)
        assert [b["epoch"] for b in beats] == list(range(1, EPOCHS + 1))
        assert all(b["epochs"] == EPOCHS and b["loss"] > 0 and b["val_accuracy"] is not None for b in beats)
        curves[hp["learning_rate"]] = [b["loss"] for b in beats]
        assert run["epoch"] == EPOCHS and run["final"]["epoch"] == EPOCHS
        # The training rows only: a fifth of the rows is held out, in no peer's grant.
        assert 0.75 < run["bytes_fetched"] / digits_csv.stat().st_size < 0.85
    assert curves[0.01] != curves[0.0005]
    # A higher learning rate (within reason) learns digits faster in 5 epochs.
    assert curves[0.01][-1] < curves[0.0005][-1]

    # The results name the best peer, and its model can be downloaded and used.
    results = session["results"]
    assert results["metric"] == "val_accuracy"
    assert results["best_peer"] in two_peers
    # Judged by the coordinator on rows no peer saw (each peer's own curve is on a part of its training rows).
    assert results["best_value"] == max(results["peers"][n]["val_accuracy"] for n in two_peers)
    assert results["best_value"] == results["peers"][results["best_peer"]]["val_accuracy"] > 0.9
    assert session["model_available"]
    model = user.get(f"/sessions/{started['session_id']}/model")
    assert model.status_code == 200
    from trainer.predictor import Predictor

    predictor = Predictor.load(io.BytesIO(model.content))
    predictions = predictor.predict_csv(digits_csv)
    from trainer.table import read_table

    labels = read_table(digits_csv).classes
    truth = [labels[i] for i in read_table(digits_csv).y]
    assert np.mean([p == t for p, t in zip(predictions, truth, strict=True)]) > 0.9

    # Everyone is free again, and the status route agrees.
    peers = {p["name"]: p for p in user.get("/peers").json()["peers"]}
    assert all(peers[name]["status"] == "ONLINE" for name in two_peers)
    status = user.get("/sessions/training-status").json()
    assert status == {"session_id": started["session_id"], "status": "COMPLETED", "reason": None}


def test_a_failing_peer_fails_the_session_quickly_and_frees_everyone(platform, two_peers, digits_csv, unique,
                                                                    record_property):
    # A peer that cannot reach storage (its requests go through a proxy that refuses them): its task
    # raises after a few quick retries, as a real misconfigured machine's would.
    broken = unique("broken")
    platform.start_peers(broken, HTTP_PROXY="http://127.0.0.1:9", http_proxy="http://127.0.0.1:9")
    try:
        user = platform.user()
        long = {"learning_rate": 0.001, "epochs": 1000, "hidden": [64]}
        began = time.monotonic()
        response = user.start(digits_csv, num_peers=3, hyperparameters=json.dumps(long))
        assert response.status_code == 202, response.text
        session_id = response.json()["session_id"]
        # Far sooner than the healthy peers' 1,000 epochs would take (minutes).
        session = user.wait_finished(session_id, timeout=45)
        record_property("seconds from start to FAILED", round(time.monotonic() - began, 2))
        assert session["status"] == "FAILED"
        assert f"peer {broken} failed" in session["reason"]
        assert "TransferError" in session["reason"]
        by_peer = {p["name"]: p for p in session["peers"]}
        assert by_peer[broken]["status"] == "FAILED" and "could not read" in by_peer[broken]["error"]
        for name in two_peers:
            assert by_peer[name]["status"] == "CANCELLED"

        def all_free():
            peers = {p["name"]: p["status"] for p in user.get("/peers").json()["peers"]}
            return all(peers[n] == "ONLINE" for n in [*two_peers, broken])

        from harness.waiting import wait_until

        wait_until(all_free, 10, "every peer to be ONLINE again")

        # The healthy peers stopped early rather than training on for nothing.
        def stopped_early():
            beats = user.heartbeats(session_id)
            return beats if len(beats) < 2 * 1000 else None

        wait_until(stopped_early, 5, "the healthy peers to stop")
        # They take new work at once.
        quick = {"learning_rate": 0.01, "epochs": 2, "hidden": [32]}
        again = user.start(digits_csv, num_peers=2, hyperparameters=json.dumps(quick))
        assert again.status_code == 202, again.text
        assert user.wait_finished(again.json()["session_id"], timeout=60)["status"] in ("COMPLETED", "FAILED")
    finally:
        platform.stop_peer(broken)


def test_a_peer_that_dies_mid_session_fails_it_within_seconds(platform, two_peers, digits_csv, unique,
                                                             record_property):
    from harness.waiting import wait_until
    from tests.e2e.conftest import PEER_TIMEOUT

    victim = unique("victim")
    platform.start_peers(victim)
    user = platform.user()
    long = json.dumps({"learning_rate": 0.001, "epochs": 1000, "hidden": [64]})
    session_id = user.start(digits_csv, num_peers=3, hyperparameters=long).json()["session_id"]
    wait_until(lambda: len(user.heartbeats(session_id, peer=victim)) >= 2, 60, "the victim to be training")
    platform.kill_peer(victim)
    killed = time.monotonic()
    session = user.wait_finished(session_id, timeout=4 * PEER_TIMEOUT)
    record_property(f"seconds from kill -9 to FAILED (silence limit {PEER_TIMEOUT:g} s)",
                    round(time.monotonic() - killed, 2))
    assert session["status"] == "FAILED"
    assert f"peer {victim} went offline" in session["reason"]
    peers = {p["name"]: p["status"] for p in user.get("/peers").json()["peers"]}
    assert peers[victim] == "OFFLINE"
    assert all(peers[name] == "ONLINE" for name in two_peers)


def test_cancelling_stops_the_peers_and_frees_them(platform, two_peers, digits_csv):
    from harness.waiting import wait_until

    user = platform.user()
    long = json.dumps({"learning_rate": 0.001, "epochs": 1000, "hidden": [64]})
    session_id = user.start(digits_csv, num_peers=2, hyperparameters=long).json()["session_id"]
    wait_until(lambda: len(user.heartbeats(session_id)) >= 4, 60, "both peers to be training")
    response = user.post(f"/sessions/{session_id}/cancel")
    assert response.status_code == 202, response.text
    session = user.wait_finished(session_id, timeout=10)
    assert session["status"] == "CANCELLED" and session["reason"] == "cancelled by the user"
    assert {p["status"] for p in session["peers"]} == {"CANCELLED"}
    peers = {p["name"]: p["status"] for p in user.get("/peers").json()["peers"]}
    assert all(peers[name] == "ONLINE" for name in two_peers)
    assert user.post(f"/sessions/{session_id}/cancel").status_code == 409
    # The peers really stopped: no more heartbeats after a moment.
    settled = len(user.heartbeats(session_id))
    assert settled < 2 * 1000
    quick = json.dumps({"learning_rate": 0.01, "epochs": 2, "hidden": [32]})
    again = user.start(digits_csv, num_peers=2, hyperparameters=quick).json()["session_id"]
    assert user.wait_finished(again, timeout=30)["status"] == "COMPLETED"


def test_the_event_stream_shows_every_epoch_of_every_peer_once_and_survives_a_reconnect(platform, two_peers,
                                                                                           digits_csv):
    from harness.waiting import wait_until

    user = platform.user()
    epochs = 12
    hp = json.dumps({"learning_rate": 0.01, "epochs": epochs, "hidden": [64], "batch_size": 32})
    response = user.start(digits_csv, num_peers=2, hyperparameters=hp)
    assert response.status_code == 202, response.text
    session_id = response.json()["session_id"]

    # A watcher that drops its connection mid-session and comes back with the last id it saw.
    seen: list[dict] = []
    for event in user.events(session_id):
        seen.append(event)
        if sum(e["event"] == "heartbeat" for e in seen) == epochs // 2:
            break
    assert user.session(session_id)["status"] == "RUNNING", "reconnect while the peers still train"
    seen += list(user.events(session_id, last_event_id=seen[-1]["id"]))
    whole = list(user.events(session_id))  # after the end: the whole log, replayed

    assert seen == whole
    assert [e["id"] for e in whole] == sorted({e["id"] for e in whole})  # strictly increasing
    beats = [(e["data"]["peer"], e["data"]["epoch"]) for e in whole if e["event"] == "heartbeat"]
    assert sorted(beats) == sorted((peer, epoch) for peer in two_peers for epoch in range(1, epochs + 1))
    assert all(e["data"]["sent_at"] and e["data"]["loss"] > 0 for e in whole if e["event"] == "heartbeat")
    assert [e["event"] for e in whole].count("end") == 1 and whole[-1]["event"] == "end"
    assert whole[-1]["data"] == {"status": "COMPLETED", "reason": None}
    statuses = [e["data"]["status"] for e in whole if e["event"] == "status"]
    assert statuses == ["PENDING", "RUNNING", "COMPLETED"]
    # What the stream showed is what was stored.
    stored = wait_until(lambda: user.heartbeats(session_id), 5, "the heartbeats")
    assert len(stored) == 2 * epochs

    # Another user cannot follow it.
    other = platform.user()
    refused = other.get(f"/sessions/{session_id}/events")
    assert refused.status_code == 404 and refused.json()["code"] == 404
