"""Benchmark the served API: polling latency without a response cache, beside hundreds of open event streams.

The API is served as `make api`, `make run` and docker-compose serve it: granian's ASGI interface with one
worker process (webapp/asgi.py: event streams are coroutines on its loop, every other request runs the
Flask app in a2wsgi's threads), whose app factory (bench/api_app.py) builds the real app on mongomock and
seeds it there (mongomock lives in one process, so one worker). The baseline is the serving it replaced,
granian's WSGI interface with one app thread, measured in the same run: faster per request, but one open
stream holds its only thread.

Rows: floors (bare hello-worlds on each interface, Flask through the adapter); each route at saturation
(closed loop: each client sends its next request as soon as the previous answer arrives; by Little's law
p50 ≈ clients / throughput); then what the issue asks: 50 clients each polling GET /sessions/<id> once a
second (open loop, latency counted from each request's scheduled time), alone and with 200 event streams
open on the same process, following a session that gets 10 events a second (2,000 frames a second out).

The load generator runs in its own process: one event loop over raw keep-alive sockets with a prebuilt
request, cheap enough not to take the server's CPU on a 2-core machine; the streams are held by another.

Run: .venv/bin/python -m bench.api [--seconds S] [--clients N] [--users U] [--sessions S] [--profile N]
"""

from __future__ import annotations

import argparse
import atexit
import http.client
import json
import multiprocessing
import os
import selectors
import socket
import subprocess
import sys
import tempfile
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


def build_app(storage_dir: str, **config: Any) -> Any:
    """The real API, configured as the tests configure it, on mongomock."""
    import models
    from webapp import create_app

    models.connect(DB_URI)
    return create_app({"MONGODB_URI": DB_URI, "STORAGE_URL": storage_dir, "BCRYPT_ROUNDS": 4,
                       "JWT_SECRET_KEY": SECRET, "AUTH_LIMIT_PER_ADDRESS": "100000/minute",  # seeding: one address
                       **config})


def _call(port: int, method: str, path: str, body: dict | None = None, headers: dict | None = None,
          timeout: float = 10) -> Any:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
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


def make_session(owner_id: str, minutes_ago: float, epochs: int = 20, status: str = "COMPLETED") -> Any:
    """A finished 4-peer sweep on the wine data, as the coordinator leaves one, with its heartbeats (and their
    events); `status="RUNNING"`: one still going, whose event stream stays open."""
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
        owner_id=ObjectId(owner_id), status=status, mode="sweep", task="classification", target="label",
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
    seeded: dict[str, list] = {"headers": [], "sessions": [], "owners": []}
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
        seeded["owners"].append(user.json["id"])
    return seeded


class GranianServer:
    """A target of bench/api_app.py served by granian with one worker process (mongomock lives in one
    process): ASGI as `make api`, `make run` and docker-compose serve the API now, or WSGI with one app
    thread as they served it before the event stream."""

    def __init__(self, target: str, interface: str = "asgi", factory: bool = False, users: int = 0,
                 sessions: int = 0, env: dict[str, str] | None = None) -> None:
        self.name = GRANIAN_NAMES[interface]
        with socket.socket() as probe:  # a free port; granian binds it a moment later
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.folder = tempfile.TemporaryDirectory(prefix="peertrain-bench-")
        seed = os.path.join(self.folder.name, "seed.json")
        env = {**os.environ, "BENCH_API_SEED": seed, "BENCH_API_USERS": str(users),
               "BENCH_API_SESSIONS": str(sessions), **(env or {})}
        command = [sys.executable, "-m", "granian", *GRANIAN_OPTIONS[interface], "--port", str(self.port),
                   *(["--factory"] if factory else []), f"bench.api_app:{target}"]
        self.process = subprocess.Popen(command, cwd=ROOT, env=env)
        deadline = time.monotonic() + 120
        atexit.register(self.close)  # never leave a server behind, even when the bench fails
        seeded = target.startswith("create")
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


GRANIAN_OPTIONS = {
    "asgi": ["--interface", "asgi", "--host", "127.0.0.1", "--workers", "1", "--no-ws", "--log-level", "warning"],
    "wsgi": ["--interface", "wsgi", "--host", "127.0.0.1", "--workers", "1", "--blocking-threads", "1", "--no-ws",
             "--log-level", "warning"],
}
GRANIAN_OPTIONS["wsgi-threads"] = [*GRANIAN_OPTIONS["wsgi"][:-5], "--blocking-threads", "256", "--no-ws",
                                   "--log-level", "warning"]
