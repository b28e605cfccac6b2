"""A sweep that searches, end to end: HTTP in, trials on real peer processes, the losers stopped, the best out."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

pytestmark = pytest.mark.e2e

SPACE = {"learning_rate": {"low": 1e-4, "high": 3e-2, "log": True}, "batch_size": [32, 64], "hidden": [[32], [64]],
         "epochs": 9}


def test_a_search_tries_its_trials_on_the_peers_prunes_losers_and_keeps_the_best(platform, two_peers, digits_csv):
    user = platform.user()
    response = user.start(digits_csv, num_peers=2, search=json.dumps(SPACE), trials=8, seed=3)
    assert response.status_code == 202, response.text
    session_id = response.json()["session_id"]
    session = user.wait_finished(session_id, timeout=180)
    assert session["status"] == "COMPLETED", session
    assert session["search"]["trials"] == 8 and session["search"]["sampler"] == "tpe"

    listed = user.get(f"/sessions/{session_id}/trials").json()
    trials = listed["items"]
    assert [t["number"] for t in trials] == list(range(8))
    assert {t["status"] for t in trials} <= {"COMPLETED", "PRUNED"}
    # Every trial its own configuration, from the space, trained on one of the session's peers.
    configurations = {json.dumps(t["params"], sort_keys=True) for t in trials}
    assert len(configurations) == 8
    assert {t["peer"] for t in trials} == set(two_peers)
    for t in trials:
        hp = t["hyperparameters"]
        assert 1e-4 <= hp["learning_rate"] <= 3e-2 and hp["batch_size"] in (32, 64) and hp["hidden"] in ([32], [64])
        assert hp["epochs"] == 9
        # Scored by the platform at the rungs (1, 3, 9 epochs), as far as it got; the curve is its peer's.
        assert [s["epoch"] for s in t["scores"]] == [r for r in (1, 3, 9) if r <= t["epochs_done"]]
        assert [c["epoch"] for c in t["curve"]] == list(range(1, t["epochs_done"] + 1))
        assert t["value"] == max(s["value"] for s in t["scores"])
        if t["status"] == "PRUNED":
            assert t["epochs_done"] < 9 and "pruned at epoch" in t["reason"]
        else:
            assert t["epochs_done"] == 9
    # Successive halving stopped some trials early, so not every trial cost its nine epochs.
    assert any(t["status"] == "PRUNED" for t in trials), trials
    best = max(trials, key=lambda t: (t["value"], -t["val_loss"]))
    assert listed["best"]["number"] == best["number"] and listed["metric"] == "val_accuracy"
    results = session["results"]
    assert results["best_trial"] == best["number"] and results["best_value"] == best["value"] > 0.9
    assert results["best_hyperparameters"] == best["hyperparameters"]
    assert results["trials"].get("completed", 0) + results["trials"].get("pruned", 0) == 8

    # The winner's model (at its best score) is the session's.
    model = user.get(f"/sessions/{session_id[:8]}/model")
    assert model.status_code == 200
    from trainer.predictor import Predictor
    from trainer.table import read_table

    predictions = Predictor.load(io.BytesIO(model.content)).predict_csv(digits_csv)
    table = read_table(digits_csv)
    truth = [table.classes[i] for i in table.y]
    assert np.mean([p == t for p, t in zip(predictions, truth, strict=True)]) > 0.9
    # The stream told each trial's story.
    kinds = [e["event"] for e in user.events(session_id)]
    assert kinds.count("trial") >= 8
    peers = {p["name"]: p for p in user.get("/peers").json()["peers"]}
    assert all(peers[name]["status"] == "ONLINE" for name in two_peers)


def test_a_sweep_given_no_settings_searches_the_default_space(platform, two_peers, digits_csv):
    user = platform.user()
    response = user.start(digits_csv, num_peers=2, trials=2, pruner="none")
    assert response.status_code == 202, response.text
    session = user.wait_finished(response.json()["session_id"], timeout=180)
    assert session["status"] == "COMPLETED", session
    trials = user.get(f"/sessions/{session['id']}/trials").json()["items"]
    # Never two identical runs: the default space varies learning rate, batch size, layers, decay and dropout.
    assert len(trials) == 2 and trials[0]["hyperparameters"] != trials[1]["hyperparameters"]
    assert all(t["status"] == "COMPLETED" and t["epochs_done"] == 10 for t in trials)
