"""Benchmark the served API: req/s and latency of the two polling routes at 50 concurrent clients.

The app runs here, as `make run` serves it (werkzeug's threaded server in a thread of this process,
mongomock inside it); the clients run in separate processes, each holding keep-alive connections
over loopback. Each route is compared with two floors measured on the same kind of server in the
same run: a bare WSGI hello-world and a one-route Flask app, so a noisy machine shows in the floors
too and the ratios stay meaningful.

Closed loop (each client sends its next request as soon as the previous answer arrives) measures
saturation: by Little's law p50 ≈ clients / throughput, so a p99 of 20 ms at 50 clients needs
≥ 2,500 req/s. The "paced" rows are open loop: 50 clients polling at a fixed rate (a fraction of
the measured saturation throughput), latency counted from each request's scheduled time.

Run: .venv/bin/python bench/api.py [--seconds S] [--clients N] [--processes P] [--profile N]
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import multiprocessing
import os
import resource
import sys
import tempfile
import threading
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET_P99_MS = 20.0
SECRET = "bench-secret-that-is-long-enough-for-hs256"
DB_URI = "mongomock://localhost/bench"


# --- load generator (runs in child processes: standard library only) -------------------------------


def _client_thread(port: int, path: str, headers: dict[str, str], start: float, warm_end: float, end: float,
                   interval: float, offset: float, out: list) -> None:
    # Latency is measured from when the request was due: for paced clients that includes any
    # wait for the previous answer, so a slow server cannot hide its queue (coordinated omission).
    latencies, errors = array("d"), 0
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.connect()
    due = start + offset
    while time.monotonic() < start:
        time.sleep(0.001)
    while True:
        now = time.monotonic()
        if interval:
            if due > now:
                time.sleep(due - now)
            t0 = due
            due += interval
        else:
            t0 = now
        if t0 >= end:
            break
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        response.read()
        t1 = time.monotonic()
        if response.status != 200:
            errors += 1
        if t0 >= warm_end:
            latencies.append(t1 - t0)
    conn.close()
    out.append((latencies, errors))


def _client_process(pipe: Any) -> None:
    """Serve load jobs from the parent until it sends None."""
    while (job := pipe.recv()) is not None:
        cpu = time.process_time()
        out: list = []
        threads = [
            threading.Thread(target=_client_thread, args=(
                job["port"], job["path"], job["headers"], job["start"], job["warm_end"], job["end"],
                job["interval"], job["interval"] * (job["first"] + i) / job["clients"], out))
            for i in range(job["threads"])
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        latencies = array("d")
        for part, _ in out:
            latencies.extend(part)
        pipe.send({"latencies": latencies.tobytes(), "errors": sum(e for _, e in out),
                   "cpu": time.process_time() - cpu})


class LoadGenerator:
    """`processes` client processes that together hold `clients` keep-alive connections."""

    def __init__(self, processes: int) -> None:
        context = multiprocessing.get_context("spawn")  # the children need nothing of this process
        self.pipes, self.children = [], []
        for _ in range(processes):
            parent, child = context.Pipe()
            process = context.Process(target=_client_process, args=(child,), daemon=True)
            process.start()
            self.pipes.append(parent)
            self.children.append(process)

    def run(self, port: int, path: str, headers: dict[str, str], clients: int, warmup: float, seconds: float,
            interval: float = 0.0) -> dict[str, Any]:
        """Load `path` for warmup + seconds; latencies and counts of the measured part only."""
        n = min(len(self.pipes), clients)
        start = time.monotonic() + 0.3  # time for every connection to open before the start
        job = {"port": port, "path": path, "headers": headers, "start": start, "warm_end": start + warmup,
               "end": start + warmup + seconds, "interval": interval, "clients": clients}
        first = 0
        for i, pipe in enumerate(self.pipes[:n]):
            threads = clients // n + (1 if i < clients % n else 0)
            pipe.send({**job, "threads": threads, "first": first})
            first += threads
        cpu0, wall0 = _server_cpu(), time.monotonic()
        replies = [pipe.recv() for pipe in self.pipes[:n]]
        server_cpu = (_server_cpu() - cpu0) / (time.monotonic() - wall0)
        latencies = array("d")
        for reply in replies:
            latencies.frombytes(reply["latencies"])
        return {
            "latencies": sorted(latencies), "seconds": seconds, "errors": sum(r["errors"] for r in replies),
            "client_cpu": sum(r["cpu"] for r in replies) / (time.monotonic() - wall0), "server_cpu": server_cpu,
        }

    def close(self) -> None:
        for pipe in self.pipes:
            pipe.send(None)
        for process in self.children:
            process.join(5)


def _server_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# --- the served app and its data ------------------------------------------------------------------


def _setup_env() -> None:
    os.environ.setdefault("PEERTRAIN_ENV", "development")
    os.environ.setdefault("JWT_SECRET_KEY", SECRET)
    os.environ.setdefault("BCRYPT_ROUNDS", "4")
    sys.path.insert(0, ROOT)


def build_app(storage_dir: str) -> Any:
    """The real API, configured as the tests configure it, on mongomock."""
    import models
    from webapp import create_app

    models.connect(DB_URI)
    return create_app({"MONGODB_URI": DB_URI, "STORAGE_URL": storage_dir, "BCRYPT_ROUNDS": 4,
                       "JWT_SECRET_KEY": SECRET})


def _call(port: int, method: str, path: str, body: dict | None = None, headers: dict | None = None) -> Any:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request(method, path, body=json.dumps(body) if body is not None else None,
                 headers={"Content-Type": "application/json", **(headers or {})})
    response = conn.getresponse()
    data = json.loads(response.read() or b"null")
    conn.close()
    return response.status, data


def sign_in(port: int, username: str) -> tuple[str, dict[str, str]]:
    """Sign a user up and in over HTTP; their id and Authorization header."""
    email, password = f"{username}@example.com", "correct horse battery"
    status, user = _call(port, "POST", "/auth/signup", {"username": username, "email": email, "password": password})
    assert status == 201, user
    status, token = _call(port, "POST", "/auth/signin", {"email": email, "password": password})
    assert status == 200, token
    return user["id"], {"Authorization": f"Bearer {token['access_token']}"}


FEATURES = ["alcohol", "malic_acid", "ash", "alcalinity_of_ash", "magnesium", "total_phenols", "flavanoids",
            "nonflavanoid_phenols", "proanthocyanins", "color_intensity", "hue", "od280/od315_of_diluted_wines",
            "proline"]
HYPERPARAMETERS = [
    {"batch_size": 32, "epochs": 20, "learning_rate": 0.01, "hidden": [64, 32], "optimizer": "adam", "dropout": 0.0},
    {"batch_size": 64, "epochs": 20, "learning_rate": 0.001, "hidden": [128, 64], "optimizer": "adam", "dropout": 0.1},
    {"batch_size": 16, "epochs": 20, "learning_rate": 0.05, "hidden": [32], "optimizer": "sgd", "dropout": 0.0},
    {"batch_size": 128, "epochs": 20, "learning_rate": 0.003, "hidden": [256, 128, 64], "optimizer": "adam",
     "dropout": 0.2},
]


def make_session(owner_id: str, minutes_ago: float, epochs: int = 20) -> Any:
    """A finished 4-peer sweep on the wine data, as the coordinator leaves one, with its heartbeats."""
    from datetime import timedelta

    from bson import ObjectId

    from models import Dataset, PeerRun, TrainingSession, utcnow
    from models import heartbeat as heartbeats
    from models.session import COMPLETED

    created = utcnow() - timedelta(minutes=minutes_ago)
    runs, history = [], []
    for i, hp in enumerate(HYPERPARAMETERS):
        name = f"peer{i + 1}"
        final = {"epoch": epochs, "epochs": epochs, "loss": 0.05 + i / 50, "accuracy": 0.97 - i / 100,
                 "val_loss": 0.09 + i / 40, "val_accuracy": 0.95 - i / 50, "val_r2": None,
                 "samples_per_sec": 41_000.0 + 1_000 * i, "seconds": 0.004, "samples": 142}
        runs.append(PeerRun(name=name, status=COMPLETED, hyperparameters=hp, task_id=str(ObjectId()), round=0,
                            epoch=epochs, epochs=epochs, loss=final["loss"], accuracy=final["accuracy"],
                            val_loss=final["val_loss"], val_accuracy=final["val_accuracy"],
                            samples_per_sec=final["samples_per_sec"], updated_at=created, final=final,
                            samples=142 * epochs, bytes_fetched=10_974,
                            weights_url=f"s3://peertrain/users/{owner_id}/weights/{name}.safetensors"))
        history += [{"peer": name, "round": 0, "epoch": e, "epochs": epochs, "loss": 1.0 / e, "accuracy": 1 - 0.5 / e,
                     "val_loss": 1.2 / e, "val_accuracy": 1 - 0.6 / e, "samples_per_sec": 40_000.0, "seconds": 0.004}
                    for e in range(1, epochs + 1)]
    session = TrainingSession(
        owner_id=ObjectId(owner_id), status=COMPLETED, mode="sweep", task="classification", target="label",
        features=FEATURES, seed=7,
        dataset=Dataset(filename="wine.csv", url=f"s3://peertrain/users/{owner_id}/datasets/wine.csv",
                        bytes=10_974, sha256="9" * 64, rows=178, columns=14, classes=["0", "1", "2"]),
        peers=runs, created_at=created, started_at=created + timedelta(seconds=1),
        finished_at=created + timedelta(seconds=9), deadline=created + timedelta(hours=1),
        results={"metric": "val_accuracy", "best_peer": "peer1", "best_value": 0.95,
                 "peers": {r.name: {"val_accuracy": r.val_accuracy, "val_loss": r.val_loss, "seconds": 8.0,
                                    "samples_per_sec": r.samples_per_sec} for r in runs}},
        model_url=f"s3://peertrain/users/{owner_id}/weights/peer1.safetensors",
    ).save()
    heartbeats.insert_many({**hb, "session_id": session.id} for hb in history)
    return session


def seed(port: int, users: int, sessions_per_user: int) -> tuple[dict[str, str], str]:
    """`users` accounts with `sessions_per_user` sessions each; the first user's header and newest session."""
    header, newest = {}, ""
    for u in range(users):
        user_id, auth = sign_in(port, f"user{u:03d}")
        for s in range(sessions_per_user):
            session = make_session(user_id, minutes_ago=(sessions_per_user - s) * 60 + u)
        if u == 0:
            header, newest = auth, str(session.id)
    return header, newest


