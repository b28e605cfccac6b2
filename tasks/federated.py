"""Federated sessions: the data is split once across the peers, the weights combined round after round.

The coordinator keeps a held-out validation part and writes one CSV shard per peer, so each peer
downloads only its own rows (`Federated.prepare`, shared by both schedules). In a synchronous session
(`SyncFederated`) every round is a chord: each peer trains `local_epochs` from the current global
weights on its shard and returns its weights through storage; the body checks them (the gate),
combines them (FedAvg weighted by the plan's sample counts, or the coordinate-wise median or trimmed
mean that resist a bad peer), evaluates the global model on the held-out rows, and starts the next
round or finishes the session with the global model as its result.
"""

from __future__ import annotations

import functools
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from models import Round
from models import event as events
from models import peer as peers
from models import session as sessions
from models.session import History, Plan
from tasks import enrolment, gate, transfer
from tasks.gate import Outcome
from tasks.storage import LocalStorage
from tasks.strategy import RoundStrategy, Strategy, split_seed
from trainer import scaffold, screening, serveropt
from trainer.loop import evaluate
from trainer.model import ModelConfig, SimpleDNN
from trainer.normalization import Normalization, fit_normalization
from trainer.split import shard
from trainer.table import Table
from trainer.weights import (
    Checkpoint,
    checkpoint_bytes,
    max_state_bytes,
    median,
    state_from_bytes,
    state_to_bytes,
    trimmed_mean,
)
from trainer.weights import average as fedavg

log = logging.getLogger(__name__)

# A peer whose weights sit this many times farther from the aggregate than the typical peer's is
# reported as an outlier (the median and trimmed mean outvote it; FedAvg would not).
OUTLIER_FACTOR = 10.0
# Peers' weights read from storage at once while aggregating.
READERS = 8
# Accepted updates whose size and effect the next rounds or folds are judged against.
HISTORY = 32
# The server optimizer's state: two moments per weight, far below this for any model the limits allow.
SERVER_STATE_BYTES = 2 << 30
# Weights up to this size travel in the task itself, not through a storage grant: a peer starts training without
# asking storage for them (bench/rounds.py: 18 ms sooner, on localhost; 1 MiB is ~1.4 MB in base64)...
INLINE_BYTES = 1 << 20
# ... while a round's copies of them, one per peer, each carried by the broker, add up to no more than this: past it
# (a thousand peers of a 126 KB model), storage serves them, as it is built to.
ROUND_INLINE_BYTES = 32 << 20
# A peer's update as SCAFFOLD reads it: the peer, the weights it was sent, its weights, the key they came to.
Trained = tuple[str, dict[str, torch.Tensor], dict[str, torch.Tensor], str]


def combine(method: str, states: list[dict[str, torch.Tensor]], samples: list[float]) -> dict[str, torch.Tensor]:
    """The round's aggregate of the peers' weights by `method`."""
    if method == "median":
        return median(states)
    if method == "trimmed_mean":
        # Drop 20% from each end, and at least one peer once there are three: 20% of 4 peers is none,
        # which would leave a plain mean with no protection against a bad peer.
        fraction = 0.2 if len(states) < 3 else max(0.2, 1.000001 / len(states))
        return trimmed_mean(states, fraction)
    return fedavg(states, samples)


def outliers(merged: dict[str, torch.Tensor], states: dict[str, dict[str, torch.Tensor]]) -> dict[str, float]:
    """Peers whose weights are far from the aggregate, with how many times the typical distance."""
    if len(states) < 3:
        return {}
    names = list(states)
    # Every peer's weights as one row: one distance computation for the whole round.
    flat = torch.stack([torch.cat([states[n][k].double().flatten() for k in merged]) for n in names])  # [peers, P]
    centre = torch.cat([merged[k].double().flatten() for k in merged])  # [P]
    distances = dict(zip(names, torch.linalg.vector_norm(flat - centre, dim=1).tolist(), strict=True))
    typical = float(np.median(list(distances.values()))) or 1e-12
    return {name: round(d / typical, 1) for name, d in distances.items() if d > OUTLIER_FACTOR * typical}


