"""`make run` on a fresh checkout: the whole platform in one process, a session completes over HTTP."""

from __future__ import annotations

import json
import os

import pytest

from settings import ROOT
from tests.e2e.platform import Api, make_target, wait_until

pytestmark = pytest.mark.e2e


def test_make_run_serves_a_session_on_the_sample_csv(tmp_path):
    # Only the embedded defaults: none of the test run's service URLs leak in.
    env = {k: v for k, v in os.environ.items()
           if k not in ("BROKER_URL", "RESULT_BACKEND", "MONGODB_URI", "STORAGE_URL", "S3_ENDPOINT_URL",
                        "COORDINATOR_QUEUE", "MONITOR_QUEUE", "JWT_SECRET_KEY", "PEERTRAIN_ENV")}
    env.update(STORAGE_URL=str(tmp_path / "storage"), LOCAL_PEERS="2")
    log = tmp_path / "make-run.log"
    with make_target("run", env, log) as base:
        user = Api(base).sign_up_and_in("ann")
        wait_until(lambda: user.get("/peers").json()["online"] == 2, 20, "the two local peers")
        hp = json.dumps([{"learning_rate": 0.01, "epochs": 20}, {"learning_rate": 0.001, "epochs": 20}])
        response = user.start(ROOT / "samples" / "wine.csv", num_peers=2, hyperparameters=hp)
        assert response.status_code == 202, response.text
        # Followed live through granian's ASGI path, from the start to the end.
        stream = list(user.events(response.json()["session_id"]))
        assert [e["event"] for e in stream].count("heartbeat") == 40 and stream[-1]["event"] == "end"
        assert [e["id"] for e in stream] == list(range(1, len(stream) + 1))
        session = user.wait_finished(response.json()["session_id"], timeout=60)
        assert session["status"] == "COMPLETED", session
        assert session["results"]["best_value"] > 0.8
        assert len(user.heartbeats(session["id"])) == 40
        assert user.get(f"/sessions/{session['id']}/model").content[:8]
        banner = log.read_text()
        assert f"{base}/docs" in banner and "curl" in banner
        assert f"{base}/ " in banner and "peertrain start" in banner
        assert "<title>peertrain</title>" in user.get("/").text  # the dashboard, served by granian too
