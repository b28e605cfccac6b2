"""Benchmark the API's other routes while clients hammer sign-in (bcrypt at its production cost).

A sign-in costs one bcrypt check, ~220 ms of CPU at cost 12. Eight clients send wrong passwords in a
closed loop (each sends again as soon as it has an answer, ignoring Retry-After: the worst case) while
two paced probes (50 requests/s each, open loop: latency counts from when a request was due) read
GET /peers and GET /healthz. The API is served as `make api` serves it (granian, WSGI, one worker on
mongomock) — granian ASGI with the Flask app in a few threads (webapp/asgi.py), and for comparison
granian WSGI with 1 or 2 app threads. Rows:

- baseline: the probes alone, 1 app thread; every ratio is against its p99 (same round).
- as before: 1 app thread, throttling off: each sign-in holds the only thread for a whole hash.
- slots: 2 app threads, one hashing slot (PASSWORD_HASHING_SLOTS=1), throttling off: a sign-in finding
  the slot busy gets 503 at once, so hashing never holds the thread the probes need. Eight clients that
  never pause then keep one core hashing and the other answering 503s: the worst case, as from many
  addresses and accounts at once.
- shipped: the same with the default throttling (all eight clients come from one address).
- shipped, each client its own address: the eight clients behind a trusted proxy that names a different
  address for each: each address has its 20 attempts a minute and each account its 5 failures, so
  there is a first burst of hashing (short: an attempt answered 503 counts against its address too).
- floor: 2 threads, the eight clients hammering GET /nowhere (a 404): what any cheap request costs the
  probes when clients never pause, sign-in or not.
- baseline, 2 threads: the probes alone on two app threads.
- ASGI (make api, make run): the shipped throttling, from one address and each client from its own.
- last, no load at all: one lone sign-in at cost 14 (~1 s of hashing) and one GET /healthz sent during it.

Target: GET /peers and GET /healthz p99 ≤ 100 ms while the hammering goes on. Every row runs --repeats
times, the rows interleaved, because a shared machine's load comes and goes: the summary gives each
row's median and its ratio to the baseline of the same round.

Run: .venv/bin/python -m bench.signin [--seconds S] [--clients N] [--rate R] [--repeats K]
"""

from __future__ import annotations

import argparse
import atexit
import http.client
import json
import multiprocessing
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET_P99_MS = 100.0
SECRET = "bench-secret-that-is-long-enough-for-hs256"
DB_URI = "mongomock://localhost/bench-signin"
PASSWORD = "correct horse battery"
UNLIMITED = "1000000/minute"


# --- the served app (granian imports this module in its worker: keep the top light) --------------


def serve() -> Any:
    """Granian's app factory: the real API on mongomock with a probe user and the hammering accounts."""
    import models
    from models import User
    from webapp import create_app
    from webapp.passwords import Passwords

    models.connect(DB_URI)
    app = create_app({"MONGODB_URI": DB_URI, "STORAGE_URL": tempfile.mkdtemp(prefix="peertrain-bench-"),
                      "JWT_SECRET_KEY": SECRET})
    hashed = Passwords(app.config["BCRYPT_ROUNDS"]).hash(PASSWORD)  # one hash for every account: seeding is quick
    users = [User(username=f"user{i:02d}", email=f"user{i:02d}@example.com", password_hash=hashed).save()
             for i in range(int(os.environ["BENCH_SIGNIN_USERS"]))]
    from flask_jwt_extended import create_access_token

    with app.app_context():
        token = create_access_token(identity=users[0])
    with open(os.environ["BENCH_SIGNIN_SEED"] + ".tmp", "w") as file:
        json.dump({"token": token}, file)
    os.replace(os.environ["BENCH_SIGNIN_SEED"] + ".tmp", os.environ["BENCH_SIGNIN_SEED"])
    return app


def serve_asgi() -> Any:
    """The same, served as `make api` serves the API now: ASGI, the Flask app in webapp/asgi.py's threads."""
    from webapp.asgi import serve as asgi

    return asgi(serve())


class Server:
    """bench.signin:serve under granian with `threads` WSGI app threads, or (threads "asgi") as `make api`."""

    def __init__(self, threads: int | str, env: dict[str, str], users: int) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.folder = tempfile.TemporaryDirectory(prefix="peertrain-bench-")
        seed = os.path.join(self.folder.name, "seed.json")
        environ = {**os.environ, "PEERTRAIN_ENV": "production", "BCRYPT_ROUNDS": "12", "LOG_LEVEL": "WARNING",
                   "BENCH_SIGNIN_SEED": seed, "BENCH_SIGNIN_USERS": str(users), **env}
        serving = (["--interface", "asgi", "--factory", "bench.signin:serve_asgi"] if threads == "asgi" else
                   ["--interface", "wsgi", "--blocking-threads", str(threads), "--factory", "bench.signin:serve"])
        command = [sys.executable, "-m", "granian", "--host", "127.0.0.1", "--port", str(self.port), "--workers",
                   "1", "--no-ws", "--log-level", "warning", *serving]
        self.process = subprocess.Popen(command, cwd=ROOT, env=environ)
        atexit.register(self.close)
        deadline = time.monotonic() + 120
        while not os.path.exists(seed):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"granian did not start: {command}")
            time.sleep(0.1)
        self.token = json.load(open(seed))["token"]

    def cpu(self) -> float:
        """CPU seconds of granian's processes (the supervisor and its worker)."""
        ticks, pids = 0, [self.process.pid]
        while pids:
            pid = pids.pop()
            try:
                with open(f"/proc/{pid}/stat") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
                ticks += int(fields[11]) + int(fields[12])
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