GRANIAN_NAMES = {"asgi": "granian ASGI, 1 worker: streams as coroutines, Flask in 4 threads (make api, make run)",
                 "wsgi": "granian WSGI, 1 worker, 1 app thread (the serving before the stream)",
                 "wsgi-threads": "granian WSGI, 1 worker, 256 app threads: a thread per stream (the alternative)"}


# --- open event streams ---------------------------------------------------------------------------


def _hold_streams(pipe: Any) -> None:
    """Hold event streams open for the parent: open N, read everything until told to stop, report."""
    job = pipe.recv()
    request = ("\r\n".join([f"GET {job['path']} HTTP/1.1", "Host: 127.0.0.1",
                             *(f"{k}: {v}" for k, v in job["headers"].items())]) + "\r\n\r\n").encode()
    selector = selectors.DefaultSelector()
    received = {}
    for _ in range(job["streams"]):
        sock = socket.create_connection(("127.0.0.1", job["port"]), timeout=30)
        sock.sendall(request)
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
        received[sock] = b""
    events, ok, caught_up = 0, 0, False
    newest = dict.fromkeys(received, 0)  # the highest event id each stream has received
    while not pipe.poll():
        for key, _ in selector.select(0.05):
            data = key.fileobj.recv(65536)
            if not data:
                selector.unregister(key.fileobj)
                continue
            head = received[key.fileobj]
            if len(head) < 64:
                received[key.fileobj] = head + data
            if caught_up:
                events += data.count(b"\nevent: ")  # live events only, after every replay
            ids = [int(line[4:]) for line in data.split(b"\n") if line.startswith(b"id: ")]
            if ids:
                newest[key.fileobj] = max(newest[key.fileobj], *ids)
        if not caught_up and min(newest.values()) >= job["replayed"]:
            caught_up = True  # every stream has had its replay: from now on only live events flow
            pipe.send("open")
    for sock, head in received.items():
        ok += head.startswith(b"HTTP/1.1 200")
        sock.close()
    pipe.send({"events": events, "ok": ok})


class Streams:
    """`n` clients following one session's event stream from another process, for as long as the block lasts."""

    def __init__(self, port: int, path: str, headers: dict[str, str], n: int, replayed: int) -> None:
        context = multiprocessing.get_context("spawn")
        self.pipe, child = context.Pipe()
        self.process = context.Process(target=_hold_streams, args=(child,), daemon=True)
        self.process.start()
        began = time.monotonic()
        self.pipe.send({"port": port, "path": path, "headers": headers, "streams": n, "replayed": replayed})
        assert self.pipe.poll(300), "the streams did not catch up within 300 s"
        assert self.pipe.recv() == "open"
        self.opened = time.monotonic() - began  # opening and replaying every stream's history
        self.began = time.monotonic()

    def close(self) -> dict[str, Any]:
        self.pipe.send("stop")
        report = self.pipe.recv()
        self.process.join(10)
        report["seconds"] = time.monotonic() - self.began
        return report


# --- report ---------------------------------------------------------------------------------------


