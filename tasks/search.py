"""Sweeps that search: trials sampled from a space, handed to free peers, losing ones stopped early.

The coordinator owns the loop (Optuna's ask-and-tell): when a peer is free it asks the sampler (TPE or
random) for a trial and sends it the trial's first stretch of epochs. A trial trains a stretch at a time,
up to the next rung (trainer/search.py), pausing there with its training state uploaded; the coordinator
scores the weights on the held-out rows (split with its own seed, never in any grant, as a sweep's), tells
the pruner (successive halving or median), and either stops the trial (PRUNED) and gives the peer the
next one, or sends it the next stretch, which goes on from the state it left, on the same peer. What
decides is the coordinator's own score: a peer that lies about its curve spoils only its own trial, and
its curve is drawn, never ranked.

The study lives in MongoDB with the session: the trials (models/trial.py) are the record, and each
decision rebuilds Optuna's in-memory study from them (with the pruner's notes on each trial), so any
coordinator process can take any step, and a resumed session goes on from the trials it had. Every step is
a conditional update on the task it answers: a result delivered twice is decided once, a trial number is
taken once (models/session.py `take_trial`), a task recorded and not sent is sent by the next step.
"""

from __future__ import annotations

import logging
import math
import warnings
from datetime import timedelta
from typing import Any

from models import assignment as assignments
from models import event as events
from models import heartbeat as heartbeats
from models import peer as peers
from models import session as sessions
from models import trial as trials
from models.session import Launch
from tasks import enrolment, gate, lifecycle, protocol, relay
from tasks.gate import Outcome
from tasks.sweep import HOLDOUT, Sweep
from trainer import search as space_
from trainer.model import SimpleDNN

log = logging.getLogger(__name__)

# A peer on which this many trials failed is given no more (its trials' settings were not to blame).
FAILURES = 2


def trial_key(prefix: str, number: int, name: str) -> str:
    """Where trial `number`'s objects live: its peer's uploads (weights, training state) and its best model."""
    return f"{prefix}/trials/{number}/{name}.safetensors"


