"""Benchmark whole sessions on the real broker: a 4-peer sweep's overhead, dispatch latency, monitor burst rate.

The platform is put together as tests/e2e/conftest.py does it: the API (werkzeug, threaded), the
coordinator (an in-process worker) and the monitor (EventConsumer in its own thread) share this process
because they share mongomock; the peers are real `celery worker` processes; RabbitMQ and Redis are real;
storage is a scratch directory. One change keeps concurrent runs apart: every process of this run sends
and reads Celery events on an exchange of its own (peers load this module as their app), so no other
monitor on the broker sees (and lets a session claim) our peers, and ours never claims theirs.

1. Sessions: a warm-up session (not counted) measures an epoch's time with 4 peers sharing the cores, and
   sizes the epochs for ~10 s of training per peer. Each measured session is timed from the POST to the
   first GET that shows COMPLETED (polled every 25 ms), and from the document's created_at to finished_at;
   both are divided by the slowest peer's own training time (its result's `seconds`). A timeline built
   from task events, heartbeats and result timestamps (all wall clocks of this one machine) shows where
   the overhead goes.
2. Burst: another process sends N `task-heartbeat` events through one reused dispatcher (as fast as a
   peer could) into the monitor's durable queue; we time until the monitor has persisted all N.
   Baselines in the same run: the same events drained by a bare kombu consumer, fed straight to a
   Monitor (no broker), and `heartbeat.insert_many` alone.

Run: .venv/bin/python bench/session.py [--repeats 3] [--train-seconds 10] [--burst 20000]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# Celery reads these when `tasks` is first imported, here and in the peers and sender we start (they
# inherit this environment, so setdefault keeps the parent's run id and queue names).
RUN_ID = os.environ.setdefault("BENCH_RUN_ID", uuid.uuid4().hex[:8])
for _key, _value in {"BROKER_URL": "amqp://guest:guest@127.0.0.1:5672//", "RESULT_BACKEND": "redis://127.0.0.1:6379/14",
                     "COORDINATOR_QUEUE": f"bench-{RUN_ID}.coordinator", "MONITOR_QUEUE": f"bench-{RUN_ID}.monitor",
                     "PEER_THREADS": "1", "LOG_LEVEL": "WARNING"}.items():
    os.environ.setdefault(_key, _value)

from tasks.celery import app  # noqa: E402
from tests.e2e.platform import Api, PeerProcess, peer_environment, wait_until  # noqa: E402

app.conf.event_exchange = f"bench-{RUN_ID}.celeryev"
__all__ = ["app"]  # `celery -A bench.session worker` starts a peer of this run

PEERS, POLL = 4, 0.025
TARGET_RATIO, TARGET_OVERHEAD, TARGET_RATE = 1.10, 1.0, 2000.0
HEARTBEAT = "task-heartbeat"


def stamp(value: str | datetime | None) -> float:
    """An API or document timestamp (UTC) as epoch seconds, comparable with time.time() here."""
    value = datetime.fromisoformat(value) if isinstance(value, str) else value
    return value.replace(tzinfo=value.tzinfo or UTC).timestamp()


class Events(threading.Thread):
    """Task events and heartbeats of every session, from a transient receiver queue of our own."""

    def __init__(self) -> None:
        super().__init__(name="events", daemon=True)
        self.tasks: dict[str, dict[str, dict]] = defaultdict(dict)  # task id → event type → event
        self.beats: dict[tuple[str, str], list[dict]] = defaultdict(list)  # (session, peer) → heartbeats
        self.ready = threading.Event()

    def run(self) -> None:
        with app.connection_for_read() as connection:
            self.receiver = app.events.Receiver(connection, handlers={"*": self.on_event})
            consume_ready = self.receiver.on_consume_ready
            self.receiver.on_consume_ready = lambda *a, **k: (consume_ready(*a, **k), self.ready.set())
            self.receiver.capture(wakeup=False)

    def on_event(self, event: dict) -> None:
        if event["type"] == HEARTBEAT:
            self.beats[(event["session"], event["peer"])].append(event)
        elif event["type"].startswith("task-"):
            self.tasks[event["uuid"]][event["type"]] = event


class Platform:
    """API + coordinator + monitor here, PEERS peer processes; `close()` stops all and deletes our queues."""

    def __init__(self, scratch: Path) -> None:
        import models
        from settings import Settings
        from tasks import monitor
        from tasks.inprocess import InProcessWorkers
        from webapp import create_app

        os.environ.update(STORAGE_URL=str(scratch / "storage"), MONGODB_URI=f"mongomock://localhost/bench-{RUN_ID}",
                          PEERTRAIN_ENV="development", BCRYPT_ROUNDS="4",
                          JWT_SECRET_KEY="bench-secret-that-is-long-enough-for-hs256")
        self.queues = [os.environ["COORDINATOR_QUEUE"], os.environ["MONITOR_QUEUE"]]
        self.peers: list[PeerProcess] = []
        models.connect(os.environ["MONGODB_URI"])
        self.consumer = monitor.build(app, Settings.from_env())  # as `python -m tasks.monitor` does
        self.monitor_thread = threading.Thread(target=self.consumer.run, name="monitor", daemon=True)
        self.monitor_thread.start()
        self.events = Events()
        self.events.start()
        assert self.consumer.ready.wait(30) and self.events.ready.wait(30), "cannot consume events"
        self.workers = InProcessWorkers(app)
        self.workers.start(os.environ["COORDINATOR_QUEUE"], f"coordinator-{RUN_ID}@bench")
        from werkzeug.serving import make_server

        self.server = make_server("127.0.0.1", 0, create_app(), threaded=True)
        threading.Thread(target=self.server.serve_forever, name="api", daemon=True).start()
        self.api = Api(f"http://127.0.0.1:{self.server.server_port}").sign_up_and_in(f"bench{RUN_ID}")
        names = [f"bench{RUN_ID}{chr(97 + i)}" for i in range(PEERS)]
        env = peer_environment()
        for name in names:
            self.queues.append(f"peer.{name}")
            self.peers.append(PeerProcess(name, scratch, env, app="bench.session"))
        from models import Peer

        wait_until(lambda: Peer.objects(name__in=names, status="ONLINE").count() == PEERS, 90, "peers ONLINE")

    def stop_peers(self) -> None:
        for peer in self.peers:
            peer.stop()
        self.peers.clear()

    def close(self) -> None:
        self.stop_peers()
        self.server.shutdown()
        self.workers.stop()
        self.consumer.stop()
        self.receiver_stop()
        self.monitor_thread.join(10)
        with app.connection_for_write() as connection:
            channel = connection.default_channel
            for name in self.queues:
                channel.queue_delete(name)
            channel.exchange_delete(app.conf.event_exchange)

    def receiver_stop(self) -> None:
        if hasattr(self.events, "receiver"):
            self.events.receiver.should_stop = True
            self.events.join(5)


def sweep(platform: Platform, csv: Path, epochs: int) -> dict:
    """Run one 4-peer sweep through the API; return its timeline (seconds after the POST) and figures."""
    from celery.result import AsyncResult

    from models import TrainingSession

    hp = [{"learning_rate": lr, "epochs": epochs, "hidden": [128, 64], "batch_size": 64}
          for lr in (0.01, 0.003, 0.001, 0.0003)]
    t0, wall0 = time.perf_counter(), time.time()
    response = platform.api.start(csv, num_peers=PEERS, hyperparameters=json.dumps(hp))
    answered = time.perf_counter() - t0
    assert response.status_code == 202, response.text
    sid = response.json()["session_id"]
    while (doc := platform.api.session(sid))["status"] in ("PENDING", "RUNNING"):
        time.sleep(POLL)
    seen = time.perf_counter() - t0
    assert doc["status"] == "COMPLETED", doc
    runs = TrainingSession.objects(id=sid).first().peers
    events, beats = platform.events.tasks, platform.events.beats
    # A task's started/succeeded events may trail its result (the worker sends them after storing it).
    wait_until(lambda: all("task-started" in events[r.task_id] and len(beats[(sid, r.name)]) == epochs
                           for r in runs), 10, "every task's events")
    seconds = {name: peer["seconds"] for name, peer in doc["results"]["peers"].items()}
    # A peer's loop began one epoch's time before its first heartbeat and ended at its last.
    began = {r.name: min(b["timestamp"] - b["seconds"] for b in beats[(sid, r.name)]) for r in runs}
    ended = {r.name: max(b["timestamp"] for b in beats[(sid, r.name)]) for r in runs}
    stored = {r.name: stamp(AsyncResult(r.task_id, app=app).date_done) for r in runs}
    last = max(stored, key=stored.get)
    slowest = max(seconds.values())
    doc_wall = stamp(doc["finished_at"]) - stamp(doc["created_at"])
    return {
        "wall": seen, "doc_wall": doc_wall, "slowest": slowest, "seconds": seconds,
        "timeline": [
            (answered, "start request answered (202)"),
            (stamp(doc["created_at"]) - wall0, "session document created (created_at)"),
            (stamp(doc["started_at"]) - wall0, "coordinator ran run_session (started_at)"),
            (max(events[r.task_id]["task-started"]["timestamp"] for r in runs) - wall0,
             "every train task started (last task-started event)"),
            (max(began.values()) - wall0, "every peer's training loop began (data fetched, parsed, model built)"),
            (ended[last] - wall0, f"last peer's training loop ended ({last[-1]}: {seconds[last]:.2f} s of training)"),
            (stored[last] - wall0, "last peer's result stored in Redis (weights saved first)"),
            (stamp(doc["finished_at"]) - wall0, "aggregate ended the session (finished_at)"),
            (seen, f"client saw COMPLETED (polling every {POLL * 1000:.0f} ms)"),
        ],
    }


def _send_burst(pipe, n: int, session: str, exchange: str | None) -> None:
    """Child process: send `n` heartbeats through one reused dispatcher, as a very busy peer would."""
    if exchange:
        app.conf.event_exchange = exchange
    with app.events.default_dispatcher() as dispatcher:
        dispatcher.send("bench-warmup")  # connect and declare before the clock starts
        pipe.send("ready")
        pipe.recv()
        began = time.time()
        for i in range(n):
            dispatcher.send(HEARTBEAT, session=session, peer=f"p{i % 4}", round=0, epoch=i // 4 + 1,
                            epochs=n // 4, loss=1.0 / (i + 1), accuracy=0.9, val_loss=0.4, val_accuracy=0.88,
                            val_r2=None, samples_per_sec=75_000.0, seconds=0.05)
        ended = time.time()
    pipe.send((began, ended))


def burst(n: int, until_done, exchange: str | None = None) -> tuple[float, float, float]:
    """Start a sender, release it, wait with `until_done(session) -> finish time`; (send/s, done/s, session)."""
    from bson import ObjectId

    ctx = multiprocessing.get_context("spawn")
    here, there = ctx.Pipe()
    session = str(ObjectId())
    sender = ctx.Process(target=_send_burst, args=(there, n, session, exchange), daemon=True)
    sender.start()
    try:
        assert here.poll(60) and here.recv() == "ready", "the sender did not start"
        here.send("go")
        done = until_done(session)
        began, ended = here.recv()
    finally:
        sender.join(10)
        if sender.is_alive():
            sender.kill()
    return n / (ended - began), n / (done - began), session


class BareConsumer(threading.Thread):
    """A kombu consumer that only acknowledges (in batches, as the monitor does): the broker's floor."""

    def __init__(self, n: int, exchange: str) -> None:
        super().__init__(name="bare", daemon=True)
        self.n, self.exchange, self.count = n, exchange, 0
        self.ready, self.finished = threading.Event(), 0.0

    def run(self) -> None:
        from celery.events.event import get_exchange
        from kombu import Queue

        def on_message(body: dict, message) -> None:
            self.count += body.get("type") == HEARTBEAT
            if self.count % 2000 == 0 or self.count == self.n:
                message.ack(multiple=True)

        with app.connection_for_read() as connection:
            queue = Queue(self.exchange, exchange=get_exchange(connection, name=self.exchange), routing_key="#",
                          auto_delete=True)
            with connection.Consumer([queue], callbacks=[on_message], accept=["json"], prefetch_count=5000):
                self.ready.set()
                while self.count < self.n:
                    connection.drain_events(timeout=30)
            self.finished = time.time()
            queue(connection.default_channel).delete()
            get_exchange(connection, name=self.exchange)(connection.default_channel).delete()


