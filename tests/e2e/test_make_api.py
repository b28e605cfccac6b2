"""`make api`: the production server (granian) serves the app factory; the API answers over real HTTP."""

from __future__ import annotations

import os

import pytest
import requests

from tests.e2e.platform import Api, make_target

pytestmark = pytest.mark.e2e


def test_make_api_serves_the_app_with_granian(tmp_path):
    # mongomock lives in one process: one worker, so sign-up and sign-in meet the same database.
    env = {**os.environ, "API_WORKERS": "1", "PEERTRAIN_ENV": "production",
           "MONGODB_URI": "mongomock://localhost/make-api", "STORAGE_URL": str(tmp_path / "storage")}
    with make_target("api", env, tmp_path / "make-api.log") as base:
        user = Api(base).sign_up_and_in("ann")
        for _ in range(2):  # the second answer would come from the polling cache if errors were kept
            response = user.get("/sessions/training-status")
            assert response.status_code == 404
            assert response.json()["message"] == "you have no sessions yet"
        assert response.headers["server"] == "granian"
        assert requests.get(f"{base}/sessions/training-status", timeout=5).status_code == 401
