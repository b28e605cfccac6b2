"""Benchmark the served API: req/s and latency of the two polling routes at 50 concurrent clients.

The API is served as `make api`, `make run` and docker-compose serve it: granian (HTTP in Rust) with
one worker process, whose app factory (bench/api_app.py) builds the real app on mongomock and seeds it there
(mongomock lives in one process, so one worker). Rows: two floors on the same server (a bare WSGI
hello-world and a one-route Flask app), the two routes with one user's token from every client and
with a user per client, the same routes with the response cache off (API_CACHE_SECONDS=0: every
request checks the token, loads the user and reads the session), and the routes on werkzeug's
threaded development server (`flask --app webapp run`) inside this process, for comparison.

The load generator runs in its own process: one event loop over raw keep-alive sockets with a
prebuilt request, cheap enough not to take the server's CPU on a 2-core machine. Closed loop (each
client sends its next request as soon as the previous answer arrives) measures saturation: by
Little's law p50 ≈ clients / throughput, so p99 ≤ 20 ms at 50 clients needs well over 2,500 req/s.
"Paced" rows are open loop: 50 clients polling at half the measured saturation rate, latency counted
from each request's scheduled time.

Run: .venv/bin/python bench/api.py [--seconds S] [--clients N] [--users U] [--sessions S] [--profile N]
"""

from __future__ import annotations

import argparse
import atexit
import http.client
import json
import logging
import multiprocessing
import os
import resource
import selectors
import socket
import subprocess
import sys
import tempfile
import threading
import time
from array import array
from dataclasses import dataclass, field
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET_P99_MS = 20.0
SECRET = "bench-secret-that-is-long-enough-for-hs256"
DB_URI = "mongomock://localhost/bench"


# --- load generator (runs in child processes: standard library only) -------------------------------


class _Connection:
    """One client: a socket, its due time and what has arrived of the current answer. It keeps the
    connection alive when the server does, and opens a new one when the server closes it after an
    answer (werkzeug's development server speaks HTTP/1.0), as http.client would."""

    def __init__(self, port: int, due: float) -> None:
        self.port, self.sock = port, self._open(port)
        self.due, self.sent, self.buffer, self.request, self.closing = due, 0.0, b"", b"", False

    @staticmethod
    def _open(port: int) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        return sock

    def send(self) -> None:
        if self.closing:
            self.sock.close()
            self.sock, self.closing = self._open(self.port), False
        self.sock.sendall(self.request)

    def answer(self) -> int | None:
        """The status of the answer in the buffer once it is complete (then the buffer is emptied), else None."""
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return None
        length = 0
        lines = self.buffer[:end].lower().split(b"\r\n")
        self.closing = lines[0].startswith(b"http/1.0") or b"connection: close" in lines
        for line in lines[1:]:
            if line.startswith(b"content-length:"):
                length = int(line[15:])
        if len(self.buffer) < end + 4 + length:
            return None
        status = int(self.buffer[9:12])
        self.buffer = self.buffer[end + 4 + length :]
        return status


def _load(port: int, requests: list[tuple[str, dict[str, str]]], start: float, warm_end: float, end: float,
          interval: float, first: int, count: int, clients: int) -> tuple[array, int]:
    """`count` connections on one event loop: raw sockets and a prebuilt request, so that the load
    generator costs a small fraction of what the server does (http.client cost about as much as the
    server's own HTTP handling, on the same two cores)."""
    def encode(path: str, headers: dict[str, str]) -> bytes:
        lines = [f"GET {path} HTTP/1.1", "Host: 127.0.0.1", *(f"{k}: {v}" for k, v in headers.items())]
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    latencies, errors = array("d"), 0
    # Paced clients are spread evenly over one interval, so the offered load is smooth.
    conns = [_Connection(port, start + interval * (first + i) / clients) for i in range(count)]
    for i, conn in enumerate(conns):  # client k sends request k (round robin)
        conn.request = encode(*requests[(first + i) % len(requests)])
    selector = selectors.DefaultSelector()
    waiting = []  # paced connections idle until their due time
    while time.monotonic() < start:
        time.sleep(0.001)
    for conn in conns:
        waiting.append(conn)
    while waiting or selector.get_map():
        now = time.monotonic()
        for conn in [c for c in waiting if c.due <= now or not interval]:
            waiting.remove(conn)
            if (conn.due if interval else now) >= end:
                conn.sock.close()
                continue
            # Latency counts from when a paced request was due, so a slow server cannot hide its queue
            # (coordinated omission); closed-loop clients send at once.
            conn.sent = conn.due if interval else now
            conn.send()
            selector.register(conn.sock, selectors.EVENT_READ, conn)
        timeout = max(0.0, min((c.due for c in waiting), default=now + 0.05) - now) if waiting else 0.05
        for key, _ in selector.select(timeout):
            conn = key.data
            data = conn.sock.recv(65536)
            if not data:
                raise ConnectionError("the server closed a keep-alive connection")
            conn.buffer += data
            status = conn.answer()
            if status is None:
                continue
            done = time.monotonic()
            if status != 200:
                errors += 1
            if conn.sent >= warm_end:
                latencies.append(done - conn.sent)
            selector.unregister(conn.sock)
            if interval:
                conn.due += interval
            waiting.append(conn)
    selector.close()
    return latencies, errors


