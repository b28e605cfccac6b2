"""Benchmark sessions on the real broker: 4-peer sweep overhead, dispatch latency, monitor burst rate.

Assembled as the end-to-end tests assemble it (harness/platform.py, on embedded.py's one assembly): API,
coordinator (in-process worker) and monitor (EventConsumer thread) share this process, as they share
mongomock; peers are real `celery worker` processes, 1 torch thread each, registered with broker logins
of their own as an operator registers them (RabbitMQ's management API must answer); RabbitMQ and Redis
are real; storage is a scratch directory the peers reach through the API's `/objects/` grants. This run
uses an event exchange of its own, so no other monitor on the broker lets its sessions claim our peers,
nor ours theirs.

1. Sessions: a warm-up sweep sizes the epochs for ~10 s of training per peer. Each session is timed POST ->
   first GET showing COMPLETED (every 25 ms), and created_at -> finished_at, over the slowest peer's own
   training `seconds`; task events, heartbeats and result timestamps (one clock) give a timeline.
2. Burst: another process sends N `task-heartbeat` events into the monitor's durable queue, timed until all
   are stored: a registered peer's own, for a session it is training (the monitor stores nothing else).
   Baselines: a bare kombu consumer, the Monitor without a broker, `heartbeat.insert_many`.

Run: .venv/bin/python -m bench.session [--repeats 3] [--train-seconds 10] [--burst 20000]
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import statistics
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path

# Peers and senders this bench starts inherit this environment (their broker, exchanges and queue names):
# setdefault keeps the parent's run id and names in the children.
RUN_ID = os.environ.setdefault("BENCH_RUN_ID", uuid.uuid4().hex[:8])
for _key, _value in {"BROKER_URL": "amqp://guest:guest@127.0.0.1:5672//", "RESULT_BACKEND": "redis://127.0.0.1:6379/14",
                     "COORDINATOR_QUEUE": f"bench-{RUN_ID}.coordinator", "MONITOR_QUEUE": f"bench-{RUN_ID}.monitor",
                     "RESULTS_QUEUE": f"bench-{RUN_ID}.results", "EVENT_EXCHANGE": f"bench-{RUN_ID}.celeryev",
                     "PEER_THREADS": "1", "LOG_LEVEL": "WARNING",
                     # The burst measures what the monitor can store, not a peer's budget (what is over it waits).
                     "PEER_EVENT_RATE": "1000000"}.items():
    os.environ.setdefault(_key, _value)

import numpy as np  # noqa: E402
from bson import ObjectId  # noqa: E402
from celery.events.event import get_exchange  # noqa: E402
from celery.result import AsyncResult  # noqa: E402
from kombu import Queue  # noqa: E402

from harness.datasets import write_csv  # noqa: E402
from harness.platform import Served  # noqa: E402
from harness.processes import PeerProcess, peer_environment  # noqa: E402
from harness.waiting import wait_until  # noqa: E402
from models import Dataset, Heartbeat, Peer, PeerRun, TrainingSession  # noqa: E402
from models import assignment as assignments  # noqa: E402
from models import heartbeat as heartbeats  # noqa: E402
from settings import Settings  # noqa: E402
from tasks import monitor, protocol  # noqa: E402

PEERS, POLL = 4, 0.025
TARGET_RATIO, TARGET_OVERHEAD, TARGET_RATE = 1.10, 1.0, 2000.0


def stamp(value: str | datetime) -> float:
    """An API or document timestamp (UTC) as epoch seconds, comparable with time.time() in any process here."""
    value = datetime.fromisoformat(value) if isinstance(value, str) else value
    return value.replace(tzinfo=value.tzinfo or UTC).timestamp()


class Events(threading.Thread):
    """Every task event and heartbeat of this run, from a transient receiver queue of our own."""

    def __init__(self, app) -> None:
        super().__init__(name="events", daemon=True)
        self.app = app
        self.tasks: dict[str, dict[str, dict]] = defaultdict(dict)  # task id → event type → event
        self.beats: dict[tuple[str, str], list[dict]] = defaultdict(list)  # (session, peer) → heartbeats
        self.ready = threading.Event()

    def run(self) -> None:
        with self.app.connection_for_read() as connection:
            self.receiver = self.app.events.Receiver(connection, handlers={"*": self.on_event})
            consume_ready = self.receiver.on_consume_ready
            self.receiver.on_consume_ready = lambda *a, **k: (consume_ready(*a, **k), self.ready.set())
            self.receiver.capture(wakeup=False)

    def on_event(self, event: dict) -> None:
        if event["type"] == protocol.HEARTBEAT:
            self.beats[(event["session"], event["peer"])].append(event)
        elif event["type"].startswith("task-"):
            self.tasks[event["uuid"]][event["type"]] = event

    def stop(self) -> None:
        if hasattr(self, "receiver"):
            self.receiver.should_stop = True
            self.join(5)


class Platform:
    """The platform (harness/platform.py `Served`: API, coordinator and monitor in this process) and PEERS peer
    processes, plus this bench's own event receiver; `stack.close()` stops them and cleans the broker up."""

    def __init__(self) -> None:
        self.stack = ExitStack()  # run in reverse: the broker is cleaned up after everything has stopped
        self.queues = [os.environ["COORDINATOR_QUEUE"], os.environ["MONITOR_QUEUE"]]
        self.peers: list[PeerProcess] = []

    def start(self, scratch: Path, peers: int = PEERS) -> None:
        """Start the platform and `peers` peer processes; returns once every peer is ONLINE."""
        # Also what other processes of this bench read (bench/scale.py's API for the peers' transfers).
        os.environ.update(STORAGE_URL=str(scratch / "storage"), MONGODB_URI=f"mongomock://localhost/bench-{RUN_ID}",
                          PEERTRAIN_ENV="development", BCRYPT_ROUNDS="4",
                          JWT_SECRET_KEY="bench-secret-that-is-long-enough-for-hs256")
        settings = Settings.from_env()
        self.served = Served(settings, scratch, name=f"coordinator-{RUN_ID}")
        self.app = None
        exchange = settings.event_exchange
        self.stack.callback(self.delete, [exchange, f"{exchange}.sessions", f"bench-{RUN_ID}.bare",
                                          settings.results_queue])
        self.served.start()
        self.stack.callback(self.served.stop)
        self.app = self.served.celery
        self.events = Events(self.app)
        self.events.start()
        self.stack.callback(self.events.stop)
        assert self.events.ready.wait(30), "cannot consume events"
        self.api = self.served.user(f"bench{RUN_ID}")
        self.stack.callback(self.stop_peers)
        names = [f"bench{RUN_ID}{chr(97 + i) if i < 26 else f'p{i}'}" for i in range(peers)]
        for name in names:
            self.queues += [protocol.task_queue(name), protocol.stop_queue(name).name]
            self.peers.append(PeerProcess(name, scratch, peer_environment(**self.register(name))))
        wait_until(lambda: Peer.objects(name__in=names, status="ONLINE").count() == peers, 90, "peers ONLINE")

    @property
    def monitor(self):
        return self.served.monitor

    @property
    def workers(self):
        return self.served.platform.workers

    def register(self, name: str) -> dict[str, str]:
        """Register a peer as an operator does; returns its machine's environment (its own login)."""
        return self.served.register(name)

    def stop_peers(self) -> None:
        while self.peers:
            self.peers.pop().stop()

    def delete(self, exchanges: list[str]) -> None:
        """Delete this run's queues and exchanges, as tests/conftest.py `_broker_cleanup` does."""
        if self.app is None:
            return
        with self.app.connection_for_write() as connection:
            channel = connection.default_channel
            for kind, name in [("queue", q) for q in self.queues] + [("exchange", e) for e in exchanges]:
                try:
                    getattr(channel, f"{kind}_delete")(name)
                except connection.channel_errors:
                    channel = connection.channel()