def hello_wsgi(environ: dict, start_response: Callable) -> list[bytes]:
    body = b'{"hello": "world"}'
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]


def hello_flask() -> Any:
    from flask import Flask, jsonify

    app = Flask("floor")
    app.add_url_rule("/hello", "hello", lambda: jsonify(hello="world"))
    return app


class Server:
    """`app` on werkzeug's threaded server in a thread of this process, as embedded.py serves it."""

    def __init__(self, app: Any) -> None:
        from werkzeug.serving import make_server

        self.server = make_server("127.0.0.1", 0, app, threaded=True)
        self.port = self.server.server_port
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# --- report ---------------------------------------------------------------------------------------


@dataclass
class Row:
    name: str
    clients: int
    result: dict[str, Any]
    floor: Row | None = None
    note: str = ""
    ms: dict[str, float] = field(init=False)

    def __post_init__(self) -> None:
        lat = self.result["latencies"]
        self.requests = len(lat)
        self.rps = self.requests / self.result["seconds"]

        def q(p: float) -> float:
            return lat[min(len(lat) - 1, int(p * len(lat)))] * 1e3 if lat else float("nan")

        self.ms = {"p50": q(0.50), "p90": q(0.90), "p99": q(0.99), "max": lat[-1] * 1e3 if lat else float("nan")}

    def line(self) -> str:
        ratio = ""
        if self.floor is not None:
            ratio = f"{self.rps / self.floor.rps:5.2f} {self.ms['p99'] / self.floor.ms['p99']:6.1f}"
        verdict = "pass" if self.ms["p99"] <= TARGET_P99_MS else "FAIL"
        return (f"{self.name:<34} {self.clients:>3} {self.requests:>7} {self.rps:>7.0f} "
                f"{self.ms['p50']:>6.1f} {self.ms['p90']:>6.1f} {self.ms['p99']:>6.1f} {self.ms['max']:>6.1f} "
                f"{verdict:>4} {self.result['server_cpu']:>4.0%} {self.result['client_cpu']:>4.0%} "
                f"{self.result['errors']:>3} {ratio:>13}  {self.note}")


