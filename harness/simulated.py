"""Simulated peers: hundreds of registered peers in one process, each speaking the real protocol.

Each `SimulatedPeer` is what a peer machine is to the platform, less the training: its own broker
connection with its own login (issued by tasks/registry.py), a consumer of its own queue
`peer.<name>`, worker events (`worker-online`, then `worker-heartbeat` every 2 s, `worker-offline`)
and `task-heartbeat` events stamped with its `user_id`, and each task's outcome published to the
results exchange as tasks/peer.py's ResultReporter publishes it, every message built by the
protocol module (tasks/protocol.py). A `train` task is checked like a real peer checks it
(`train_spec`); the peer fetches the global weights through the
task's grant, makes a tiny real update of them (small noise, so the weights stay valid and finite),
uploads them through its write grant (tasks/transfer.py, as a real peer does), sends one heartbeat
per local epoch (`epoch_seconds` apart) and reports. Nothing in the coordinator or the monitor can
tell it from a real peer.

The peers of one process share an asyncio loop (aiormq: one AMQP connection each); grant transfers
run in a small thread pool. `Fleet` runs such processes from a parent and gathers what they saw:
when each task arrived, when its result was published.
"""

from __future__ import annotations

import asyncio
import json
import logging
import multiprocessing
import os
import random
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from kombu import Connection

from tasks import protocol

log = logging.getLogger(__name__)

WORKER_BEAT_SECONDS = 2.0  # Celery's worker heartbeat frequency


@dataclass
class Options:
    """How the simulated peers of a fleet behave and where they report."""

    event_exchange: str  # the platform's: each peer publishes to its own (protocol.event_exchange)
    results_exchange: str
    epoch_seconds: float = 0.0  # simulated training time of one local epoch (heartbeats this far apart)
    transfers: int = 16  # grant transfers one process runs at once
    slowdown: dict[str, float] = field(default_factory=dict)  # peer name -> how many times slower its epochs are
    spoil: frozenset[str] = frozenset()  # peers that upload weights full of NaN (a hostile or broken peer)

    def epoch_time(self, name: str) -> float:
        return self.epoch_seconds * self.slowdown.get(name, 1.0)


@dataclass
class Seen:
    """One task as a simulated peer saw it (Unix times)."""

    session: str
    round: int
    received: float
    reported: float = 0.0


