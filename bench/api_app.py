"""The apps bench/api.py serves from a separate server process (granian loads them by name).

`create()` builds the real API on mongomock inside the worker process that serves it (mongomock lives in
one process), seeds it, and writes every user's Authorization header, newest session id and one running
session to the JSON file named by BENCH_API_SEED, for the load generator; it returns the API as granian's
ASGI interface serves it (webapp/asgi.py), `create_wsgi()` the Flask app alone for the WSGI interface.
With BENCH_API_EVENTS=R the running session gets R heartbeat events a second, for the streams that follow it.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from typing import Any


def _seeded() -> Any:
    from bench import api as bench

    bench._setup_env()
    storage = tempfile.mkdtemp(prefix="peertrain-bench-")
    app = bench.build_app(storage)
    seeded = bench.seed_app(app, int(os.environ["BENCH_API_USERS"]), int(os.environ["BENCH_API_SESSIONS"]))
    running = bench.make_session(seeded["owners"][0], minutes_ago=0, status="RUNNING")
    seeded["running"] = str(running.id)
    rate = float(os.environ.get("BENCH_API_EVENTS") or 0)
    if rate:
        threading.Thread(target=_heartbeats, args=(running.id, rate), daemon=True, name="bench-events").start()
    with open(os.environ["BENCH_API_SEED"] + ".tmp", "w") as file:
        json.dump(seeded, file)
    os.replace(os.environ["BENCH_API_SEED"] + ".tmp", os.environ["BENCH_API_SEED"])
    return app


def _heartbeats(session_id: Any, rate: float) -> None:
    """Store heartbeats of the running session at `rate` a second, as the monitor would."""
    from models import heartbeat as heartbeats

    epoch, due = 0, time.monotonic()
    while True:
        epoch += 1
        heartbeats.insert_many([{"session_id": session_id, "peer": "peer1", "round": 0, "epoch": epoch,
                                 "epochs": 10**9, "loss": 1.0 / epoch, "finished_at": time.time()}])
        due += 1.0 / rate
        time.sleep(max(0.0, due - time.monotonic()))


def create() -> Any:
    from webapp.asgi import serve

    return serve(_seeded())


def create_wsgi() -> Any:
    import gc

    app = _seeded()
    gc.freeze()  # as webapp.asgi.serve does: the two rows differ by the interface alone
    return app


def hello_wsgi(environ: dict, start_response: Any) -> list[bytes]:
    body = b'{"hello": "world"}'
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]


async def hello_asgi(scope: dict, receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    body = b'{"hello": "world"}'
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def hello_flask() -> Any:
    from flask import Flask, jsonify

    app = Flask("floor")
    app.add_url_rule("/hello", "hello", lambda: jsonify(hello="world"))
    return app


def hello_flask_asgi() -> Any:
    """The one-route Flask app through the same adapter as the API (a2wsgi, 4 threads): its cost alone."""
    from a2wsgi import WSGIMiddleware

    from webapp.asgi import THREADS

    wsgi = WSGIMiddleware(hello_flask(), workers=THREADS)

    async def app(scope: dict, receive: Any, send: Any) -> None:
        async def coroutine_receive() -> dict:
            return await receive()

        await wsgi(scope, coroutine_receive, send)

    return app
