"""`make api`: the production server (granian) serves the app factory; the API answers over real HTTP."""

from __future__ import annotations

import os
import signal
import socket
import subprocess

import pytest
import requests

from settings import ROOT
from tests.e2e.platform import Api, wait_until

pytestmark = pytest.mark.e2e


def test_make_api_serves_the_app_with_granian(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # mongomock lives in one process: one worker, so sign-up and sign-in meet the same database.
    env = {**os.environ, "PORT": str(port), "API_WORKERS": "1", "PEERTRAIN_ENV": "production",
           "MONGODB_URI": "mongomock://localhost/make-api", "STORAGE_URL": str(tmp_path / "storage")}
    log = (tmp_path / "make-api.log").open("wb")
    process = subprocess.Popen(["make", "api"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        def healthy():
            assert process.poll() is None, (tmp_path / "make-api.log").read_text()
            try:
                return requests.get(f"{base}/healthz", timeout=2).status_code == 200
            except requests.ConnectionError:
                return False

        wait_until(healthy, 60, "make api to serve the API", interval=0.25)
        user = Api(base).sign_up_and_in("ann")
        for _ in range(2):  # the second answer comes from the polling cache: the same error, not kept
            response = user.get("/sessions/training-status")
            assert response.status_code == 404
            assert response.json()["message"] == "you have no sessions yet"
        assert response.headers["server"] == "granian"
        assert requests.get(f"{base}/sessions/training-status", timeout=5).status_code == 401
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(30)
        log.close()
