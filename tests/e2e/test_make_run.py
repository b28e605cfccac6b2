"""`make run` on a fresh checkout: the whole platform in one process, a session completes over HTTP."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess

import pytest
import requests

from settings import ROOT
from tests.e2e.platform import Api, wait_until

pytestmark = pytest.mark.e2e


def test_make_run_serves_a_session_on_the_sample_csv(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Only the embedded defaults: none of the test run's service URLs leak in.
    env = {k: v for k, v in os.environ.items()
           if k not in ("BROKER_URL", "RESULT_BACKEND", "MONGODB_URI", "STORAGE_URL", "S3_ENDPOINT_URL",
                        "COORDINATOR_QUEUE", "MONITOR_QUEUE", "JWT_SECRET_KEY", "PEERTRAIN_ENV")}
    env.update(PORT=str(port), STORAGE_URL=str(tmp_path / "storage"), LOCAL_PEERS="2")
    log = (tmp_path / "make-run.log").open("wb")
    process = subprocess.Popen(["make", "run"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        def healthy():
            assert process.poll() is None, (tmp_path / "make-run.log").read_text()
            try:
                return requests.get(f"{base}/healthz", timeout=2).status_code == 200
            except requests.ConnectionError:
                return False

        wait_until(healthy, 60, "make run to serve the API", interval=0.25)
        user = Api(base).sign_up_and_in("ann")
        wait_until(lambda: user.get("/peers").json()["online"] == 2, 20, "the two local peers")
        hp = json.dumps([{"learning_rate": 0.01, "epochs": 20}, {"learning_rate": 0.001, "epochs": 20}])
        response = user.start(ROOT / "samples" / "wine.csv", num_peers=2, hyperparameters=hp)
        assert response.status_code == 202, response.text
        session = user.wait_finished(response.json()["session_id"], timeout=60)
        assert session["status"] == "COMPLETED", session
        assert session["results"]["best_value"] > 0.8
        assert len(user.heartbeats(session["id"])) == 40
        assert user.get(f"/sessions/{session['id']}/model").content[:8]
        banner = (tmp_path / "make-run.log").read_text()
        assert f"{base}/docs" in banner and "curl" in banner
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(30)
        log.close()
    assert process.returncode in (0, 2, -signal.SIGTERM), (tmp_path / "make-run.log").read_text()[-3000:]