def bursts(platform: Platform, n: int, repeats: int) -> None:
    """Heartbeats persisted per second by the production monitor, and the same N through each baseline."""
    from bson import ObjectId

    from models import Heartbeat
    from models import heartbeat as heartbeats
    from tasks.monitor import Monitor

    monitor = platform.consumer.monitor

    def persisted(target: int) -> float:
        deadline = time.monotonic() + 120
        while monitor.stored < target and time.monotonic() < deadline:
            time.sleep(0.002)
        return time.time()

    print(f"\n== heartbeat burst: {n:,} task-heartbeat events from another process (target >= {TARGET_RATE:,.0f}/s)")
    rates = []
    for i in range(repeats):
        target = monitor.stored + n
        sent, done, session = burst(n, lambda _session, target=target: persisted(target))
        lost = n - Heartbeat.objects(session_id=ObjectId(session)).count()
        rates.append(done)
        print(f"  run {i + 1}: sent {sent:8,.0f}/s   persisted {done:8,.0f}/s (send start -> all in the collection)"
              f"   lost {lost}")
    best = max(rates)

    bare = BareConsumer(n, f"bench-{RUN_ID}.bare")
    bare.start()
    assert bare.ready.wait(30)
    sent, floor, _ = burst(n, lambda _s: (bare.join(120), bare.finished)[1], exchange=bare.exchange)
    print(f"  baseline bare kombu consumer (no processing):   {floor:8,.0f}/s   (sent {sent:,.0f}/s)")

    events = [{"type": HEARTBEAT, "session": str(ObjectId()), "peer": f"p{i % 4}", "round": 0, "epoch": i // 4 + 1,
               "epochs": n // 4, "loss": 0.5, "accuracy": 0.9, "val_loss": 0.4, "val_accuracy": 0.88,
               "val_r2": None, "samples_per_sec": 75_000.0, "seconds": 0.05, "timestamp": time.time()}
              for i in range(n)]
    direct = Monitor(peer_timeout=60)
    t0 = time.perf_counter()
    for event in events:
        direct.on_event(event)
    direct.flush()
    fed = n / (time.perf_counter() - t0)
    print(f"  baseline Monitor.on_event + flush, no broker:   {fed:8,.0f}/s")

    sid = ObjectId()
    beats = [{"session_id": sid, "peer": f"p{i % 4}", "round": 0, "epoch": i // 4 + 1, "loss": 0.5}
             for i in range(n)]
    t0 = time.perf_counter()
    for start in range(0, n, monitor.batch_size):
        heartbeats.insert_many(beats[start:start + monitor.batch_size])
    raw = n / (time.perf_counter() - t0)
    print(f"  baseline heartbeat.insert_many alone (mongomock): {raw:6,.0f}/s")
    print(f"  best persisted/s = {best:,.0f}: {best / floor:.2f}x the bare consumer, {best / fed:.2f}x the no-broker"
          f" monitor, {best / raw:.2f}x insert_many -> target {'MET' if best >= TARGET_RATE else 'NOT MET'}")


def digits_csv(path: Path, copies: int) -> Path:
    """scikit-learn's digits, repeated: a real dataset, big enough that an epoch is not all overhead."""
    import numpy as np
    from sklearn.datasets import load_digits

    from tests.datasets import write_csv

    data = load_digits()
    return write_csv(path, np.tile(data.data, (copies, 1)), np.tile(data.target, copies))


def sessions(platform: Platform, csv: Path, train_seconds: float, repeats: int) -> None:
    warm = sweep(platform, csv, epochs=3)
    # Per-epoch time of the slowest peer while all 4 share the cores: the epochs for ~train_seconds.
    epoch = warm["slowest"] / 3
    epochs = max(3, min(1000, round(train_seconds / epoch)))
    print(f"== 4-peer sweep, {PEERS} peers x 1 torch thread on {os.cpu_count()} cores: warm-up says {epoch * 1000:.0f}"
          f" ms/epoch, so {epochs} epochs (targets: wall/slowest <= {TARGET_RATIO}, overhead <= {TARGET_OVERHEAD} s)")
    figures = []
    for i in range(repeats):
        run = sweep(platform, csv, epochs)
        figures.append(run)
        peers = "  ".join(f"{name[-1]}={s:.2f}s" for name, s in sorted(run["seconds"].items()))
        print(f"\n  run {i + 1}: peers' own training time: {peers}")
        for label, wall in (("client (POST -> GET shows COMPLETED)", run["wall"]),
                            ("document (created_at -> finished_at)", run["doc_wall"])):
            ratio, overhead = wall / run["slowest"], wall - run["slowest"]
            ok = ratio <= TARGET_RATIO and overhead <= TARGET_OVERHEAD
            print(f"    {label:38s} wall {wall:6.2f} s / slowest {run['slowest']:5.2f} s = {ratio:.3f}"
                  f"   overhead {overhead:+.2f} s   {'MET' if ok else 'NOT MET'}")
        print("    timeline (seconds after the start request was sent):")
        for at, what in run["timeline"]:
            print(f"      +{at:7.3f}  {what}")
    start_latency = [run["timeline"][3][0] for run in figures]
    print(f"\n  start request -> every train task running: {', '.join(f'{s * 1000:.0f} ms' for s in start_latency)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train-seconds", type=float, default=10.0)
    parser.add_argument("--burst", type=int, default=20_000)
    parser.add_argument("--copies", type=int, default=5, help="how many times the digits rows are repeated")
    args = parser.parse_args()
    assert app.conf.broker_url.startswith("amqp://"), f"needs RabbitMQ, not {app.conf.broker_url}"
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="peertrain-bench-session-") as scratch:
        csv = digits_csv(Path(scratch) / "digits.csv", args.copies)
        platform = Platform(Path(scratch))
        try:
            print(f"platform up in {time.perf_counter() - began:.1f} s; dataset {csv.stat().st_size / 1e6:.1f} MB,"
                  f" {1797 * args.copies} rows")
            sessions(platform, csv, args.train_seconds, args.repeats)
            platform.stop_peers()  # their work is done; the burst has the cores to itself and the monitor
            bursts(platform, args.burst, args.repeats)
        finally:
            platform.close()
    print(f"\ntotal {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