class Search(Sweep):
    """A sweep that searches a space: trials on free peers, scored at rungs, the losers pruned."""

    unit = "task"

    @property
    def state(self) -> Any:
        return self.session.search

    @property
    def space(self) -> dict[str, dict[str, Any]]:
        return self.state.space

    @property
    def first_rung(self) -> int:
        return space_.min_resource(self.space)

    def deadline_seconds(self) -> int:
        limit = self.services.settings.train_time_limit + 60
        if self.state.time_budget:
            return self.state.time_budget + limit
        # Every trial's stretches one after another on the fewest peers that may remain.
        stretches = len(space_.rungs(space_.max_epochs(self.space), self.first_rung))
        return math.ceil(self.state.trials / max(1, len(self.session.peers))) * stretches * limit

    # --- the sampler and the pruner (Optuna), rebuilt from the trials ---------------------------------

    def _distributions(self) -> dict[str, Any]:
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        found = {}
        for name, dimension in self.space.items():
            if "choices" in dimension:
                found[name] = CategoricalDistribution([space_.encode(name, v) for v in dimension["choices"]])
            elif "low" in dimension:
                kind = IntDistribution if dimension["int"] else FloatDistribution
                found[name] = kind(dimension["low"], dimension["high"], log=dimension["log"])
        return found

    def _study(self, number: int, docs: list[dict[str, Any]]) -> tuple[Any, dict[int, int]]:
        """Optuna's study as the trials `docs` make it (sampler seeded for trial `number`); trial number ->
        its index in the study."""
        import optuna
        from optuna.trial import TrialState, create_trial

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        state = self.state
        seed = (self.session.seed * 7919 + number) % 2**32
        if state.sampler == "random":
            sampler = optuna.samplers.RandomSampler(seed=seed)
        else:
            with warnings.catch_warnings():  # constant_liar is "experimental": it is what parallel peers need
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                sampler = optuna.samplers.TPESampler(
                    seed=seed, constant_liar=True,
                    n_startup_trials=max(len(self.session.peers), min(10, state.trials // 3)))
        if state.pruner == "asha":
            pruner = optuna.pruners.SuccessiveHalvingPruner(min_resource=self.first_rung,
                                                            reduction_factor=space_.REDUCTION)
        elif state.pruner == "median":
            pruner = optuna.pruners.MedianPruner(n_startup_trials=len(self.session.peers))
        else:
            pruner = optuna.pruners.NopPruner()
        study = optuna.create_study(direction="maximize", sampler=sampler, pruner=pruner)
        distributions = self._distributions()
        kinds = {trials.COMPLETED: TrialState.COMPLETE, trials.PRUNED: TrialState.PRUNED,
                 trials.FAILED: TrialState.FAIL}
        index = {}
        for doc in docs:
            kind = kinds.get(doc["status"], TrialState.RUNNING)
            value = doc.get("value") if kind == TrialState.COMPLETE else None
            if kind == TrialState.COMPLETE and value is None:
                kind = TrialState.FAIL
            study.add_trial(create_trial(
                state=kind, value=value,
                params={k: space_.encode(k, v) for k, v in doc["params"].items() if k in distributions},
                distributions={k: distributions[k] for k in doc["params"] if k in distributions},
                intermediate_values={s["epoch"]: s["value"] for s in doc.get("scores", [])},
                system_attrs=dict(doc.get("system_attrs") or {})))
            index[doc["number"]] = len(index)
        return study, index

    def _sample(self, number: int) -> dict[str, Any]:
        study, _ = self._study(number, trials.of_session(self.session.id))
        asked = study.ask(self._distributions())
        return {name: space_.decode(name, value) for name, value in asked.params.items()}

    def _pruned(self, trial: dict[str, Any]) -> tuple[bool, dict[str, Any]]:
        """Whether the pruner stops `trial` now (its scores so far), and its notes on the trial after deciding."""
        docs = [trial if doc["number"] == trial["number"] else doc for doc in trials.of_session(self.session.id)]
        study, index = self._study(trial["number"], docs)
        frozen = study.trials[index[trial["number"]]]
        pruned = study.pruner.prune(study, frozen)
        return bool(pruned), dict(study.trials[index[trial["number"]]].system_attrs)

    # --- starting -------------------------------------------------------------------------------------

    def start(self) -> None:
        """Hold the validation rows out and store the training rows (as a sweep does), then give every peer a
        trial; resumed, every trial that was open goes on from the last rung it reached."""
        session = self.session
        if session.status == sessions.PENDING:
            self.prepare()
            now = self.clock.now()
            launch = Launch(round=0, peers=[run.name for run in session.peers], started_at=now, sent=False)
            budget = self.state.time_budget
            sets = {} if session.resumes or not budget else {"search.stop_at": now + timedelta(seconds=budget)}
            sessions.start_running(session.id, {}, launch, self.deadline_seconds(), sessions.positions(session), now,
                                   sets=sets)
            session.reload()
        if session.status != sessions.RUNNING or session.launch.sent:
            return
        enrolment.declare_queues(self.app, [run.name for run in session.in_play()])
        now = self.clock.now()
        for doc in trials.of_session(session.id):
            if doc["status"] not in trials.OPEN:
                continue
            if session.peer(doc["peer"]).status == sessions.FAILED:
                trials.end(session.id, doc["number"], trials.FAILED, now, "its peer was given up on")
            elif session.resumes:
                self._again(doc)
        if not session.resumes:
            self.resend()  # what a start that died half-way recorded and did not send
        for run in session.in_play():
            self.keep_busy(run.name)
        sessions.launched(session.id, 0)
        self.finish_if_done()

    def _again(self, trial: dict[str, Any]) -> None:
        """Resumed: trial `trial`'s task was lost with the interruption (its assignment closed then). Its stretch
        again, from the state its peer left at its last rung; decided first if it was scored and not decided."""
        if trial["status"] == trials.RUNNING and trial["epochs_done"] == trial["until"]:
            self._decide(trial)
            return
        seq, task_id = self._task()
        if trials.next_task(self.session.id, trial["number"], trial["seq"], seq, task_id,
                            self._until(trial["epochs"], trial["epochs_done"]), trial.get("system_attrs") or {}):
            self._send(trials.of_task(self.session.id, seq))

    # --- sending --------------------------------------------------------------------------------------

    def spec(self, trial: dict[str, Any]) -> dict[str, Any]:
        """Trial `trial`'s current task: the training rows, its settings, a stretch up to `until`, its grants."""
        session, plan, number = self.session, self.session.plan, trial["number"]
        config = self.model_config(trial["hyperparameters"])
        task_id = trial["task_id"]
        return {
            "session": str(session.id), "round": trial["seq"], "target": session.target,
            "features": list(session.features), "task": session.task, "classes": plan.classes,
            "normalization": dict(plan.normalization), "holdout": HOLDOUT,
            "seed": (session.seed + number) % 2**32, "attempt": session.resumes or 0,
            "hyperparameters": dict(trial["hyperparameters"]), "until": trial["until"],
            # One object for every trial: a peer parses it once and keeps it for its next stretches and trials.
            "keep_data": True,
            **self.gate.grants(task_id, plan.shards[trial["peer"]], trial_key(self.prefix, number, "weights"),
                               config),
            **self.gate.checkpoint_grants(task_id, trial_key(self.prefix, number, "training"), config,
                                          trial["epochs"], trial["until"], resume=trial["epochs_done"] > 0),
        }

    def _send(self, trial: dict[str, Any]) -> None:
        session = self.session
        now = self.clock.now()
        self.record_assignments([(trial["task_id"], trial["peer"], trial["seq"], trial["until"], None)], now,
                                of=trial["epochs"])
        # Named on the peer's run before it is sent: heartbeats and results name the task it was given.
        sessions.record_runs(session.id, sessions.positions(session), {trial["peer"]: {
            "status": sessions.RUNNING, "task_id": trial["task_id"], "round": trial["seq"],
            "hyperparameters": dict(trial["hyperparameters"]), "epochs": trial["epochs"],
            "epoch": trial["epochs_done"]}}, before={trial["peer"]: session.peer(trial["peer"]).status},
            active_only=True)  # a session that ended meanwhile keeps the statuses its end gave its peers
        relay.train(self.app, trial["peer"], trial["task_id"], self.spec(trial), self.gate.grant_seconds,
                    f"session {session.id}, trial {trial['number']} (epochs {trial['epochs_done'] + 1}-"
                    f"{trial['until']}), peer {trial['peer']}").apply_async()
        trials.mark_sent(session.id, trial["seq"])
        self._announce(trials.of_task(session.id, trial["seq"]))

    def resend(self) -> None:
        """Send the tasks recorded but not known to be sent (their sender died in between)."""
        for trial in trials.unsent(self.session.id):
            self._send(trial)

    def _task(self) -> tuple[int, str]:
        seq = sessions.take_task_number(self.session.id)
        return seq, str(protocol.TaskId.new(self.session.id, seq))

    def _until(self, epochs: int, done: int) -> int:
        """The epoch the next stretch of a trial of `epochs` epochs, `done` of them trained, pauses after."""
        return next(r for r in space_.rungs(epochs, self.first_rung, self.state.pruner != "none") if r > done)

    def keep_busy(self, peer: str) -> bool:
        """Give `peer` a new trial if it has none open, while the budget lasts; True if it has work."""
        session = self.session
        if trials.open_of(session.id, peer) is not None:
            return True
        if session.peer(peer).status == sessions.FAILED:
            return False
        number = sessions.take_trial(session.id, self.clock.now())
        if number is None:
            self._idle(peer)
            return False
        params = self._sample(number)
        hp = space_.hyperparameters(self.space, params)
        seq, task_id = self._task()
        if trials.create(session.id, number, peer, params, hp, hp["epochs"], self._until(hp["epochs"], 0), seq,
                         task_id):
            log.info("session %s: trial %d on peer %s: %s", session.id, number, peer, params)
            self._send(trials.of_task(session.id, seq))
        return True

    def on_joined(self, names: list[str]) -> None:
        """Peers that came online: each trains on the training rows every peer has, and gets the next trial."""
        if not self.session.elastic:
            super().on_joined(names)
            return
        plan = self.session.plan
        url, rows = next(iter(plan.shards.values())), next(iter(plan.shard_rows.values()))
        entries = {f"{field}.{name}": value for name in names
                   for field, value in (("shards", url), ("shard_rows", rows))}
        admitted = self.admit(names, entries)
        if admitted:
            enrolment.declare_queues(self.app, admitted)
        for name in admitted:
            self.keep_busy(name)
        self.finish_if_done()

    def _idle(self, peer: str) -> None:
        """`peer` has no trial left to run in this session: it is done, and free for other sessions."""
        run = self.session.peer(peer)
        if run.status in sessions.ACTIVE:
            sessions.record_runs(self.session.id, sessions.positions(self.session),
                                 {peer: {"status": sessions.COMPLETED}}, before={peer: run.status})
            peers.release(self.session.id, [peer])

    # --- a task came back -----------------------------------------------------------------------------

    def on_result(self, round_: int, outcomes: list[Outcome]) -> None:
        """Score a trial's stretch, then prune it, end it or send its next stretch; its peer gets work."""
        session = self.session
        for outcome in outcomes:
            if outcome.left_out or session.finished:
                continue  # on_lost deals with it
            # None once the trial moved on to its next task (this is a run again of a step that did that).
            trial = trials.of_task(session.id, round_)
            if trial is not None and (trial["task_id"] != outcome.task or trial["peer"] != outcome.peer):
                log.warning("session %s: task %s is not peer %s's; result dropped", session.id, outcome.task,
                            outcome.peer)
                continue
            if trial is not None and trial["status"] == trials.RUNNING and trial["epochs_done"] < trial["until"]:
                trial = self._score(trial, outcome)
            if trial is not None and trial["status"] == trials.RUNNING and trial["seq"] == round_ \
                    and trial["epochs_done"] == trial["until"]:
                # Scored (by this run, or one that died before deciding): prune, end or go on, once.
                self._decide(trial)
            self.resend()
            self.keep_busy(outcome.peer)
        self.finish_if_done()

    def _score(self, trial: dict[str, Any], outcome: Outcome) -> dict[str, Any] | None:
        """Score a stretch's model on the held-out rows and record it; the trial after (None: nothing to decide)."""
        session, result, number = self.session, outcome.result, trial["number"]
        if result["stopped"]:
            return None  # the session ended, or the peer was given up on: nothing to score
        config = self.model_config(trial["hyperparameters"])
        state = self.gate.weights(trial_key(self.prefix, number, "weights"), config)
        if isinstance(state, str):
            self._fail(trial, f"its model was rejected: {state}", rejected=True)
            return None
        model = SimpleDNN(config)
        model.load_state_dict(state)
        measured = self.evaluate_held_out(model)
        epoch = trial["until"]
        # Which task it scores, and when: a search's progress against the peer-time it took (bench/search.py).
        score = {"epoch": epoch, "value": measured[self.metric], "val_loss": measured["val_loss"], "seq": trial["seq"],
                 "at": self.clock.now().isoformat()}
        best = None
        if trial.get("value") is None or score["value"] > trial["value"]:
            url = self.storage.put_bytes(trial_key(self.prefix, number, "model"), self.checkpoint_bytes(
                model, outcome.peer, trial["hyperparameters"], trial.get("curve", []),
                extra={"trial": number, "epoch": epoch}))
            best = {"value": score["value"], "val_loss": score["val_loss"], "best_epoch": epoch, "model_url": url}
        metric = self.metric  # the peer's own curve names its validation measure as the coordinator does
        curve = [{"epoch": e["epoch"], "loss": e.get("loss"), "val_loss": e.get("val_loss"), "metric": e.get(metric)}
                 for e in result["history"] if e["epoch"] > trial["epochs_done"]]
        updated = trials.scored(session.id, number, trial["seq"], epoch, score, curve, result["seconds"], best)
        if updated is None:
            return trials.of_task(session.id, trial["seq"])  # recorded by an earlier run of this step
        # The epochs, in the log: the stream shows them even if the peer's heartbeats were lost.
        heartbeats.insert_many({"session_id": session.id, "peer": outcome.peer, "round": trial["seq"], **e}
                               for e in result["history"] if e["epoch"] > trial["epochs_done"])
        sessions.record_runs(session.id, sessions.positions(session), {outcome.peer: {
            "final": result["final"], "samples": gate.samples(session.plan, outcome.peer), "epoch": epoch,
            **{k: result["final"].get(k) for k in protocol.PROGRESS if k in result["final"]}}})
        self._announce(updated)
        return updated

    def _decide(self, trial: dict[str, Any]) -> None:
        """After a stretch was scored: the trial completes, is pruned, or its next stretch is sent."""
        session, epoch = self.session, trial["epochs_done"]
        if epoch >= trial["epochs"]:
            self._end(trial, trials.COMPLETED, None)
            return
        pruned, notes = self._pruned(trial)
        if pruned:
            self._end(trial, trials.PRUNED, f"pruned at epoch {epoch}: {self.metric} {trial['scores'][-1]['value']:.4g}"
                                            " is not among the best at this rung", notes)
            return
        stop_at = self.state.stop_at
        if stop_at is not None and self.clock.now() >= stop_at:
            self._end(trial, trials.PRUNED, f"stopped at epoch {epoch}: the time budget ran out", notes)
            return
        seq, task_id = self._task()
        if trials.next_task(session.id, trial["number"], trial["seq"], seq, task_id,
                            self._until(trial["epochs"], epoch), notes):
            self._send(trials.of_task(session.id, seq))

    def _end(self, trial: dict[str, Any], status: str, reason: str | None,
             notes: dict[str, Any] | None = None) -> None:
        session = self.session
        if trials.end(session.id, trial["number"], status, self.clock.now(), reason, seq=trial["seq"],
                      system_attrs=notes):
            if status == trials.COMPLETED:
                peers.count(trial["peer"], accepted=1)
                sessions.count_updates(session.id, sessions.positions(session), [trial["peer"]], [])
            log.info("session %s: trial %d %s%s", session.id, trial["number"], status.lower(),
                     f" ({reason})" if reason else "")
            self._announce(trials.of_task(session.id, trial["seq"]))

    def _fail(self, trial: dict[str, Any], reason: str, rejected: bool = False) -> None:
        session = self.session
        if not trials.end(session.id, trial["number"], trials.FAILED, self.clock.now(), reason, seq=trial["seq"]):
            return
        self._announce(trials.of_task(session.id, trial["seq"]))
        log.warning("session %s: trial %d failed on peer %s: %s", session.id, trial["number"], trial["peer"], reason)
        if rejected:
            peers.count(trial["peer"], "its model was rejected", rejected=1)
            sessions.count_updates(session.id, sessions.positions(session), [], [trial["peer"]])
        if trials.failures_of(session.id, trial["peer"]) >= FAILURES:
            self.give_up(trial["peer"], f"{FAILURES} of its trials failed, the last: {reason}")

    def _announce(self, trial: dict[str, Any] | None) -> None:
        if trial is not None:
            events.append_new(self.session.id, [events.trial(trials.view(trial))])

    # --- a peer will not report -----------------------------------------------------------------------

    def on_lost(self, peer: str, reason: str) -> None:
        """`peer`'s task failed or ran past its deadline: its trial fails; the peer gets another, unless it is gone
        (the registry, which follows the broker, says it is not online) or its trials keep failing."""
        session = self.session
        if session.finished or peer not in {run.name for run in session.peers}:
            return
        trial = trials.open_of(session.id, peer)
        if trial is not None:
            assignment = assignments.get(trial["task_id"])
            if assignment is not None:
                self.leave_out(assignment, reason)  # a late result of it counts for nothing
            self._fail(trial, reason)
        record = peers.Peer.objects(name=peer).only("status", "session_id").first()
        if record is None or record.status != peers.TRAINING or record.session_id != session.id:
            self.give_up(peer, reason)
        elif session.peer(peer).status != sessions.FAILED:
            self.session.reload()
            self.keep_busy(peer)
        self.finish_if_done()

    def give_up(self, peer: str, reason: str) -> None:
        """Leave `peer` out of the rest of the search (its open trial fails); the others go on."""
        session = self.session
        if session.peer(peer).status == sessions.FAILED:
            return
        sessions.record_peer_result(session.id, peer, sessions.FAILED, error=reason)
        lifecycle.request_stop(self.app, str(session.id), [peer], reason, session.resumes or 0)
        session.peer(peer).status = sessions.FAILED
        if (trial := trials.open_of(session.id, peer)) is not None:
            trials.end(session.id, trial["number"], trials.FAILED, self.clock.now(), f"its peer {reason}")
            self._announce(trials.of_task(session.id, trial["seq"]))
        log.warning("session %s goes on without peer %s: %s", session.id, peer, reason)

    # --- the end --------------------------------------------------------------------------------------

    def finish_if_done(self) -> None:
        """End the session once no trial is open and none will be begun."""
        found = sessions.load(self.session.id)
        if found is None or found.status != sessions.RUNNING or trials.count_open(found.id):
            return
        self.session = found
        state, now = found.search, self.clock.now()
        spent = state.asked >= state.trials or (state.stop_at is not None and now >= state.stop_at)
        if spent or not found.in_play():
            self.finish()

    def finish(self) -> None:
        """The best trial's model is the session's; every trial's outcome is in the results."""
        session = self.session
        docs = trials.of_session(session.id)
        best = trials.best(session.id)
        if best is None:
            self.end(sessions.FAILED, "no trial returned a usable model" if docs else "no trial could be begun")
            return
        counts = {status.lower(): sum(1 for t in docs if t["status"] == status) for status in trials.STATUSES}
        per_peer: dict[str, dict[str, Any]] = {}
        for t in docs:
            entry = per_peer.setdefault(t["peer"], {"trials": 0, "seconds": 0.0, "best_value": None})
            entry["trials"] += 1
            entry["seconds"] += t.get("seconds") or 0.0
            if t.get("value") is not None and (entry["best_value"] is None or t["value"] > entry["best_value"]):
                entry["best_value"] = t["value"]
        summary = {
            "metric": self.metric, "tie_breaker": "val_loss",
            "best_trial": best["number"], "best_peer": best["peer"], "best_value": best["value"],
            "best_val_loss": best.get("val_loss"), "best_epoch": best.get("best_epoch"),
            "best_hyperparameters": dict(best["hyperparameters"]), "best_params": dict(best["params"]),
            "trials": {k: v for k, v in counts.items() if v},
            "peer_seconds": round(sum(t.get("seconds") or 0.0 for t in docs), 3),
            "peers": per_peer,
        }
        for run in session.in_play():
            self._idle(run.name)
        self.end(sessions.COMPLETED, results=summary, model_url=best["model_url"])