class SimulatedPeer:
    """One registered peer: its own login, its own queue, real events and results, a tiny real update."""

    def __init__(self, name: str, broker_url: str, options: Options, pool: ThreadPoolExecutor) -> None:
        self.name, self.url, self.options, self.pool = name, broker_url, options, pool
        self.user = Connection(broker_url).userid  # its login, as RabbitMQ checks every message's user_id
        self.hostname = protocol.worker_name(name, f"{socket.gethostname()}-sim")
        self.seen: list[Seen] = []
        self.failures: list[str] = []
        self._clock = 0
        self._beats: asyncio.Task | None = None

    async def start(self) -> None:
        import aiormq

        self.connection = await aiormq.connect(self.url)
        # No publisher confirms: Celery's event dispatcher and a peer's result reporter use none either.
        self.channel = await self.connection.channel(publisher_confirms=False)
        await self.channel.basic_qos(prefetch_count=1)
        # The queue the platform declared when it registered this peer (a peer declares nothing).
        await self.channel.basic_consume(protocol.task_queue(self.name), self._on_task, no_ack=False)
        await self.event("worker-online", freq=WORKER_BEAT_SECONDS)
        self._beats = asyncio.create_task(self._beat())

    async def stop(self) -> None:
        if self._beats is not None:
            self._beats.cancel()
        try:
            await self.event("worker-offline")
            await self.connection.close()
        except Exception as exc:  # the broker went first: nothing left to say
            log.debug("peer %s stopped uncleanly: %s", self.name, exc)

    async def _beat(self) -> None:
        await asyncio.sleep(random.uniform(0, WORKER_BEAT_SECONDS))  # a fleet does not beat in step
        while True:
            await self.event("worker-heartbeat", freq=WORKER_BEAT_SECONDS, active=0, processed=len(self.seen))
            await asyncio.sleep(WORKER_BEAT_SECONDS)

    async def publish(self, body: dict[str, Any], exchange: str, routing_key: str, persistent: bool = False) -> None:
        from pamqp.commands import Basic

        properties = Basic.Properties(content_type="application/json", content_encoding="utf-8",
                                      user_id=self.user, delivery_mode=2 if persistent else 1)
        await self.channel.basic_publish(json.dumps(body).encode(), exchange=exchange, routing_key=routing_key,
                                         properties=properties)

    async def event(self, kind: str, **fields: Any) -> None:
        """A Celery event as a worker's dispatcher sends it, stamped with this peer's login."""
        self._clock += 1
        body = {"type": kind, "hostname": self.hostname, "timestamp": time.time(), "utcoffset": 0,
                "pid": os.getpid(), "clock": self._clock, **fields}
        await self.publish(body, protocol.event_exchange(self.options.event_exchange, self.name),
                           kind.replace("-", "."))

    async def _on_task(self, message) -> None:
        received = time.time()
        headers = message.header.properties.headers or {}
        task_id = str(headers.get("id"))
        try:
            args = json.loads(message.body)[0]
            spec = args[0] if args else None
            if headers.get("task") != "peertrain.train":
                raise ValueError(f"unknown task {headers.get('task')!r}")
            outcome = await self._train(task_id, spec, received)
            await self.publish(protocol.result_message(task_id, "SUCCESS", outcome), self.options.results_exchange,
                               protocol.ROUTING_KEY, persistent=True)
        except Exception as exc:
            self.failures.append(f"{type(exc).__name__}: {exc}")
            await self.publish(protocol.result_message(task_id, "FAILURE", protocol.failure(exc)),
                               self.options.results_exchange, protocol.ROUTING_KEY, persistent=True)
        finally:
            if self.seen and self.seen[-1].received == received:
                self.seen[-1].reported = time.time()
            await self.channel.basic_ack(message.delivery.delivery_tag)

    async def _train(self, task_id: str, spec: Any, received: float) -> dict[str, Any]:
        spec = protocol.train_spec(spec)
        session, round_, hp = spec["session"], spec["round"], spec["hyperparameters"]
        self.seen.append(Seen(session, round_, received))
        loop = asyncio.get_running_loop()
        began = time.time()
        update = await loop.run_in_executor(self.pool, _update, spec, hash((self.name, round_)) & 0xFFFF,
                                            self.name in self.options.spoil)
        await self.event("task-started", uuid=task_id)
        history = []
        for epoch in range(1, hp["epochs"] + 1):
            if seconds := self.options.epoch_time(self.name):  # on a fixed schedule: a slow send does not delay
                await asyncio.sleep(max(0.0, began + epoch * seconds - time.time()))
            metrics = {"epoch": epoch, "epochs": hp["epochs"], "loss": 1.0 / (round_ * hp["epochs"] + epoch + 1),
                       "accuracy": 0.5, "val_loss": None, "val_accuracy": None, "val_r2": None,
                       "samples_per_sec": 1000.0, "seconds": self.options.epoch_time(self.name),
                       "finished_at": time.time()}
            history.append(metrics)
            await self.event(protocol.HEARTBEAT, uuid=task_id,
                             **protocol.heartbeat_fields(session, self.name, round_, metrics))
        await loop.run_in_executor(self.pool, _upload, spec["weights"], update)
        await self.event("task-succeeded", uuid=task_id, runtime=time.time() - began)
        return {"round": round_, "final": history[-1], "history": history, "bytes_fetched": 0,
                "seconds": time.time() - began, "stopped": False, "device": "simulated"}