def _client_process(pipe: Any) -> None:
    """Serve load jobs from the parent until it sends None."""
    while (job := pipe.recv()) is not None:
        cpu = time.process_time()
        try:
            latencies, errors = _load(job["port"], job["requests"], job["start"], job["warm_end"],
                                      job["end"], job["interval"], job["first"], job["threads"], job["clients"])
        except Exception as error:  # the parent waits on this pipe: tell it rather than leave it waiting
            pipe.send({"failed": repr(error)})
            continue
        pipe.send({"latencies": latencies.tobytes(), "errors": errors, "cpu": time.process_time() - cpu})


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

    def run(self, server: Any, requests: list[tuple[str, dict[str, str]]], clients: int, warmup: float,
            seconds: float, interval: float = 0.0) -> dict[str, Any]:
        """Load `path` for warmup + seconds; latencies and counts of the measured part only."""
        n = min(len(self.pipes), clients)
        start = time.monotonic() + 0.3  # time for every connection to open before the start
        job = {"port": server.port, "requests": requests, "start": start, "warm_end": start + warmup,
               "end": start + warmup + seconds, "interval": interval, "clients": clients}
        first = 0
        for i, pipe in enumerate(self.pipes[:n]):
            threads = clients // n + (1 if i < clients % n else 0)
            pipe.send({**job, "threads": threads, "first": first})
            first += threads
        cpu0, wall0 = server.cpu(), time.monotonic()
        replies = [pipe.recv() for pipe in self.pipes[:n]]
        for reply in replies:
            if "failed" in reply:
                raise RuntimeError(f"a load generator failed: {reply['failed']}")
        server_cpu = (server.cpu() - cpu0) / (time.monotonic() - wall0)
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


# --- the served app and its data ------------------------------------------------------------------


def _setup_env() -> None:
    os.environ.setdefault("PEERTRAIN_ENV", "development")
    os.environ.setdefault("JWT_SECRET_KEY", SECRET)
    os.environ.setdefault("BCRYPT_ROUNDS", "4")
    sys.path.insert(0, ROOT)


def build_app(storage_dir: str, **config: Any) -> Any:
    """The real API, configured as the tests configure it, on mongomock (API_CACHE_SECONDS from the environment)."""
    import models
    from webapp import create_app

    models.connect(DB_URI)
    return create_app({"MONGODB_URI": DB_URI, "STORAGE_URL": storage_dir, "BCRYPT_ROUNDS": 4,
                       "JWT_SECRET_KEY": SECRET, "AUTH_LIMIT_PER_ADDRESS": "100000/minute",  # seeding: one address
                       **config})


def _call(port: int, method: str, path: str, body: dict | None = None, headers: dict | None = None) -> Any:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request(method, path, body=json.dumps(body) if body is not None else None,
                 headers={"Content-Type": "application/json", **(headers or {})})
    response = conn.getresponse()
    data = json.loads(response.read() or b"null")
    conn.close()
    return response.status, data


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


