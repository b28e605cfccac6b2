"""schemathesis against the API's own /openapi.json, over real HTTP, signed in: no 5xx, answers as documented."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from werkzeug.serving import make_server

from harness.datasets import blobs_csv
from models import TrainingSession
from models.session import COMPLETED
from webapp import create_app
from webapp.extensions import storage

CONFIG = Path(__file__).with_name("schemathesis.toml")
MIN_REQUESTS = 1000


class Counted:
    """WSGI middleware counting the statuses the server answered, as the server saw them."""

    def __init__(self, app) -> None:
        self.app, self.statuses, self.lock = app, Counter(), threading.Lock()

    def __call__(self, environ, start_response):
        def counted(status: str, headers, exc_info=None):
            with self.lock:
                self.statuses[int(status.split()[0])] += 1
            return start_response(status, headers, exc_info)

        return self.app(environ, counted)


@pytest.fixture
def served(db, storage_dir, online_peers, tmp_path) -> Iterator[tuple[str, dict[str, str], Counted]]:
    """The API on a free port with a signed-in user who has sessions: one pending, one finished with a model."""
    # Throttling would answer most sign-ins and sign-ups 429 before their logic runs; it has its own tests.
    app = create_app({"MONGODB_URI": db, "STORAGE_URL": str(storage_dir), "BCRYPT_ROUNDS": 4,
                      "AUTH_LIMIT_PER_ADDRESS": "1000000/minute", "AUTH_LIMIT_PER_ACCOUNT": "1000000/minute"})
    client = app.test_client()
    account = {"username": "fuzz", "email": "fuzz@example.com", "password": "correct horse"}
    assert client.post("/auth/signup", json=account).status_code == 201
    token = client.post("/auth/signin", json={k: account[k] for k in ("email", "password")}).json["access_token"]
    headers = {"Authorization": f"Bearer {token}"}
    online_peers(4)
    csv = blobs_csv(tmp_path / "blobs.csv", rows=60, features=3, classes=2)
    for _ in range(2):
        with csv.open("rb") as f:
            started = client.post("/sessions/start", headers=headers, content_type="multipart/form-data",
                                  data={"file": (f, "blobs.csv"), "num_peers": "1"})
        assert started.status_code == 202, started.json
    with app.app_context():
        model_url = storage().put_bytes("fuzz/model.safetensors", b"weights")
    TrainingSession.objects(id=started.json["session_id"]).update_one(set__status=COMPLETED,
                                                                     set__model_url=model_url)
    counted = Counted(app.wsgi_app)
    app.wsgi_app = counted
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, name="fuzzed-api", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", headers, counted
    finally:
        server.shutdown()
        thread.join(10)


@pytest.mark.slow  # ~25 s: `make test` runs it, the unit lane does not
def test_generated_requests_get_no_5xx_and_documented_answers(served, tmp_path):
    base, headers, counted = served
    report = tmp_path / "report.json"
    # Every phase (examples, coverage, fuzzing, stateful over the schema's links) and every check; a fixed
    # seed keeps CI reproducible.
    command = [sys.executable, "-m", "schemathesis.cli", "--config-file", str(CONFIG), "run",
               f"{base}/openapi.json", "--header", f"Authorization: {headers['Authorization']}",
               "--checks", "all", "--max-examples", "60", "--seed", "20261129", "--workers", "1",
               "--report", "json", "--report-json-path", str(report), "--no-color"]
    # In a scratch folder: hypothesis and schemathesis keep example databases and caches in the working one.
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    summary = json.loads(report.read_text()) if report.exists() else {}
    assert result.returncode == 0, result.stdout[-12000:] + result.stderr[-3000:]
    # Every operation but the event stream (an answer that lasts as long as its session: see schemathesis.toml).
    assert (summary["operations"]["tested"], summary["operations"]["total"]) == (26, 27)
    assert not summary["failures"] and not summary["errors"]
    # What the server itself answered: enough requests, none of them a 5xx.
    assert sum(counted.statuses.values()) >= MIN_REQUESTS, counted.statuses
    assert not [code for code in counted.statuses if code >= 500], counted.statuses