HEADER = (f"{'row':<34} {'cli':>3} {'reqs':>7} {'req/s':>7} {'p50':>6} {'p90':>6} {'p99':>6} {'max':>6} "
          f"{'p99':>4} {'srv':>4} {'cli':>4} {'err':>3} {'x floor':>13}\n"
          f"{'':<34} {'':>3} {'':>7} {'':>7} {'ms':>6} {'ms':>6} {'ms':>6} {'ms':>6} "
          f"{'≤20':>4} {'cpu':>4} {'cpu':>4} {'':>3} {'rps':>5} {'p99':>6}")


# --- profile --------------------------------------------------------------------------------------

STAGES = [
    ("whole request (test client)", "werkzeug/test.py", "open"),
    ("JWT verify (decode + user lookup)", "flask_jwt_extended/view_decorators.py", "verify_jwt_in_request"),
    ("  jwt.decode (PyJWT)", "jwt/api_jwt.py", "decode"),
    ("  user lookup (webapp.auth._load_user)", "webapp/auth.py", "_load_user"),
    ("view function (webapp/sessions.py)", "webapp/sessions.py", "get"),
    ("every query: QuerySet.first", "mongoengine/queryset/base.py", "first"),
    ("  mongomock find (scan, sort, copy)", "mongomock/collection.py", "_compute_results"),
    ("  mongoengine _from_son (build docs)", "mongoengine/base/document.py", "_from_son"),
    ("mongoengine auto-dereference", "mongoengine/dereference.py", "__call__"),
    ("marshmallow Schema.dump", "marshmallow/schema.py", "dump"),
    ("flask jsonify", "flask/json/__init__.py", "jsonify"),
]