def sweep(platform: Platform, csv: Path, epochs: int) -> dict:
    """One 4-peer sweep through the API: both walls, each peer's training time, a timeline after the POST."""
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
    tasks, beats = platform.events.tasks, {r.name: platform.events.beats[(sid, r.name)] for r in runs}
    # Events may trail the result: a worker stores the result (which fires the chord) before it says so.
    wait_until(lambda: all("task-started" in tasks[r.task_id] and len(beats[r.name]) == epochs for r in runs),
               10, "every task's events")
    started = max(tasks[r.task_id]["task-started"]["timestamp"] for r in runs) - wall0
    # A training loop began one epoch before its first heartbeat was sent, and ended at its last.
    began = max(beats[r.name][0]["timestamp"] - beats[r.name][0]["seconds"] for r in runs) - wall0
    stored = {r.name: stamp(AsyncResult(r.task_id, app=platform.app).date_done) - wall0 for r in runs}
    last = max(stored, key=stored.get)
    return {
        "wall": seen, "doc_wall": stamp(doc["finished_at"]) - stamp(doc["created_at"]), "dispatch": started,
        "seconds": {name: peer["seconds"] for name, peer in doc["results"]["peers"].items()},
        # The slowest peer's steady epoch (the first one also pays for warming torch up).
        "epoch": max(statistics.median(b["seconds"] for b in beats[r.name][1:]) for r in runs),
        "timeline": sorted([
            (answered, "start request answered (202)"),
            (stamp(doc["created_at"]) - wall0, "session document created (created_at)"),
            (stamp(doc["started_at"]) - wall0, "coordinator ran run_session (started_at)"),
            (started, "every train task started (last task-started event)"),
            (began, "every peer's training loop began (dataset fetched and parsed, model built)"),
            (beats[last][-1]["timestamp"] - wall0, f"training loop ended on {last[-1]}, the last peer to return"),
            (stored[last], f"{last[-1]}'s result stored in Redis (after its weights were saved)"),
            (stamp(doc["finished_at"]) - wall0, "aggregate ended the session (finished_at)"),
            (seen, f"client saw COMPLETED (polling every {POLL * 1000:.0f} ms)"),
        ]),
    }