@dataclass
class Row:
    name: str
    clients: int
    result: dict[str, Any]
    floor: Row | None = None
    note: str = ""
    target: bool = True  # whether p99 ≤ 20 ms is asked of this row (not of saturation rows)
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
        verdict = ("pass" if self.ms["p99"] <= TARGET_P99_MS else "FAIL") if self.target else "-"
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
    parser.add_argument("--seconds", type=float, default=3.0, help="measured seconds per closed-loop row")
    parser.add_argument("--paced-seconds", type=float, default=20.0, help="measured seconds per paced row")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each row")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--streams", type=int, default=200, help="event streams held open beside the polls")
    parser.add_argument("--events", type=float, default=10.0, help="events a second the followed session gets")
    parser.add_argument("--processes", type=int, default=1, help="client processes")
    parser.add_argument("--users", type=int, default=50)
    parser.add_argument("--sessions", type=int, default=4, help="sessions per user")
    parser.add_argument("--profile", type=int, default=200, help="requests per route to profile (0: none)")
    args = parser.parse_args()

    _setup_env()
    sys.stdout.reconfigure(line_buffering=True)
    generator = LoadGenerator(args.processes)
    n = args.clients
    print(f"peertrain API on 127.0.0.1, mongomock, no response cache; {n} keep-alive clients (raw sockets, "
          f"{args.processes} process(es)); {args.warmup:g} s warm-up + {args.seconds:g} s per closed-loop row, "
          f"{args.paced_seconds:g} s per paced row; {args.users} users x {args.sessions} sessions (4 peers, "
          f"{len(FEATURES)} features each); {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print(HEADER)

    def show(row: Row) -> Row:
        print(row.line(), flush=True)
        return row

    def load(server: Any, requests: list, clients: int = n, interval: float = 0.0) -> dict:
        seconds = args.paced_seconds if interval else args.seconds
        return generator.run(server, requests, clients, args.warmup, seconds, interval)

    def routes(seeded: dict) -> dict[str, list]:
        one, every = seeded["headers"][0], seeded["headers"]
        return {
            "GET /sessions/<id>": [(f"/sessions/{seeded['sessions'][0]}", one)],
            "GET /sessions/training-status": [("/sessions/training-status", one)],
            "GET /sessions/<id>, a user each": [
                (f"/sessions/{s}", h) for s, h in zip(seeded["sessions"], every, strict=True)
            ],
        }

    def check(server: Any, requests: list) -> None:
        for path, header in requests[:3]:
            code, body = _call(server.port, "GET", path, headers=header)
            assert code == 200 and (body.get("id") or body.get("session_id")), (path, code, body)

    rows: dict[str, Row] = {}
    # Before: WSGI with one app thread (fast per request, but an open stream would hold that thread).
    print(f"-- {GRANIAN_NAMES['wsgi']} --")
    floors = GranianServer("hello_wsgi", "wsgi")
    floor = show(Row("floor: bare WSGI hello", n, load(floors, [("/", {})]), target=False))
    floors.close()
    before = GranianServer("create_wsgi", "wsgi", factory=True, users=args.users, sessions=args.sessions)
    for name, requests in list(routes(before.seed).items())[:2]:
        check(before, requests)
        rows[f"wsgi {name}"] = show(Row(name, n, load(before, requests), floor, note="saturation", target=False))
    rows["wsgi paced"] = show(Row("50 clients x 1 poll/s", n, load(before, routes(before.seed)[
        "GET /sessions/<id>, a user each"], interval=1.0), note="open loop, a user each"))
    blocked = _blocked_by_one_stream(before)
    print(f"{'  one open stream, then a GET':<34} {blocked}")
    before.close()

    # Now: ASGI; streams are coroutines, the Flask app runs in a2wsgi's threads.
    print(f"-- {GRANIAN_NAMES['asgi']} --")
    floors = GranianServer("hello_asgi", "asgi")
    asgi_floor = show(Row("floor: bare ASGI hello", n, load(floors, [("/", {})]), floor, target=False))
    floors.close()
    floors = GranianServer("hello_flask_asgi", "asgi", factory=True)
    show(Row("floor: Flask hello via a2wsgi", n, load(floors, [("/hello", {})]), asgi_floor, target=False))
    floors.close()
    api = GranianServer("create", "asgi", factory=True, users=args.users, sessions=args.sessions,
                        env={"BENCH_API_EVENTS": str(args.events)})
    paths = routes(api.seed)
    for name, requests in list(paths.items())[:2]:
        check(api, requests)
        rows[f"asgi {name}"] = show(Row(name, n, load(api, requests), rows[f"wsgi {name}"],
                                        note="saturation; x = vs WSGI above", target=False))
    polled = paths["GET /sessions/<id>, a user each"]
    paced = show(Row("50 clients x 1 poll/s", n, load(api, polled, interval=1.0), rows["wsgi paced"],
                     note="open loop, a user each; x = vs WSGI above"))
    rows["paced"] = paced
    stream_path = f"/sessions/{api.seed['running']}/events"
    _, page = _call(api.port, "GET", f"/sessions/{api.seed['running']}/heartbeats?page_size=1",
                    headers=api.seed["headers"][0])
    streams = Streams(api.port, stream_path, api.seed["headers"][0], args.streams, replayed=page["total"])
    print(f"{'':<34} {args.streams} streams opened and replayed {page['total']:,} events each in "
          f"{streams.opened:.1f} s")
    with_streams = show(Row(f"50 x 1 poll/s + {args.streams} streams", n, load(api, polled, interval=1.0), paced,
                            note=f"x = vs no streams; the followed session gets {args.events:g} events/s"))
    held = streams.close()
    rows["streams"] = with_streams
    print(f"{'':<34} streams: {held['ok']}/{args.streams} answered 200; live, {held['events']:,} events delivered "
          f"in {held['seconds']:.1f} s ({held['events'] / held['seconds']:,.0f}/s, "
          f"{held['events'] / held['seconds'] / args.streams:.1f}/s per stream)")
    api.close()

    # The alternative: WSGI with a thread for each open stream (webapp/stream.py's blocking driver).
    print(f"-- {GRANIAN_NAMES['wsgi-threads']} --")
    threaded = GranianServer("create_wsgi", "wsgi-threads", factory=True, users=args.users, sessions=args.sessions,
                             env={"BENCH_API_EVENTS": str(args.events)})
    polled = routes(threaded.seed)["GET /sessions/<id>, a user each"]
    alone = show(Row("50 clients x 1 poll/s", n, load(threaded, polled, interval=1.0), paced,
                     note="x = vs ASGI above"))
    _, page = _call(threaded.port, "GET", f"/sessions/{threaded.seed['running']}/heartbeats?page_size=1",
                    headers=threaded.seed["headers"][0])
    streams = Streams(threaded.port, f"/sessions/{threaded.seed['running']}/events", threaded.seed["headers"][0],
                      args.streams, replayed=page["total"])
    print(f"{'':<34} {args.streams} streams opened and replayed {page['total']:,} events each in "
          f"{streams.opened:.1f} s")
    show(Row(f"50 x 1 poll/s + {args.streams} streams", n, load(threaded, polled, interval=1.0), with_streams,
             note="x = vs ASGI above"))
    held = streams.close()
    print(f"{'':<34} streams: {held['ok']}/{args.streams} answered 200; live, {held['events']:,} events delivered "
          f"in {held['seconds']:.1f} s; alone p99 {alone.ms['p99']:.1f} ms")
    threaded.close()
    generator.close()

    worst = max(paced.ms["p99"], with_streams.ms["p99"])
    verdict = "met" if worst <= TARGET_P99_MS else "NOT met"
    d_before, d_now = rows["wsgi GET /sessions/<id>"], rows["asgi GET /sessions/<id>"]
    print(f"\nsummary: 50 clients polling GET /sessions/<id> once a second: p99 {paced.ms['p99']:.1f} ms, with "
          f"{args.streams} open streams p99 {with_streams.ms['p99']:.1f} ms (target p99 ≤ {TARGET_P99_MS:g} ms: "
          f"{verdict}); saturation {d_now.rps:.0f} req/s ASGI vs {d_before.rps:.0f} req/s WSGI "
          f"({d_now.rps / d_before.rps:.2f}x), floor {floor.rps:.0f} req/s; load average now "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    if args.profile:
        storage = tempfile.TemporaryDirectory(prefix="peertrain-bench-")
        app = build_app(storage.name)
        seeded = seed_app(app, 1, args.sessions)
        profile(app, seeded["headers"][0], seeded["sessions"][0], args.profile)
        storage.cleanup()


def _blocked_by_one_stream(server: Any) -> str:
    """What one open event stream does to a WSGI server with one app thread: the next request waits."""
    seeded = server.seed
    running = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    header = seeded["headers"][0]
    running.sendall((f"GET /sessions/{seeded['running']}/events HTTP/1.1\r\nHost: x\r\n"
                     f"Authorization: {header['Authorization']}\r\n\r\n").encode())
    time.sleep(0.5)
    began = time.monotonic()
    try:
        code, _ = _call(server.port, "GET", "/sessions/training-status", headers=header, timeout=3)
        answer = f"answered {code} after {time.monotonic() - began:.2f} s"
    except OSError:
        answer = f"no answer within {time.monotonic() - began:.0f} s: the stream holds the only app thread"
    running.close()
    return answer


if __name__ == "__main__":
    main()