def profile(app: Any, header: dict[str, str], session_id: str, n: int) -> None:
    """Time `n` requests per route through the test client, then cProfile them: where a request's time goes."""
    import cProfile
    import pstats

    client = app.test_client()
    for path in (f"/sessions/{session_id}", "/sessions/training-status"):
        for _ in range(50):
            assert client.get(path, headers=header).status_code == 200
        t0 = time.perf_counter()
        for _ in range(n):
            client.get(path, headers=header)
        plain = (time.perf_counter() - t0) / n * 1e3
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(n):
            client.get(path, headers=header)
        profiler.disable()
        stats = pstats.Stats(profiler).stats
        cumulative = {label: sum(v[3] for (f, _, name), v in stats.items() if f.endswith(file) and name == func) / n
                      for label, file, func in STAGES}
        whole = cumulative[STAGES[0][0]]
        print(f"\nprofile GET {path.replace(session_id, '<id>')}: {plain:.2f} ms/request without the profiler "
              f"(test client, one thread, no server); share of a request under cProfile (cumulative, overlapping):")
        for label, seconds in cumulative.items():
            if seconds:
                print(f"  {label:<40} {seconds / whole:4.0%}  ~{plain * seconds / whole:5.2f} ms")
        top = sorted(stats.items(), key=lambda kv: kv[1][2], reverse=True)[:6]
        print("  top self time:", "; ".join(
            f"{os.path.basename(f)}:{name} {v[2] / n / whole:.0%}" for (f, _, name), v in top))