def sessions(platform: Platform, csv: Path, train_seconds: float, repeats: int) -> None:
    epoch = sweep(platform, csv, epochs=4)["epoch"]  # with 4 peers sharing the cores, as in the runs below
    epochs = max(3, min(1000, round(train_seconds / epoch)))
    print(f"== {PEERS}-peer sweep, 1 torch thread each, {os.cpu_count()} cores: warm-up epoch {epoch * 1000:.0f} ms ->"
          f" {epochs} epochs (targets: wall/slowest <= {TARGET_RATIO}, overhead <= {TARGET_OVERHEAD:g} s)")
    dispatch = []
    for i in range(repeats):
        run = sweep(platform, csv, epochs)
        slowest = max(run["seconds"].values())
        dispatch.append(run["dispatch"])
        peers = "  ".join(f"{name[-1]} {s:.2f} s" for name, s in sorted(run["seconds"].items()))
        print(f"\n  run {i + 1}: each peer's own training time: {peers}")
        for label, wall in (("client: POST -> GET shows COMPLETED", run["wall"]),
                            ("document: created_at -> finished_at", run["doc_wall"])):
            ok = wall / slowest <= TARGET_RATIO and wall - slowest <= TARGET_OVERHEAD
            print(f"    {label:36s} {wall:6.2f} s / slowest {slowest:5.2f} s = {wall / slowest:.3f}"
                  f"   overhead {wall - slowest:+.2f} s   {'MET' if ok else 'NOT MET'}")
        print("    timeline, seconds after the start request was sent:")
        for at, what in run["timeline"]:
            print(f"      {at:+7.3f}  {what}")
    print(f"\n  start request -> every train task running: {', '.join(f'{s * 1000:.0f} ms' for s in dispatch)}")


BURST_PEER = f"burst{RUN_ID}"