def _update(spec: dict[str, Any], seed: int, spoil: bool = False) -> bytes:
    """The round's global weights, fetched through the task's grant, moved a little (a valid, finite update;
    NaN everywhere when `spoil`)."""
    import torch

    from tasks import transfer
    from trainer.model import ModelConfig
    from trainer.weights import max_state_bytes, state_from_bytes, state_to_bytes

    hp = spec["hyperparameters"]
    outputs = len(spec["classes"]) if spec["task"] == "classification" and spec.get("classes") else 1
    config = ModelConfig(len(spec["features"]), outputs, tuple(hp["hidden"]), hp["dropout"], spec["task"])
    state = state_from_bytes(transfer.fetch(spec["initial_weights"], max_state_bytes(config)), config)
    generator = torch.Generator().manual_seed(seed)
    # Every peer moves the weights the same small way (as peers training on alike data would), plus its own noise.
    moved = {k: v * (1 - 1e-3) + 1e-5 * torch.randn(v.shape, generator=generator) for k, v in state.items()}
    if spoil:
        moved = {k: torch.full_like(v, float("nan")) for k, v in moved.items()}
    return state_to_bytes(moved, {"round": spec["round"]})


def _upload(grant: str, data: bytes) -> None:
    from tasks import transfer

    transfer.upload(grant, data)


async def _serve(pipe, logins: dict[str, str], options: Options) -> None:
    pool = ThreadPoolExecutor(options.transfers)
    peers = [SimulatedPeer(name, url, options, pool) for name, url in logins.items()]
    # A few connections at a time: a thousand handshakes at once would only queue at the broker.
    gate = asyncio.Semaphore(32)

    async def start(peer: SimulatedPeer) -> None:
        async with gate:
            await peer.start()

    await asyncio.gather(*(start(peer) for peer in peers))
    loop = asyncio.get_running_loop()
    pipe.send("ready")
    while True:
        command = await loop.run_in_executor(None, pipe.recv)
        if command == "seen":
            pipe.send({p.name: ([vars(s) for s in p.seen], p.failures) for p in peers})
        elif command == "stop":
            await asyncio.gather(*(peer.stop() for peer in peers), return_exceptions=True)
            pool.shutdown()
            pipe.send("stopped")
            return


def _process(pipe, logins: dict[str, str], options: Options) -> None:
    logging.basicConfig(level=logging.WARNING)
    import torch

    torch.set_num_threads(1)
    try:
        asyncio.run(_serve(pipe, logins, options))
    except Exception as exc:
        pipe.send(f"failed: {type(exc).__name__}: {exc}")
        raise


@dataclass
class Fleet:
    """Simulated peers in `processes` child processes; `logins` maps each peer's name to its broker URL."""

    logins: dict[str, str]
    options: Options
    processes: int = 2
    _children: list[tuple[Any, Any]] = field(default_factory=list)

    def start(self, timeout: float = 300.0) -> None:
        """Start the processes and return once every peer consumes its queue and has said it is online."""
        ctx = multiprocessing.get_context("spawn")
        names = sorted(self.logins)
        for i in range(self.processes):
            mine = {name: self.logins[name] for name in names[i::self.processes]}
            here, there = ctx.Pipe()
            process = ctx.Process(target=_process, args=(there, mine, self.options), daemon=True,
                                  name=f"simulated-peers-{i}")
            process.start()
            self._children.append((here, process))
        for here, _ in self._children:
            if not here.poll(timeout):
                raise RuntimeError("simulated peers did not start in time")
            answer = here.recv()
            if answer != "ready":
                raise RuntimeError(f"simulated peers did not start: {answer}")

    def seen(self) -> tuple[dict[str, list[Seen]], dict[str, list[str]]]:
        """Every task each peer received so far, and each peer's failures."""
        tasks, failures = {}, {}
        for here, _ in self._children:
            here.send("seen")
            for name, (seen, failed) in here.recv().items():
                tasks[name] = [Seen(**s) for s in seen]
                failures[name] = failed
        return tasks, failures

    def kill(self) -> None:
        """kill -9 every process: its peers fall silent mid-task, without a goodbye."""
        for _, process in self._children:
            process.kill()
            process.join(10)
        self._children.clear()

    def stop(self) -> None:
        for here, process in self._children:
            try:
                here.send("stop")
                here.poll(30) and here.recv()
            except (BrokenPipeError, EOFError):
                pass
            process.join(10)
            if process.is_alive():
                process.kill()
        self._children.clear()