# --- main -----------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="measured seconds per row")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each row")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--processes", type=int, default=2, help="client processes")
    parser.add_argument("--users", type=int, default=10)
    parser.add_argument("--sessions", type=int, default=20, help="sessions per user")
    parser.add_argument("--profile", type=int, default=200, help="requests per route to profile (0: none)")
    args = parser.parse_args()

    _setup_env()
    # No per-request access log (the "+ access log" row measures it); the NullHandler stops werkzeug
    # from adding its own stderr handler when it first logs.
    access_log = logging.getLogger("werkzeug")
    access_log.setLevel(logging.WARNING)
    access_log.addHandler(logging.NullHandler())
    generator = LoadGenerator(args.processes)
    storage = tempfile.TemporaryDirectory(prefix="peertrain-bench-")
    app = build_app(storage.name)
    api, wsgi_floor, flask_floor = Server(app), Server(hello_wsgi), Server(hello_flask())
    header, session_id = seed(api.port, args.users, args.sessions)
    detail, status = f"/sessions/{session_id}", "/sessions/training-status"
    for path in (detail, status):
        code, body = _call(api.port, "GET", path, headers=header)
        assert code == 200 and (body.get("id") or body.get("session_id")) == session_id, (code, body)

    n = args.clients
    print(f"peertrain API, served by werkzeug threaded (in-process) on 127.0.0.1, mongomock; {n} keep-alive "
          f"clients in {args.processes} processes; {args.warmup:g} s warm-up + {args.seconds:g} s per row; "
          f"{args.users} users x {args.sessions} sessions (4 peers, {len(FEATURES)} features each); "
          f"{os.cpu_count()} CPUs")
    print(HEADER)

    def load(server: Server, path: str, clients: int = n, interval: float = 0.0, hdr: dict | None = None) -> dict:
        return generator.run(server.port, path, header if hdr is None else hdr, clients, args.warmup, args.seconds,
                            interval)

    def show(row: Row) -> Row:
        print(row.line(), flush=True)
        return row

    floor = show(Row("floor: bare WSGI hello", n, load(wsgi_floor, "/", hdr={})))
    show(Row("floor: Flask hello (jsonify)", n, load(flask_floor, "/hello", hdr={}), floor))
    d = show(Row("GET /sessions/<id>", n, load(api, detail), floor))
    s = show(Row("GET /sessions/training-status", n, load(api, status), floor))
    # Comparisons: fewer clients (p99 follows clients / throughput), open-loop polling at half the
    # saturation rate, and the per-request access log that `make run` writes.
    for c in (1, 10):
        show(Row(f"GET /sessions/<id>, {c} clients", c, load(api, detail, clients=c), floor))
    for row, path, label in ((d, detail, "<id>"), (s, status, "training-status")):
        rate = row.rps / 2
        show(Row(f"GET /sessions/{label} paced", n, load(api, path, interval=n / rate), floor,
                 note=f"open loop: {rate:.0f} req/s offered (50% of saturation)"))
    with open(os.devnull, "w") as devnull:
        handler = logging.StreamHandler(devnull)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        access_log.setLevel(logging.INFO)
        access_log.addHandler(handler)
        show(Row("GET /sessions/<id> + access log", n, load(api, detail), floor,
                 note="werkzeug INFO log, make run's format, to /dev/null"))
        access_log.removeHandler(handler)
        access_log.setLevel(logging.WARNING)

    print(f"\nsummary: GET /sessions/<id> {d.rps:.0f} req/s p50 {d.ms['p50']:.1f} ms p99 {d.ms['p99']:.1f} ms; "
          f"GET /sessions/training-status {s.rps:.0f} req/s p50 {s.ms['p50']:.1f} ms p99 {s.ms['p99']:.1f} ms "
          f"at {n} clients (target p99 ≤ {TARGET_P99_MS:g} ms: "
          f"{'met' if max(d.ms['p99'], s.ms['p99']) <= TARGET_P99_MS else 'NOT met'}); "
          f"floor {floor.rps:.0f} req/s p99 {floor.ms['p99']:.1f} ms; "
          f"p99 needs ≥ {n / TARGET_P99_MS * 1e3:.0f} req/s closed-loop")
    generator.close()
    api.close()
    wsgi_floor.close()
    flask_floor.close()
    if args.profile:
        profile(app, header, session_id, args.profile)
    storage.cleanup()


if __name__ == "__main__":
    main()