# --- load: probes in a child process, hammering clients in threads of this one ----------------------


def _probe(port: int, path: str, headers: dict[str, str], start: float, end: float, interval: float,
           out: list[float], errors: Counter) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    due = start
    while due < end:
        now = time.monotonic()
        if due > now:
            time.sleep(due - now)
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        response.read()
        out.append(time.monotonic() - due)  # from when it was due: a late send counts against the server
        if response.status != 200:
            errors[response.status] += 1
        due += interval


def _probes(port: int, token: str, start: float, end: float, interval: float, pipe: Any) -> None:
    """Child process: one paced probe thread per route; sends back each route's latencies."""
    auth = {"Authorization": f"Bearer {token}"}
    results: dict[str, list[float]] = {"GET /peers": [], "GET /healthz": []}
    errors: Counter = Counter()
    threads = [threading.Thread(target=_probe, args=(port, path.split()[1], auth if "peers" in path else {},
                                                     start, end, interval, results[path], errors))
               for path in results]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    pipe.send((results, dict(errors)))


def _hammer(port: int, request: tuple[str, str, str | None, dict[str, str]], end: float, answers: Counter) -> None:
    method, path, body, headers = request
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    while time.monotonic() < end:
        try:
            conn.request(method, path, body=body, headers={"Content-Type": "application/json", **headers})
            response = conn.getresponse()
            response.read()
        except (ConnectionError, http.client.HTTPException):
            # The server closes a connection whose request body it refused unread; a client reconnects.
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            continue
        answers[response.status] += 1
        if response.getheader("Connection", "").lower() == "close":
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)


def _signin(i: int) -> tuple[str, str, str | None, dict[str, str]]:
    return "POST", "/auth/signin", json.dumps({"email": f"user{i + 1:02d}@example.com", "password": "wrong"}), {}


def _signin_apart(i: int) -> tuple[str, str, str | None, dict[str, str]]:
    # Each client from an address of its own, as the trusted proxy (TRUSTED_PROXIES=1) reports it.
    method, path, body, _ = _signin(i)
    return method, path, body, {"X-Forwarded-For": f"198.51.100.{i + 1}"}


def _nowhere(i: int) -> tuple[str, str, str | None, dict[str, str]]:
    return "GET", "/nowhere", None, {}


def measure(server: Server, clients: int, warmup: float, seconds: float, rate: float,
            request: Any = _signin) -> dict[str, Any]:
    start = time.monotonic() + 0.5
    end = start + warmup + seconds
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    prober = context.Process(target=_probes, args=(server.port, server.token, start + warmup, end, 1 / rate, child))
    prober.start()
    answers: Counter = Counter()
    hammers = [threading.Thread(target=_hammer, args=(server.port, request(i), end, answers))
               for i in range(clients)]
    while time.monotonic() < start:
        time.sleep(0.01)
    cpu0, wall0, own0 = server.cpu(), time.monotonic(), time.process_time()
    for thread in hammers:
        thread.start()
    results, errors = parent.recv()
    for thread in hammers:
        thread.join()
    prober.join()
    return {"probes": {route: sorted(lat) for route, lat in results.items()}, "errors": errors,
            "answers": answers, "signin_rate": sum(answers.values()) / (warmup + seconds),
            "server_cpu": (server.cpu() - cpu0) / (time.monotonic() - wall0),
            "client_cpu": (time.process_time() - own0) / (time.monotonic() - wall0)}


def lone(threads: int, tries: int = 3) -> list[float]:
    """GET /healthz latencies, each sent while one lone sign-in at cost 14 (~1 s of hashing) is under way."""
    server = Server(threads, {"BCRYPT_ROUNDS": "14"}, users=1)
    body = json.dumps({"email": "user01@example.com", "password": "wrong"})
    latencies = []
    for _ in range(tries):
        signin = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        signin.request("POST", "/auth/signin", body=body, headers={"Content-Type": "application/json"})
        time.sleep(0.2)  # well inside the ~1 s hash; the sign-in's answer is read after the probe's
        probe = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        sent = time.monotonic()
        probe.request("GET", "/healthz")
        probe.getresponse().read()
        latencies.append(time.monotonic() - sent)
        signin.getresponse().read()
    server.close()
    return latencies


# --- report ---------------------------------------------------------------------------------------


def _q(latencies: list[float], p: float) -> float:
    return latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1e3


