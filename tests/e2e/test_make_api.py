"""`make api`: the production server (granian) serves the app factory; the API answers over real HTTP."""

from __future__ import annotations

import os

import pytest
import requests

from harness.http import Api
from harness.processes import make_target

pytestmark = pytest.mark.e2e


def test_make_api_serves_the_app_with_granian(tmp_path):
    # mongomock lives in one process: one worker, so sign-up and sign-in meet the same database.
    env = {**os.environ, "API_WORKERS": "1", "PEERTRAIN_ENV": "production",
           "MONGODB_URI": "mongomock://localhost/make-api", "STORAGE_URL": str(tmp_path / "storage")}
    with make_target("api", env, tmp_path / "make-api.log") as base:
        user = Api(base).sign_up_and_in("ann")
        response = user.get("/sessions/training-status")
        assert response.status_code == 404
        assert response.json()["message"] == "you have no sessions yet"
        assert response.headers["server"] == "granian"
        assert requests.get(f"{base}/sessions/training-status", timeout=5).status_code == 401
        peers = user.get("/peers")
        assert peers.status_code == 200 and peers.json()["free"] == 0
        assert user.http.get(f"{base}/peers", headers={"If-None-Match": peers.headers["ETag"]}).status_code == 304
        wrong = requests.delete(f"{base}/peers", timeout=5)
        assert wrong.status_code == 405 and "GET" in wrong.headers["Allow"] and wrong.json()["code"] == 405
        # The event stream's refusals come from the Flask app, in the API's error shape.
        missing = user.get("/sessions/6b0c1381f65f0b23ff55af27/events")
        assert missing.status_code == 404 and missing.json()["code"] == 404
        assert requests.get(f"{base}/sessions/6b0c1381f65f0b23ff55af27/events", timeout=5).status_code == 401
