"""The apps bench/api.py serves from a separate server process (granian loads them by name).

`create()` builds the real API on mongomock inside the worker process that serves it (mongomock lives in
one process), seeds it, and writes every user's Authorization header and newest session id to the JSON
file named by BENCH_API_SEED, for the load generator.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))


def create() -> Any:
    import api as bench

    bench._setup_env()
    storage = tempfile.mkdtemp(prefix="peertrain-bench-")
    app = bench.build_app(storage)
    seeded = bench.seed_app(app, int(os.environ["BENCH_API_USERS"]), int(os.environ["BENCH_API_SESSIONS"]))
    with open(os.environ["BENCH_API_SEED"] + ".tmp", "w") as file:
        json.dump(seeded, file)
    os.replace(os.environ["BENCH_API_SEED"] + ".tmp", os.environ["BENCH_API_SEED"])
    return app


def hello_wsgi(environ: dict, start_response: Any) -> list[bytes]:
    body = b'{"hello": "world"}'
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]


def hello_flask() -> Any:
    from flask import Flask, jsonify

    app = Flask("floor")
    app.add_url_rule("/hello", "hello", lambda: jsonify(hello="world"))
    return app