def beat(i: int, n: int) -> dict:
    """The fields of the i-th of n heartbeats (one peer, an epoch each), as tasks/training.py reports them."""
    return {"peer": BURST_PEER, "round": 0, "epoch": i + 1, "epochs": n, "loss": 1.0 / (i + 1),
            "accuracy": 0.9, "val_loss": 0.4, "val_accuracy": 0.88, "val_r2": None, "samples_per_sec": 75e3,
            "seconds": 0.05}


def burst_session(n: int) -> tuple[str, str]:
    """A running session the burst peer trains, n epochs long, and its task (as the coordinator records one it
    sent): the monitor stores only such heartbeats."""
    session = TrainingSession(owner_id=ObjectId(), target="label", status="RUNNING",
                              dataset=Dataset(filename="x.csv", url="file:///x", bytes=1, sha256="0" * 64, rows=1,
                                              columns=1),
                              peers=[PeerRun(name=BURST_PEER, status="RUNNING", hyperparameters={"epochs": n})]).save()
    task_id = str(protocol.TaskId.new(session.id, 0))
    assignments.record([{"_id": task_id, "session_id": session.id, "peer": BURST_PEER, "round": 0, "epochs": n,
                         "position": 0, "chord": None, "sent_at": datetime.now(UTC).replace(tzinfo=None),
                         "deadline": None}])
    return str(session.id), task_id


def _send(pipe, n: int, session: str, task_id: str, exchange: str, login: str) -> None:
    """Child process: send n heartbeats through one dispatcher of the peer's app, as fast as a peer's could."""
    from tasks import peer as peer_app
    from tasks.celery import create_app

    sender = peer_app.create_app(login) if login else create_app(Settings.from_env())
    sender.conf.event_exchange = exchange
    # Our own connection, closed with AMQP's handshake before we report: a process that exited with a
    # pooled connection open (as `default_dispatcher()` leaves one) lost the tail of its burst here.
    with sender.connection_for_write() as connection, sender.events.Dispatcher(connection) as dispatcher:
        dispatcher.send("bench-warmup")  # connected and declared before the clock starts
        pipe.send("ready")
        pipe.recv()
        began = time.time()
        for i in range(n):
            dispatcher.send(protocol.HEARTBEAT, uuid=task_id, session=session, **beat(i, n))
        ended = time.time()
    pipe.send((began, ended))


def burst(n: int, exchange: str, wait, login: str = "", task: tuple[str, str] | None = None
          ) -> tuple[float, float, float, str]:
    """Send n heartbeats from another process; `wait()` returns once they are through. (sent/s, done/s, lag, id)"""
    ctx = multiprocessing.get_context("spawn")
    here, there = ctx.Pipe()
    session, task_id = task or (str(ObjectId()), "none")
    sender = ctx.Process(target=_send, args=(there, n, session, task_id, exchange, login), daemon=True)
    sender.start()
    try:
        assert here.poll(60) and here.recv() == "ready", "the sender did not start"
        here.send("go")
        done = wait()
        began, ended = here.recv()
    finally:
        sender.join(10)
        sender.kill()
    return n / (ended - began), n / (done - began), done - ended, session


def bare_consumer(app, n: int, exchange: str):
    """A kombu consumer that only acknowledges (in batches, as the monitor does); returns its `wait`."""
    count = 0

    def on_message(body: dict, message) -> None:
        nonlocal count
        count += body.get("type") == protocol.HEARTBEAT
        if count % 2000 == 0 or count == n:
            message.ack(multiple=True)

    def wait() -> float:
        with connection, consumer:
            while count < n:
                connection.drain_events(timeout=30)
        return time.time()

    connection = app.connection_for_read()
    queue = Queue(exchange, get_exchange(connection, name=exchange), "#", auto_delete=True)
    # Declared, bound and consuming now, before the sender starts; drained in the caller's thread, as the
    # monitor drains in its own.
    consumer = connection.Consumer([queue], callbacks=[on_message], accept=["json"], prefetch_count=5000)
    return wait


