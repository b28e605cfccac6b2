"""Federated sessions end to end: shards per peer, weights averaged over rounds, one model back."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from trainer.table import read_table

pytestmark = pytest.mark.e2e

ROUNDS, LOCAL_EPOCHS = 6, 2
SETTINGS = json.dumps({"learning_rate": 0.003, "batch_size": 32, "hidden": [64]})


def start_federated(user, csv, num_peers, **form):
    fields = {"num_peers": num_peers, "mode": "federated", "rounds": ROUNDS, "local_epochs": LOCAL_EPOCHS,
              "hyperparameters": SETTINGS, **form}
    response = user.start(csv, **fields)
    assert response.status_code == 202, response.text
    return response.json()["session_id"]


def test_a_federated_session_trains_one_model_on_shards(platform, two_peers, digits_csv):
    user = platform.user()
    session_id = start_federated(user, digits_csv, 2)
    session = user.wait_finished(session_id, timeout=180)
    assert session["status"] == "COMPLETED", session

    # One global model, good on held-out rows, better round after round.
    rounds = user.get(f"/sessions/{session_id}/rounds").json()["items"]
    assert [r["round"] for r in rounds] == list(range(ROUNDS)) == [r["round"] for r in session["rounds"]]
    accuracy = [r["metrics"]["val_accuracy"] for r in rounds]
    assert accuracy[-1] >= 0.9 and accuracy[-1] > accuracy[0]
    assert session["results"]["best_value"] == accuracy[-1]
    assert all(r["rejected"] == {} and sorted(r["peers"]) == sorted(two_peers) for r in rounds)

    # Every peer reported every local epoch of every round, and fetched only its own shard, once.
    for peer in two_peers:
        beats = user.heartbeats(session_id, peer=peer)
        assert [(b["round"], b["epoch"]) for b in beats] == [
            (r, e) for r in range(ROUNDS) for e in range(1, LOCAL_EPOCHS + 1)]
        assert all(b["sent_at"] for b in beats)

    # The event stream tells the same story: each round's global metrics after its heartbeats, then the end.
    stream = list(user.events(session_id))
    kinds = [e["event"] for e in stream]
    assert kinds.count("round") == ROUNDS and kinds.count("heartbeat") == ROUNDS * LOCAL_EPOCHS * 2
    assert [e["data"]["metrics"] for e in stream if e["event"] == "round"] == [r["metrics"] for r in rounds]
    for event in (e for e in stream if e["event"] == "round"):
        before = [e["data"] for e in stream[:stream.index(event)] if e["event"] == "heartbeat"]
        assert sum(b["round"] == event["data"]["round"] for b in before) == LOCAL_EPOCHS * 2
    assert kinds[-1] == "end" and stream[-1]["data"]["status"] == "COMPLETED"
    size = digits_csv.stat().st_size
    fetched = [p["bytes_fetched"] for p in session["peers"]]
    assert all(0 < f < 0.6 * size for f in fetched)
    assert sum(fetched) / size <= 1.05

    # The downloaded model predicts exactly as the final global weights do in the trainer.
    from tasks.storage import open_storage
    from trainer.model import ModelConfig, SimpleDNN
    from trainer.normalization import Normalization
    from trainer.predictor import Predictor
    from trainer.weights import state_from_bytes

    download = user.get(f"/sessions/{session_id}/model")
    assert download.status_code == 200
    predictor = Predictor.load(io.BytesIO(download.content))
    table = read_table(digits_csv)
    storage = open_storage(platform.storage_url, platform.s3_endpoint)
    config = predictor.checkpoint.config
    global_url = predictor.checkpoint.metadata["global_weights_url"]
    assert global_url.endswith(f"/sessions/{session_id}/rounds/{ROUNDS - 1}/global.safetensors")
    state = state_from_bytes(storage.get_bytes(global_url), ModelConfig.from_dict(config.to_dict()))
    model = SimpleDNN(config)
    model.load_state_dict(state)
    normalization = Normalization.from_dict(predictor.checkpoint.normalization.to_dict())
    import torch

    with torch.no_grad():
        expected = model(torch.from_numpy(normalization.apply(table.x))).argmax(dim=1).numpy()
    predicted = predictor.predict(table.x)
    assert predicted == [table.classes[i] for i in expected]
    assert np.mean([p == table.classes[t] for p, t in zip(predicted, table.y, strict=True)]) > 0.9

    # Every round's global model can be downloaded; the final one is the last round's.
    assert user.get(f"/sessions/{session_id}/model", round=ROUNDS - 1).content == download.content
    first = user.get(f"/sessions/{session_id}/model", round=0)
    assert first.status_code == 200 and "round-0" in first.headers["Content-Disposition"]
    checkpoint = Predictor.load(io.BytesIO(first.content)).checkpoint
    assert checkpoint.metadata["round"] == 0 and len(checkpoint.metadata["rounds"]) == 1
    assert checkpoint.metadata["global_weights_url"].endswith(f"/sessions/{session_id}/rounds/0/global.safetensors")
    assert first.content != download.content
    missing = user.get(f"/sessions/{session_id}/model", round=ROUNDS)
    assert missing.status_code == 404 and f"no round {ROUNDS}" in missing.json()["message"]
    refused = user.get(f"/sessions/{session_id}/model", round=-1)
    assert refused.status_code == 400 and "round" in refused.json()["errors"], refused.json()


@pytest.mark.parametrize(("aggregation", "fault", "verdict"), [("fedavg", "nan", "rejected"),
                                                               ("median", "noise", "outliers")])
def test_a_peer_with_corrupted_weights_is_rejected_or_outvoted(platform, two_peers, digits_csv, unique,
                                                               aggregation, fault, verdict):
    liar = unique(f"liar{fault}")
    platform.start_peers(liar, app="tests.e2e.faulty_peer", PEERTRAIN_TEST_FAULT=fault)
    try:
        user = platform.user()
        session_id = start_federated(user, digits_csv, 3, aggregation=aggregation,
                                     min_peers=2 if aggregation == "fedavg" else 3)
        session = user.wait_finished(session_id, timeout=180)
        assert session["status"] == "COMPLETED", session
        for r in session["rounds"]:
            assert liar in r[verdict], r
            if verdict == "rejected":
                assert "finite" in r["rejected"][liar]
                assert liar not in r["peers"]
        assert session["rounds"][-1]["metrics"]["val_accuracy"] >= 0.85
    finally:
        platform.stop_peer(liar)


def test_a_federated_session_goes_on_without_a_failed_peer_when_min_peers_allows(platform, two_peers,
                                                                                  digits_csv, unique):
    broken = unique("fedbroken")
    # Its storage requests go through a proxy that refuses them: a machine that cannot reach storage.
    platform.start_peers(broken, HTTP_PROXY="http://127.0.0.1:9", http_proxy="http://127.0.0.1:9")
    try:
        user = platform.user()
        session_id = start_federated(user, digits_csv, 3, min_peers=2)
        session = user.wait_finished(session_id, timeout=180)
        assert session["status"] == "COMPLETED", session
        by_peer = {p["name"]: p for p in session["peers"]}
        assert by_peer[broken]["status"] == "FAILED" and "TransferError" in by_peer[broken]["error"]
        assert all(broken not in r["peers"] for r in session["rounds"])
        assert len(session["rounds"]) == ROUNDS
        # Without the slack, the same failure ends the session.
        strict = start_federated(user, digits_csv, 3)
        failed = user.wait_finished(strict, timeout=60)
        assert failed["status"] == "FAILED" and f"peer {broken} failed" in failed["reason"]
    finally:
        platform.stop_peer(broken)


def test_an_interrupted_asynchronous_session_resumes_from_its_global_version(platform, two_peers, digits_csv):
    from harness.waiting import wait_until
    from models import session as sessions
    from tasks import lifecycle

    user = platform.user()
    session_id = start_federated(user, digits_csv, 2, schedule="async", buffer_size=2, max_updates=24,
                                 local_epochs=1)
    wait_until(lambda: len(user.session(session_id)["rounds"]) >= 2, 120, "two folds")
    # The platform stops under it (as make run's stop does): no peer is blamed, the tasks out are given back.
    assert lifecycle.end(platform.celery, session_id, sessions.INTERRUPTED, "the platform was stopped")
    interrupted = user.session(session_id)
    assert interrupted["status"] == "INTERRUPTED" and {p["status"] for p in interrupted["peers"]} == {"INTERRUPTED"}
    wait_until(lambda: user.get("/peers").json()["free"] >= 2, 60, "its peers, free again")

    answer = user.post(f"/sessions/{session_id}/resume")
    assert answer.status_code == 202, answer.text
    done = user.wait_finished(session_id, timeout=240)
    assert done["status"] == "COMPLETED" and done["resumes"] == 1, done
    versions = [r["round"] for r in done["rounds"]]
    assert done["rounds"][:len(interrupted["rounds"])] == interrupted["rounds"]  # kept, not redone
    assert versions == list(range(len(versions))) and len(versions) > len(interrupted["rounds"])
    updates = user.get(f"/sessions/{session_id}/updates").json()["items"]
    folded = sum(len(r["updates"]) for r in done["rounds"])
    assert folded <= 24 and sum(u["status"] == "FOLDED" for u in updates) == folded
    assert done["rounds"][-1]["metrics"]["val_accuracy"] > interrupted["rounds"][-1]["metrics"]["val_accuracy"] - 0.02


@pytest.mark.parametrize(("form", "kept"), [({"algorithm": "fedprox", "mu": 0.05}, False),
                                            ({"algorithm": "fedavgm", "server_lr": 0.5}, True),
                                            ({"algorithm": "scaffold"}, True)],
                         ids=["fedprox", "fedavgm", "scaffold"])
def test_a_federated_algorithm_trains_on_real_peers_with_its_state_kept(platform, two_peers, digits_csv, form, kept):
    from models import TrainingSession

    user = platform.user()
    session_id = start_federated(user, digits_csv, 2, partition="label_skew", alpha=0.5, **form)
    session = user.wait_finished(session_id, timeout=180)
    assert session["status"] == "COMPLETED", session
    assert session["federated"]["algorithm"] == session["results"]["algorithm"] == form["algorithm"]
    rounds = session["rounds"]
    assert len(rounds) == ROUNDS and rounds[-1]["metrics"]["val_accuracy"] >= 0.85
    assert all(r["rejected"] == {} for r in rounds)  # the peers' updates pass screening under either
    plan = TrainingSession.objects.get(id=session_id).plan
    # FedAvgM's momentum or SCAFFOLD's control variate, kept round by round next to the global weights; FedProx
    # keeps none.
    assert (plan.server_url or "").endswith(f"/rounds/{ROUNDS - 1}/server.safetensors") if kept \
        else plan.server_url is None