def seed_app(app: Any, users: int, sessions_per_user: int) -> dict[str, list]:
    """`users` accounts with `sessions_per_user` sessions each, made through the app's test client (the
    database lives in the serving process); every user's Authorization header and newest session."""
    client = app.test_client()
    seeded: dict[str, list] = {"headers": [], "sessions": []}
    for u in range(users):
        email, password = f"user{u:03d}@example.com", "correct horse battery"
        user = client.post("/auth/signup", json={"username": f"user{u:03d}", "email": email, "password": password})
        assert user.status_code == 201, user.json
        token = client.post("/auth/signin", json={"email": email, "password": password})
        assert token.status_code == 200, token.json
        for s in range(sessions_per_user):
            session = make_session(user.json["id"], minutes_ago=(sessions_per_user - s) * 60 + u)
        seeded["headers"].append({"Authorization": f"Bearer {token.json['access_token']}"})
        seeded["sessions"].append(str(session.id))
    return seeded


class InProcessServer:
    """`app` on werkzeug's threaded development server (`flask run`), in a thread of this process."""

    name = "werkzeug threaded development server, in-process (flask run)"

    def __init__(self, app: Any) -> None:
        from werkzeug.serving import make_server

        self.server = make_server("127.0.0.1", 0, app, threaded=True)
        self.port = self.server.server_port
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def cpu(self) -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class GranianServer:
    """A target of bench/api_app.py served by granian, as `make api` and docker-compose serve the API:
    one worker process (mongomock lives in one process) with two app threads."""

    name = "granian, 1 worker, 2 app threads (make api, make run)"

    def __init__(self, target: str, factory: bool = False, users: int = 0, sessions: int = 0,
                 env: dict[str, str] | None = None) -> None:
        with socket.socket() as probe:  # a free port; granian binds it a moment later
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.folder = tempfile.TemporaryDirectory(prefix="peertrain-bench-")
        seed = os.path.join(self.folder.name, "seed.json")
        env = {**os.environ, "BENCH_API_SEED": seed, "BENCH_API_USERS": str(users),
               "BENCH_API_SESSIONS": str(sessions), **(env or {})}
        command = [sys.executable, "-m", "granian", *GRANIAN_OPTIONS, "--port", str(self.port),
                   *(["--factory"] if factory else []), f"bench.api_app:{target}"]
        self.process = subprocess.Popen(command, cwd=ROOT, env=env)
        deadline = time.monotonic() + 120
        atexit.register(self.close)  # never leave a server behind, even when the bench fails
        seeded = target == "create"
        while not self._answers() or (seeded and not os.path.exists(seed)):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"granian did not start: {command}")
            time.sleep(0.1)
        self.seed = json.load(open(seed)) if seeded else {}

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False

    def cpu(self) -> float:
        """CPU seconds of granian's processes (the supervisor and its worker)."""
        ticks, pids = 0, [self.process.pid]
        while pids:
            pid = pids.pop()
            try:
                with open(f"/proc/{pid}/stat") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
                ticks += int(fields[11]) + int(fields[12])  # utime, stime
                with open(f"/proc/{pid}/task/{pid}/children") as children:
                    pids += [int(child) for child in children.read().split()]
            except OSError:
                continue
        return ticks / os.sysconf("SC_CLK_TCK")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(30)
        self.folder.cleanup()