def bursts(platform: Platform, n: int, repeats: int) -> None:
    """Heartbeats stored per second by the monitor as deployed, and the same N through each baseline."""
    deployed = platform.monitor  # the Monitor that the monitor thread feeds

    def stored(target: int) -> float:
        deadline = time.monotonic() + 120
        while deployed.stored < target and time.monotonic() < deadline:
            time.sleep(0.002)
        return time.time()

    print(f"\n== burst of {n:,} task-heartbeat events from another process (target: >= {TARGET_RATE:,.0f} stored/s)")
    best = 0.0
    enrolment = platform.register(BURST_PEER)
    for i in range(repeats):
        sent, done, lag, session = burst(n, enrolment["EVENT_EXCHANGE"], lambda t=deployed.stored + n: stored(t),
                                         enrolment["BROKER_URL"], burst_session(n))
        lost = n - Heartbeat.objects(session_id=ObjectId(session)).count()
        best = max(best, done)
        print(f"  run {i + 1}: sent {sent:6,.0f}/s   stored {done:6,.0f}/s (first send -> all {n:,} in MongoDB,"
              f" {lag:.2f} s after the last send)   lost {lost}")
    exchange = f"bench-{RUN_ID}.bare"
    sent, floor, lag, _ = burst(n, exchange, bare_consumer(platform.app, n, exchange))
    print(f"  baseline: bare kombu consumer, same burst       {floor:6,.0f}/s   (sent {sent:,.0f}/s, lag {lag:.2f} s)")
    direct, (session, task_id), t0 = monitor.Monitor(peer_timeout=60), burst_session(n), time.perf_counter()
    for i in range(n):
        direct.on_event({"type": protocol.HEARTBEAT, "uuid": task_id, "session": session, "timestamp": time.time(),
                         **beat(i, n)}, protocol.broker_user(BURST_PEER))
    direct.flush()
    fed = n / (time.perf_counter() - t0)
    print(f"  baseline: Monitor.on_event + flush, no broker  {fed:6,.0f}/s")
    one = ObjectId()  # one session, as in the burst (each session's first event reads where its log ends)
    docs, t0 = [{"session_id": one, **beat(i, n)} for i in range(n)], time.perf_counter()
    for start in range(0, n, deployed.batch_size):
        heartbeats.insert_many(docs[start:start + deployed.batch_size])
    raw = n / (time.perf_counter() - t0)
    print(f"  baseline: heartbeat.insert_many alone          {raw:6,.0f}/s   (batches of {deployed.batch_size})")
    print(f"  best {best:,.0f} stored/s = {best / floor:.2f}x bare consumer, {best / fed:.2f}x no-broker monitor,"
          f" {best / raw:.2f}x insert_many: {'MET' if best >= TARGET_RATE else 'NOT MET'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train-seconds", type=float, default=10.0)
    # One peer's burst: its queue of events holds protocol.PEER_EVENT_BACKLOG unread, past that its oldest go.
    parser.add_argument("--burst", type=int, default=protocol.PEER_EVENT_BACKLOG)
    parser.add_argument("--copies", type=int, default=5, help="how many times the digits rows are repeated")
    args = parser.parse_args()
    assert os.environ["BROKER_URL"].startswith("amqp://"), f"needs RabbitMQ, not {os.environ['BROKER_URL']}"
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per poll would cost and clutter
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="peertrain-bench-session-") as scratch:
        from sklearn.datasets import load_digits  # slow to import: not in peers, which load this module

        # scikit-learn's digits, repeated: real data, with enough rows that an epoch is mostly training.
        digits = load_digits()
        csv = write_csv(Path(scratch) / "digits.csv", np.tile(digits.data, (args.copies, 1)),
                        np.tile(digits.target, args.copies))
        platform = Platform()
        try:
            platform.start(Path(scratch))
            print(f"platform up in {time.perf_counter() - began:.1f} s; {csv.stat().st_size / 1e6:.1f} MB CSV,"
                  f" {1797 * args.copies} rows")
            sessions(platform, csv, args.train_seconds, args.repeats)
            platform.stop_peers()  # done: the burst gets the cores,
            platform.events.stop()  # and only the monitor consumes events in this process
            bursts(platform, args.burst, args.repeats)
        finally:
            platform.stack.close()
    print(f"\ntotal {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