class Federated(Strategy):
    """What both schedules share: the split, a task's spec, the held-out evaluation, the final model."""

    @property
    def settings(self) -> Any:
        return self.session.federated

    @property
    def config(self) -> ModelConfig:
        return ModelConfig.from_dict(self.session.plan.model)

    def prepare(self) -> None:
        """Hold the validation rows out and split the rest into one shard per peer; store them and the initial
        weights, and record the plan; a plan recorded already (a start run again) is kept."""
        session = self.session
        if session.plan is not None and session.plan.initial_url:
            return
        runs = session.peers
        split: dict[str, np.ndarray] = {}

        def shards(table: Table, train_rows: np.ndarray) -> dict[str, np.ndarray]:
            parts = shard(train_rows, table.y, len(runs), self.settings.partition, alpha=self.settings.alpha,
                          seed=split_seed(session))
            split.update(zip((run.name for run in runs), parts, strict=True))
            return {f"{self.prefix}/shards/peers/{run.name}.csv": split[run.name] for run in runs}

        table, urls = self.store_split(shards)
        train_rows, val_rows = self.split_rows
        classified = table.classes is not None
        normalization = fit_normalization(table.x[train_rows], table.y[train_rows] if not classified else None)
        hp = runs[0].hyperparameters
        config = ModelConfig(len(table.features), table.output_size, tuple(hp["hidden"]), hp.get("dropout", 0.0),
                             table.task)
        # Every peer starts from the same weights, as FedAvg requires.
        initial = self.storage.put_bytes(f"{self.prefix}/rounds/initial.safetensors",
                                         state_to_bytes(SimpleDNN(config, seed=session.seed).state_dict()))
        session.plan = Plan(
            shards={run.name: urls[f"{self.prefix}/shards/peers/{run.name}.csv"] for run in runs},
            shard_rows={name: len(rows) for name, rows in split.items()},
            validation_url=urls[f"{self.prefix}/shards/validation.csv"], validation_rows=len(val_rows),
            normalization=normalization.to_dict(), classes=table.classes, model=config.to_dict(), initial_url=initial,
            global_url=initial)
        sessions.record_plan(session.id, session.plan)

    def reshard(self, names: list[str]) -> None:
        """Split the training rows again, one shard per peer of `names` (peers joined the session): the held-out
        rows stay what they were, and each peer's next task trains on its new shard. Keyed by how many runs the
        session has, so that a step run twice writes the same shards."""
        session = self.session
        generation = len(session.peers)
        folder = f"{self.prefix}/shards/n{generation}/peers"
        split: dict[str, np.ndarray] = {}

        def shards(table: Table, train_rows: np.ndarray) -> dict[str, np.ndarray]:
            parts = shard(train_rows, table.y, len(names), self.settings.partition, alpha=self.settings.alpha,
                          seed=split_seed(session) + generation)
            split.update(zip(names, parts, strict=True))
            return {f"{folder}/{name}.csv": split[name] for name in names}

        _, urls = self.store_split(shards)
        plan = session.plan
        plan.shards = {**plan.shards, **{name: urls[f"{folder}/{name}.csv"] for name in names}}
        plan.shard_rows = {**plan.shard_rows, **{name: len(rows) for name, rows in split.items()}}
        sessions.set_plan(session.id, {"shards": plan.shards, "shard_rows": plan.shard_rows})
        log.info("session %s: training rows split again for %d peers", session.id, len(names))

    def spec(self, peer: str, round_: int, task_id: str, initial_url: str, key: str,
             last_round: bool, version: int | None = None) -> dict[str, Any]:
        """A peer's `train` argument for task `task_id`: `local_epochs` on its shard from the weights at
        `initial_url` (those after `version` rounds or folds; default `round_`), its weights to `key` (the only
        object it may write, capped at the model's size)."""
        session, plan = self.session, self.session.plan
        return {
            "session": str(session.id),
            "round": round_,
            "target": session.target,
            "features": list(session.features),
            "task": session.task,
            "classes": plan.classes,
            "normalization": dict(plan.normalization),
            "seed": session.seed + round_,
            "hyperparameters": {**session.peer(peer).hyperparameters, "epochs": self.settings.local_epochs},
            "keep_data": True,
            "last_round": last_round,
            "attempt": session.resumes or 0,
            "proximal_mu": (self.settings.mu or 0.0) if self.settings.algorithm == "fedprox" else 0.0,
            **self.gate.grants(task_id, plan.shards[peer], key, self.config, initial_url=initial_url,
                               initial=self.small(initial_url)),
            **self.correction_grant(peer, round_ if version is None else version, task_id, key),
        }

    def small(self, url: str) -> bytes | None:
        """The weights at `url` as stored, when a model of the session's shape is small enough for them to travel
        in a task (read once per process: a version never changes once written); else None."""
        if not self.inline_fits():
            return None
        return self.services.blobs.get(url, lambda: self.storage.get_bytes(url, max_state_bytes(self.config)))

    def inline_fits(self) -> bool:
        """Whether a model-shaped state travels in the task: small enough, and the round's copies of it too."""
        limit = max_state_bytes(self.config)
        return limit <= INLINE_BYTES and limit * len(self.session.peers) <= ROUND_INLINE_BYTES

    def put_state(self, key: str, state: dict[str, torch.Tensor], metadata: dict[str, Any]) -> str:
        """Store global weights the peers start from; kept here too, to send them inline."""
        data = state_to_bytes(state, metadata)
        url = self.storage.put_bytes(key, data)
        if len(data) <= INLINE_BYTES:
            self.services.blobs.put(url, data)
        return url

    # --- SCAFFOLD: the server's control variate c and each peer's c_i, kept in storage round by round -------

    def _read(self, url: str) -> dict[str, torch.Tensor]:
        """A model-shaped state the coordinator wrote (read each time: there is one per peer and round)."""
        return state_from_bytes(self.storage.get_bytes(url, max_state_bytes(self.config)), self.config)

    def _control_url(self, number: int, peer: str | None) -> str:
        """Where c (`peer` None) or peer `peer`'s c_i after round (asynchronous: fold) `number` is kept."""
        name = "server" if peer is None else f"controls/{peer}"
        return self.storage.url(f"{self.prefix}/rounds/{number}/{name}.safetensors")

    def controls(self, peer: str, version: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
        """c and `peer`'s c_i as they stood when `version` rounds (folds) were done: each read from the last round
        before it that changed it (None: the peer has none yet), so the same task always gets the same."""
        server = control = None
        for done in reversed(self.session.rounds):
            if done.round >= version or not done.peers:
                continue  # after it, or a round no update was used in: nothing changed then
            if server is None:  # the same for every peer of a round: read once per process, as global weights are
                server = self.global_state(self._control_url(done.round, None))
            if peer in done.peers:
                control = self._read(self._control_url(done.round, peer))
                break
        if server is None:
            server = scaffold.zeros(self.global_state(self.session.plan.initial_url))
        return server, control

    def correction_grant(self, peer: str, version: int, task_id: str, key: str) -> dict[str, Any]:
        """SCAFFOLD: write the task's correction c − c_i (`correction_key`), and grant reading it."""
        if self.settings.algorithm != "scaffold":
            return {}
        if version > len(self.session.rounds):  # rounds recorded since this session was loaded
            self.session.reload()
        data = state_to_bytes(scaffold.correction(*self.controls(peer, version)), {"task": task_id})
        url = self.storage.put_bytes(correction_key(key), data)  # scaffold_step reads it back
        return {"correction": transfer.inline(data) if self.inline_fits()
                else self.storage.grant_read(url, self.gate.grant_seconds, task=task_id)}

    def scaffold_step(self, number: int, used: list[Trained]) -> str:
        """After round (fold) `number`: each used peer's c_i+ from the weights it was sent, its weights as screening
        bounded them and the correction its task applied, then c; where c is kept.

        Only used updates change control variates. A refused one changes none, not even its own peer's: every
        correction c − c_i must cancel out across the peers, weighted as c is, or the corrections themselves would
        push the global model one way every round (measured: a peer refused four times, its own control moved
        meanwhile, and the held-out accuracy fell 14 points over the last six rounds of the generated job)."""
        settings_, session, plan = self.settings, self.session, self.session.plan
        server = self.controls("", number + 1)[0]
        deltas, rows = [], []
        for peer, sent, weights, key in used:
            hp = session.peer(peer).hyperparameters
            steps = scaffold.local_steps(plan.shard_rows[peer], hp["batch_size"], settings_.local_epochs)
            after = scaffold.control_after(sent, weights, self._read(self.storage.url(correction_key(key))), steps,
                                           hp["learning_rate"])
            deltas.append(scaffold.delta(after, self.controls(peer, number + 1)[1]))
            rows.append(gate.samples(plan, peer))
            self.storage.put_bytes(f"{self.prefix}/rounds/{number}/controls/{peer}.safetensors",
                                   state_to_bytes(after, {"round": number}))
        # The peers' moves of c combined by the session's rule (each by its rows, as FedAvg counts the weights; the
        # median and trimmed mean by none): no peer drags c further than its screened update moved the model.
        if deltas:
            total = sum(gate.samples(plan, run.name) for run in session.peers)
            server = scaffold.server_after(server, combine(settings_.aggregation, deltas, rows), sum(rows) / total)
        return self.storage.put_bytes(f"{self.prefix}/rounds/{number}/server.safetensors",
                                      state_to_bytes(server, {"round": number}))

    def server_step(self, number: int, current: dict[str, torch.Tensor],
                    merged: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str | None]:
        """The global weights after round (asynchronous: fold) `number`, from its screened aggregate `merged`, and
        where the server optimizer's state after it is kept: FedAvg and FedProx take the aggregate as it is;
        FedAvgM, FedAdam and FedYogi step from `current` with its move as the pseudo-gradient (trainer/serveropt.py),
        their state read from and written to storage, so a coordinator that restarts goes on with it."""
        settings_, plan = self.settings, self.session.plan
        if settings_.algorithm not in serveropt.SERVER:
            return merged, None
        optimizer = serveropt.ServerOptimizer(settings_.algorithm, lr=settings_.server_lr)
        before = (serveropt.state_from_bytes(self.storage.get_bytes(plan.server_url, SERVER_STATE_BYTES), current)
                  if plan.server_url else None)
        stepped, after = optimizer.step(current, merged, before)
        # One file per round: a redelivered round reads the same state and writes the same file.
        url = self.storage.put_bytes(f"{self.prefix}/rounds/{number}/server.safetensors",
                                     serveropt.state_to_bytes(after, optimizer))
        return stepped, url

    def epochs(self, run: Any) -> int:
        return self.settings.local_epochs

    @functools.cached_property
    def model(self) -> SimpleDNN:
        """The one model this strategy loads weights into to evaluate them (built, and initialised, once)."""
        return SimpleDNN(self.config).eval()  # it is never trained here

    def loaded(self, state: dict[str, torch.Tensor]) -> SimpleDNN:
        self.model.load_state_dict(state)
        return self.model

    def held_out_loss(self) -> Any:
        """A function: weights -> their loss on the held-out rows."""
        x, y = self.held_out_arrays()
        return lambda state: evaluate(self.loaded(state), x, y)["loss"]

    def screen(self, base: dict[str, torch.Tensor], states: dict[str, dict[str, torch.Tensor]],
               senders: dict[str, str] | None = None) -> screening.Screened:
        """Bound and judge updates of the current global weights `base` before they count (trainer/screening.py),
        on the held-out rows, against what the session's recently accepted updates did."""
        past, done = self.session.history or History(), self.session.rounds
        # `base` is the last round's (fold's) result, whose held-out loss that round measured.
        known = done[-1].metrics.get("val_loss") if done else None
        return screening.screen(base, states, self.held_out_loss(), recent_norms=past.norms, recent_gains=past.gains,
                                senders=senders, base_loss=known)

    def history_after(self, found: screening.Screened) -> History:
        """The screening history with `found`'s accepted updates added (the most recent HISTORY kept)."""
        past = self.session.history or History()
        return History(norms=[*past.norms, *(found.norms[n] for n in found.states)][-HISTORY:],
                       gains=[*past.gains, *(found.gains[n] for n in found.states)][-HISTORY:])

    def count_used(self, used: list[str]) -> None:
        """Peers `used` (one name per update) had an update used: their records and runs say so."""
        sessions.count_updates(self.session.id, sessions.positions(self.session), used, [])
        peers.count_accepted(used)

    def count_refused(self, peer: str, update: str, why: str, screened: bool) -> None:
        """An update of `peer` was refused (`screened`: by the screening, not because it could not be read)."""
        log.warning("session %s: update %s of peer %s rejected: %s", self.session.id, update, peer, why)
        sessions.count_updates(self.session.id, sessions.positions(self.session), [], [peer])
        peers.count(peer, why, rejected=1, outliers=int(screened))

    def global_state(self, url: str) -> dict[str, torch.Tensor]:
        """Global weights the coordinator wrote (each version is read once per process: it never changes)."""
        config = self.config
        return self.services.states.get(
            (url, json.dumps(config.to_dict(), sort_keys=True)),
            lambda: state_from_bytes(self.storage.get_bytes(url, max_state_bytes(config)), config))

    def keep_model(self, number: int, model: SimpleDNN, weights_url: str, metrics: list[dict[str, Any]]) -> str:
        """Store the global model of round (asynchronous: fold) `number` (its weights at `weights_url`), with the
        `metrics` of every round up to it, as a file a user can download (`GET /sessions/<id>/model?round=N`)
        whatever becomes of the session; its URL."""
        session = self.session
        checkpoint = Checkpoint(
            config=self.config, features=list(session.features), target=session.target, classes=session.plan.classes,
            normalization=Normalization.from_dict(session.plan.normalization),
            metadata={"session": str(session.id), "mode": sessions.FEDERATED, "round": number,
                      "rounds": metrics,
                      "aggregation": self.settings.aggregation, "schedule": self.settings.schedule,
                      "algorithm": self.settings.algorithm,
                      "global_weights_url": weights_url},
        )
        return self.storage.put_bytes(f"{self.prefix}/rounds/{number}/model.safetensors",
                                      checkpoint_bytes(model, checkpoint))

    def store_model(self, metrics: dict[str, Any], extra: dict[str, Any] | None = None) -> None:
        """End the session COMPLETED with its last round's global model as its result (`extra`: more results)."""
        session = self.session
        session.reload()
        last = session.rounds[-1]
        model_url = last.model_url
        if not model_url:  # a round recorded before each round kept its model
            model = self.loaded(self.global_state(session.plan.global_url))
            model_url = self.keep_model(last.round, model, session.plan.global_url, [r.metrics for r in session.rounds])
        sessions.record_runs(session.id, sessions.positions(session),
                             {run.name: {"status": sessions.COMPLETED} for run in session.peers
                              if run.status == sessions.RUNNING})
        results = {"metric": self.metric, "best_value": metrics.get(self.metric), "final": metrics,
                   "rounds": len(session.rounds), "aggregation": self.settings.aggregation,
                   "algorithm": self.settings.algorithm,
                   "bytes_fetched": sum(run.bytes_fetched or 0 for run in session.peers),
                   "rejected": {f"round {r.round}": r.rejected for r in session.rounds if r.rejected}, **(extra or {})}
        self.end(sessions.COMPLETED, results=results, model_url=model_url)


def correction_key(weights_key: str) -> str:
    """Where the coordinator writes the SCAFFOLD correction of the task whose weights go to `weights_key`: beside
    the peers' uploads, not among them (no peer's name or key can reach the coordinator's objects)."""
    folder, _, name = weights_key.rpartition("/peers/")
    return f"{folder}/corrections/{name}"


def weights_key(prefix: str, round_: int, peer: str) -> str:
    """Where peer `peer` uploads its weights of round `round_`."""
    return f"{prefix}/rounds/{round_}/peers/{peer}.safetensors"


class SyncFederated(Federated, RoundStrategy):
    """Synchronous rounds: a chord of `train` tasks, one per peer in play, joined into one aggregate."""

    @property
    def rounds(self) -> int:
        return self.settings.rounds

    def specs(self, round_: int, ids: dict[str, str]) -> dict[str, dict[str, Any]]:
        last = round_ + 1 == self.rounds
        return {name: self.spec(name, round_, task_id, self.session.plan.global_url,
                                weights_key(self.prefix, round_, name), last) for name, task_id in ids.items()}

    def aggregate(self, round_: int, kept: list[Outcome]) -> None:
        """Check and combine the peers' weights, record the round, send the next one, then evaluate the round's
        global model on the held-out rows while the peers train (or finish).

        Run again for a round recorded already (a redelivered `aggregate`), it only does what is still to do:
        send the next round, measure this one, finish."""
        session, plan = self.session, self.session.plan
        if any(r.round == round_ for r in session.rounds):
            self.next_round(round_)
            return
        self.record_results(kept, sessions.RUNNING, samples={o.peer: gate.samples(plan, o.peer) for o in kept})
        states, samples, rejected = {}, {}, {}
        config = self.config
        # Reading S3 waits on the network: a few reads at once (a local file is read faster in this thread
        # than handed to another).
        workers = 1 if isinstance(self.storage, LocalStorage) else READERS

        def read(outcome: Outcome) -> dict[str, torch.Tensor] | str:
            if outcome.result["stopped"]:
                return "it stopped before finishing the round"
            return self.gate.weights(weights_key(self.prefix, round_, outcome.peer), config)

        with ThreadPoolExecutor(max_workers=workers) as readers:
            for outcome, found in zip(kept, readers.map(read, kept), strict=True):
                if isinstance(found, str):
                    rejected[outcome.peer] = found
                else:
                    states[outcome.peer], samples[outcome.peer] = found, gate.samples(plan, outcome.peer)
        # Each update bounded and judged on the held-out rows before it counts, whatever the rule.
        screened = self.screen(self.global_state(plan.global_url), states)
        rejected.update(screened.rejected)
        # Peers that trained count towards the quorum (RoundStrategy.on_result); an update refused here only
        # does not count: a hostile peer cannot fail a session by sending garbage. With none usable, the
        # global weights stay as they were for the next round.
        names = sorted(screened.states)
        # Each counts by its rows, and by how far it goes the others' way (random weights hardly count); then the
        # session's algorithm takes the aggregate as it is, or as a server optimizer's pseudo-gradient.
        current = self.global_state(plan.global_url)
        merged, server_url = current, plan.server_url
        if names:
            merged, server_url = self.server_step(round_, current, combine(
                self.settings.aggregation, [screened.states[n] for n in names],
                [samples[n] * screened.trust.get(n, 1.0) for n in names]))
        if names and self.settings.algorithm == "scaffold":
            server_url = self.scaffold_step(
                round_, [(n, current, screened.states[n], weights_key(self.prefix, round_, n)) for n in names])
        global_url = self.put_state(self._global_key(round_), merged, {"round": round_})
        # Its held-out measures come once the next round is out (`measure`); the rows it used, now.
        round_doc = Round(round=round_, metrics={"samples": sum(samples[n] for n in names)}, peers=names,
                          rejected=rejected,
                          outliers={**outliers(merged, {n: screened.states[n] for n in names}), **screened.outliers},
                          finished_at=self.clock.now())
        if not sessions.record_round(session.id, round_doc, global_url, self.history_after(screened), server_url):
            return  # it ended meanwhile, or another run of this round recorded it first
        self.count_used(names)
        for peer, why in rejected.items():
            self.count_refused(peer, peer, why, screened=peer in screened.rejected)
        # What the update wrote, kept in step here rather than read again (a session document holds every peer).
        session.rounds.append(round_doc)
        plan.global_url, plan.server_url = global_url, server_url
        self.next_round(round_, merged)

    def on_joined(self, names: list[str]) -> None:
        """Elastic: peers that came online train from the next round on (`before_round` gives them shards)."""
        launch = self.session.launch
        if not self.session.elastic or (launch is not None and launch.round + 1 >= self.rounds):
            super().on_joined(names)  # not elastic, or its last round is out: nothing left to join
            return
        if admitted := self.admit(names):
            enrolment.declare_queues(self.app, admitted)

    def before_round(self, names: list[str]) -> None:
        """A round with peers that have no shard yet (they joined): the training rows are split again among all."""
        if any(name not in self.session.plan.shards for name in names):
            self.reshard(names)

    def _global_key(self, round_: int) -> str:
        return f"{self.prefix}/rounds/{round_}/global.safetensors"

    def next_round(self, round_: int, merged: dict[str, torch.Tensor] | None = None) -> None:
        """After `round_` is recorded: send the next round (once), then measure this one; or measure and finish."""
        if round_ + 1 < self.rounds:
            self.launch_round(round_ + 1)
            self.measure(round_, merged)
        else:
            self.finish()

    def measure(self, round_: int, merged: dict[str, torch.Tensor] | None = None) -> None:
        """Evaluate recorded round `round_`'s global model (`merged`, or as stored) on the held-out rows, keep it as
        a file, and record and announce both, once. Off the rounds' critical path: the next round's tasks are out
        by then, and nothing they need waits on it."""
        session = self.session
        done = next((r for r in session.rounds if r.round == round_), None)
        if done is None or done.model_url:
            return
        global_url = self.storage.url(self._global_key(round_))
        model = self.loaded(merged if merged is not None else self.global_state(global_url))
        metrics = {**self.evaluate_held_out(model), **done.metrics}
        model_url = self.keep_model(round_, model, global_url,
                                    [*(r.metrics for r in session.rounds if r.round < round_), metrics])
        if not sessions.measured_round(session.id, round_, metrics, model_url):
            return  # another run of this round measured it, or the session ended
        done.metrics, done.model_url = metrics, model_url
        events.record_round(session.id, done)
        log.info("session %s: round %d/%d, %s %.4f on the held-out rows, %d peer(s) used", session.id, round_ + 1,
                 self.rounds, self.metric, metrics[self.metric], len(done.peers))

    def finish(self) -> None:
        last = self.session.rounds[-1]
        self.measure(last.round)
        self.store_model(last.metrics)


def _listing(rejected: dict[str, str]) -> str:
    return "; ".join(f"{peer}: {why}" for peer, why in rejected.items()) or "none"