GRANIAN_OPTIONS = ["--interface", "wsgi", "--host", "127.0.0.1", "--workers", "1", "--blocking-threads", "2",
                   "--no-ws", "--log-level", "warning"]


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
    parser.add_argument("--processes", type=int, default=1, help="client processes")
    parser.add_argument("--users", type=int, default=50)
    parser.add_argument("--sessions", type=int, default=4, help="sessions per user")
    parser.add_argument("--profile", type=int, default=200, help="requests per route to profile (0: none)")
    args = parser.parse_args()

    _setup_env()
    sys.stdout.reconfigure(line_buffering=True)
    from settings import Settings

    cache = Settings.from_env().api_cache_seconds
    # No per-request access log; the NullHandler stops werkzeug from adding its own stderr handler.
    access_log = logging.getLogger("werkzeug")
    access_log.setLevel(logging.WARNING)
    access_log.addHandler(logging.NullHandler())
    generator = LoadGenerator(args.processes)
    n = args.clients
    print(f"peertrain API on 127.0.0.1, mongomock; {n} keep-alive clients (raw sockets, {args.processes} "
          f"process(es)); {args.warmup:g} s warm-up + {args.seconds:g} s per row; {args.users} users x "
          f"{args.sessions} sessions (4 peers, {len(FEATURES)} features each); API_CACHE_SECONDS={cache:g}; "
          f"{os.cpu_count()} CPUs")
    print(HEADER)

    def show(row: Row) -> Row:
        print(row.line(), flush=True)
        return row

    def load(server: Any, requests: list, clients: int = n, interval: float = 0.0) -> dict:
        return generator.run(server, requests, clients, args.warmup, args.seconds, interval)

    def routes(seeded: dict) -> dict[str, list]:
        one, every = seeded["headers"][0], seeded["headers"]
        return {
            "GET /sessions/<id>": [(f"/sessions/{seeded['sessions'][0]}", one)],
            "GET /sessions/training-status": [("/sessions/training-status", one)],
            "GET /sessions/<id>, a user each": [
                (f"/sessions/{s}", h) for s, h in zip(seeded["sessions"], every, strict=True)
            ],
            "GET /sessions/training-status, a user each": [("/sessions/training-status", h) for h in every],
        }

    def check(server: Any, requests: list) -> None:
        for path, header in requests[:3]:
            code, body = _call(server.port, "GET", path, headers=header)
            assert code == 200 and (body.get("id") or body.get("session_id")), (path, code, body)

    print(f"-- {GranianServer.name} --")
    floors = GranianServer("hello_wsgi")
    floor = show(Row("floor: bare WSGI hello", n, load(floors, [("/", {})])))
    floors.close()
    floors = GranianServer("hello_flask", factory=True)
    show(Row("floor: Flask hello (jsonify)", n, load(floors, [("/hello", {})]), floor))
    floors.close()
    api = GranianServer("create", factory=True, users=args.users, sessions=args.sessions)
    rows = {}
    for name, requests in routes(api.seed).items():
        check(api, requests)
        rows[name] = show(Row(name, n, load(api, requests), floor))
    api.close()
    uncached = GranianServer("create", factory=True, users=args.users, sessions=args.sessions,
                             env={"API_CACHE_SECONDS": "0"})
    saturation = {}
    for name, requests in list(routes(uncached.seed).items())[:2]:
        row = show(Row(f"{name}, no cache", n, load(uncached, requests), floor, note="API_CACHE_SECONDS=0"))
        saturation[name] = (row, requests)
    for name, (row, requests) in saturation.items():
        rate = row.rps / 2
        show(Row(f"{name}, no cache, paced", n, load(uncached, requests, interval=n / rate), floor,
                 note=f"open loop: {rate:.0f} req/s offered (50% of saturation)"))
    uncached.close()

    print(f"-- {InProcessServer.name} --")
    storage = tempfile.TemporaryDirectory(prefix="peertrain-bench-")
    app = build_app(storage.name, API_CACHE_SECONDS=cache)
    seeded = seed_app(app, args.users, args.sessions)
    local = InProcessServer(app)
    for name, requests in list(routes(seeded).items())[:2]:
        show(Row(name, n, load(local, requests)))
    local.close()
    generator.close()

    d, s = rows["GET /sessions/<id>"], rows["GET /sessions/training-status"]
    worst = max(row.ms["p99"] for row in rows.values())
    verdict = "met" if worst <= TARGET_P99_MS else "NOT met"
    print(f"\nsummary (granian): GET /sessions/<id> {d.rps:.0f} req/s p50 {d.ms['p50']:.1f} ms "
          f"p99 {d.ms['p99']:.1f} ms; GET /sessions/training-status {s.rps:.0f} req/s p50 {s.ms['p50']:.1f} ms "
          f"p99 {s.ms['p99']:.1f} ms at {n} clients; worst p99 of the four polled rows {worst:.1f} ms "
          f"(target p99 ≤ {TARGET_P99_MS:g} ms: {verdict}); floor {floor.rps:.0f} req/s p99 {floor.ms['p99']:.1f} ms")
    if args.profile:
        profiled = build_app(storage.name, API_CACHE_SECONDS=0)
        profile(profiled, seeded["headers"][0], seeded["sessions"][0], args.profile)
    storage.cleanup()


if __name__ == "__main__":
    main()