def report(name: str, result: dict[str, Any], baseline: dict[str, Any] | None) -> list[float]:
    p99s = []
    for route, lat in result["probes"].items():
        p99 = _q(lat, 0.99)
        p99s.append(p99)
        ratio = f"{p99 / _q(baseline['probes'][route], 0.99):6.1f}x" if baseline else "     -"
        answers = ", ".join(f"{code}: {n}" for code, n in sorted(result["answers"].items())) or "none"
        print(f"{name:<42} {route:<13} {len(lat):>5} {_q(lat, 0.5):>7.1f} {_q(lat, 0.9):>7.1f} {p99:>7.1f} "
              f"{lat[-1] * 1e3:>7.1f} {ratio} {'pass' if p99 <= TARGET_P99_MS else 'FAIL':>5} "
              f"{result['server_cpu']:>4.0%} {result['client_cpu']:>4.0%}  {result['signin_rate']:>6.1f}/s ({answers})"
              f"{'  probe errors ' + str(result['errors']) if result['errors'] else ''}", flush=True)
    return p99s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="measured seconds per row")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each row")
    parser.add_argument("--clients", type=int, default=8, help="clients hammering sign-in")
    parser.add_argument("--rate", type=float, default=50.0, help="requests/s of each probe")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of every row, interleaved")
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)
    os.environ.setdefault("JWT_SECRET_KEY", SECRET)

    off = {"AUTH_LIMIT_PER_ADDRESS": UNLIMITED, "AUTH_LIMIT_PER_ACCOUNT": UNLIMITED}
    rows = [  # name, app threads, extra environment, hammering clients, what they send
        ("baseline (no sign-ins), 1 thread", 1, off, 0, _signin),
        ("as before: 1 thread, no throttling", 1, off, args.clients, _signin),
        ("slots: 2 threads, no throttling", 2, off, args.clients, _signin),
        ("WSGI 2 threads, throttled", 2, {}, args.clients, _signin),
        ("WSGI 2 threads, each its own address", 2, {"TRUSTED_PROXIES": "1"}, args.clients, _signin_apart),
        ("floor: 2 threads, GET /nowhere", 2, off, args.clients, _nowhere),
        ("baseline (no sign-ins), 2 threads", 2, off, 0, _signin),
        ("ASGI (make api): throttled", "asgi", {}, args.clients, _signin),
        ("ASGI (make api): each its own address", "asgi", {"TRUSTED_PROXIES": "1"}, args.clients, _signin_apart),
    ]
    print(f"peertrain API under sign-in load: granian (WSGI rows, and ASGI as make api), 1 worker, mongomock, "
          f"BCRYPT_ROUNDS=12, "
          f"PASSWORD_HASHING_SLOTS=1; {args.clients} clients sending wrong passwords in a closed loop; probes "
          f"paced at {args.rate:g}/s per route; {args.warmup:g} s warm-up + {args.seconds:g} s per row; "
          f"{args.repeats} rounds of every row, interleaved, each compared with its round's baseline; "
          f"{os.cpu_count()} CPUs")
    print(f"{'row (round)':<42} {'route':<13} {'reqs':>5} {'p50':>7} {'p90':>7} {'p99':>7} {'max':>7} "
          f"{'p99 vs':>7} {'p99':>5} {'srv':>4} {'cli':>4}  hammering answers")
    print(f"{'':<42} {'':<13} {'':>5} {'ms':>7} {'ms':>7} {'ms':>7} {'ms':>7} {'base':>7} {'≤100':>5} "
          f"{'cpu':>4} {'cpu':>4}")
    worst: dict[str, list[float]] = {name: [] for name, *_ in rows}
    ratios: dict[str, list[float]] = {name: [] for name, *_ in rows}
    for round_ in range(1, args.repeats + 1):
        baseline = None
        for name, threads, env, clients, request in rows:
            server = Server(threads, env, users=max(1, clients) + 1)
            result = measure(server, clients, args.warmup, args.seconds, args.rate, request)
            server.close()
            p99s = report(f"{name} ({round_})", result, baseline)
            baseline = baseline or result
            worst[name].append(max(p99s))
            ratios[name].append(max(p99s) / max(_q(lat, 0.99) for lat in baseline["probes"].values()))
    print("\nsummary, the worse route's p99 per round (median of the rounds, and the ratio to its round's baseline):")
    for name, *_ in rows:
        rounds = ", ".join(f"{v:.0f}" for v in worst[name])
        print(f"  {name:<40} median {statistics.median(worst[name]):>7.0f} ms ({statistics.median(ratios[name]):.1f}x)"
              f"   rounds: {rounds} ms")
    for threads in (1, 2):
        print(f"  GET /healthz while one lone sign-in hashes (cost 14), {threads} app thread(s): "
              + ", ".join(f"{latency * 1e3:.0f}" for latency in lone(threads)) + " ms")
    shipped = max(statistics.median(worst[name]) for name in worst if name.startswith("ASGI"))
    print(f"target: GET /peers and GET /healthz p99 ≤ {TARGET_P99_MS:g} ms while {args.clients} clients hammer "
          f"sign-in, as make api serves (ASGI, median of rounds): {shipped:.0f} ms, "
          f"{'met' if shipped <= TARGET_P99_MS else 'NOT met'}")


if __name__ == "__main__":
    main()
