"""Asynchronous federated sessions (`schedule=async`): no round waits for the slowest peer.

Every peer gets a `train` task at once, from the current global weights. When a peer reports,
its update is buffered; as soon as `buffer_size` (K) updates wait, their weights are read and checked
as a round checks them (the gate: the coordinator's own key, size-capped, shapes, finite values) and
folded into a new global version (trainer/staleness.py: each change weighted down by how many versions
old its starting weights are), which is evaluated on the held-out rows and recorded like a round. That
peer is handed its next task at once, from the newest global weights. The session ends when
`max_updates` tasks have been handed out and answered (or given up on), or `time_budget` seconds
after it started: then what is buffered is folded and the last global model is the session's result.

Every task has its session's next sequence number (`Update.seq`, also the task's `round`, so its
heartbeats are the peer's own per task). Each step is a conditional update, so every call here is
safe to make twice; folds take a lease on the session (`AsyncState.folding`), so however many
coordinator processes receive updates at once, one folds at a time, and whoever holds the lease
looks again after letting go, so an update that arrived meanwhile is never left waiting. A task is
recorded before it is sent and marked sent after: a run that died in between is completed by the
next one (`resend`).
"""

from __future__ import annotations

import logging
import math
from datetime import timedelta

import torch

from models import Round
from models import assignment as assignments
from models import event as events
from models import peer as peers
from models import session as sessions
from models import update as updates
from models.session import AsyncState, Launch
from tasks import enrolment, gate, protocol, relay
from tasks.federated import Federated, combine
from tasks.gate import Outcome
from trainer import screening
from trainer.staleness import Contribution, applied

log = logging.getLogger(__name__)

# A fold that has not let go of its lease after this long died with it; the next one takes over.
LEASE_SECONDS = 30
# A peer with this many updates refused in a session is given no more tasks in it (its share goes to others).
REFUSALS = 3
# A peer with this many updates waiting to be folded gets no next task until a fold takes one: answering at
# once (with anything) must not spend the session's budget faster than folds can judge what it sent.
HELD = 2


def weights_key(prefix: str, seq: int, peer: str) -> str:
    """Where peer `peer` uploads the weights of task `seq`."""
    return f"{prefix}/updates/{seq}/peers/{peer}.safetensors"


class AsyncFederated(Federated):
    """Buffered asynchronous folds: a peer that reports gets its next task at once."""

    unit = "task"
    lease = timedelta(seconds=LEASE_SECONDS)
    retry_after = LEASE_SECONDS / 2

    def deadline_seconds(self) -> int:
        settings_, limit = self.settings, self.services.settings.train_time_limit + 60
        if settings_.time_budget:
            return settings_.time_budget + limit
        # Even if only `min_peers` peers keep answering, one task at a time each.
        return math.ceil(settings_.max_updates / self.session.quorum) * limit

    # --- start ---------------------------------------------------------------------------------------

    def start(self) -> None:
        """Split the data as a synchronous session does, then give every peer its first task."""
        session = self.session
        resuming = session.status == sessions.PENDING and session.asynchronous is not None
        if resuming or (session.resumes and session.status == sessions.RUNNING and not session.launch.sent):
            self._resume()
            return
        if session.status == sessions.PENDING:
            self.prepare()
            settings_ = self.settings
            first = min(len(session.peers), settings_.max_updates)
            now = self.clock.now()
            budget = settings_.time_budget
            state = AsyncState(version=0, sent=first, remaining=settings_.max_updates - first, folding=None,
                               stop_at=now + timedelta(seconds=budget) if budget else None)
            tasks = {run.name: str(protocol.TaskId.new(session.id, seq))
                     for seq, run in enumerate(session.peers[:first])}
            launch = Launch(round=0, peers=[run.name for run in session.peers], started_at=now, sent=False)
            # Running first, then the records: a start run again finds it running and completes what is unsent.
            sessions.start_running(session.id, tasks, launch, self.deadline_seconds(), sessions.positions(session),
                                   now, state=state, rounds={name: seq for seq, name in enumerate(tasks)})
            session.reload()
        if session.status != sessions.RUNNING or session.launch.sent:
            return
        enrolment.declare_queues(self.app, [run.name for run in session.peers])
        # The first tasks, as the start recorded them on the runs (this run's, or one that died before sending).
        first = [run for run in session.peers if run.task_id and run.round == protocol.TaskId.parse(run.task_id).round]
        updates.dispatched(session.id, [{"seq": run.round, "peer": run.name, "task_id": run.task_id,
                                         "base_version": 0} for run in first], at=session.started_at)
        self.resend()
        sessions.launched(session.id, 0)

    def _resume(self) -> None:
        """Go on after an interruption from the global version it reached: the tasks it lost then were given
        back to its budget, the updates it had buffered are folded as they would have been."""
        session, now = self.session, self.clock.now()
        if session.status == sessions.PENDING:
            launch = Launch(round=0, peers=[run.name for run in session.peers], started_at=now, sent=False)
            sessions.start_running(session.id, {}, launch, self.deadline_seconds(), sessions.positions(session), now)
            session.reload()
        if session.status != sessions.RUNNING or session.launch.sent:
            return  # another run of this start did it all
        # Run again after dying half-way, it gives a task only to peers with none out.
        enrolment.declare_queues(self.app, [run.name for run in session.in_play()])
        self._dispatch_idle()
        sessions.launched(session.id, 0)
        self.fold_while_due()

    # --- sending ---------------------------------------------------------------------------------------

    def _send(self, tasks: list[updates.Update], global_url: str) -> None:
        """Record and send tasks recorded as updates (each from the global weights at `global_url`)."""
        if not tasks:
            return
        session = self.session
        now = self.clock.now()
        self.record_assignments([(task.task_id, task.peer, task.seq, self.settings.local_epochs, None)
                                 for task in tasks], now)
        with self.app.producer_or_acquire() as producer:
            for task in tasks:
                spec = self.spec(task.peer, task.seq, task.task_id, global_url,
                                 weights_key(self.prefix, task.seq, task.peer), False, version=task.base_version)
                relay.train(self.app, task.peer, task.task_id, spec, self.gate.grant_seconds,
                            f"session {session.id}, update {task.seq}, peer {task.peer}").apply_async(
                    producer=producer)
        updates.mark_sent(session.id, [task.seq for task in tasks])

    def resend(self) -> None:
        """Send the tasks recorded but not known to be sent (their sender died in between)."""
        pending = updates.unsent(self.session.id)
        by_version: dict[int, list[updates.Update]] = {}
        for task in pending:
            by_version.setdefault(task.base_version, []).append(task)
        for version, tasks in sorted(by_version.items()):
            self._send(tasks, self._version_url(version))

    def dispatch(self, peer: str) -> bool:
        """Give `peer` its next task from the newest global weights, while the budget lasts and the peer is
        not given up on; True if sent."""
        session = self.session
        if updates.buffered_of(session.id, peer) >= HELD:
            return False  # its next task waits for a fold to take one of its updates (see _dispatch_idle)
        now = self.clock.now()
        taken = sessions.take_task(session.id, peer, now, REFUSALS)
        if taken is None:
            return False
        seq, version, global_url = taken
        task_id = str(protocol.TaskId.new(session.id, seq))
        updates.dispatched(session.id, [{"seq": seq, "peer": peer, "task_id": task_id, "base_version": version}],
                           at=now)
        # Named on the peer's run before it is sent: heartbeats and results name the task it was given.
        sessions.record_runs(session.id, sessions.positions(session),
                             {peer: {"task_id": task_id, "status": sessions.RUNNING, "round": seq}},
                             before={peer: sessions.RUNNING}, active_only=True)  # an end meanwhile stands
        self._send([updates.of_task(session.id, seq)], global_url)
        return True

    def on_joined(self, names: list[str]) -> None:
        """Peers that came online: the training rows are split again among every peer in play, and each newcomer
        gets its next task at once, while the budget lasts (safe to run twice: an admitted peer with a task out
        gets no second one)."""
        if not self.session.elastic:
            super().on_joined(names)
            return
        admitted = self.admit(names)
        if not admitted:
            return
        in_play = [run.name for run in self.session.in_play()]
        if any(name not in self.session.plan.shards for name in in_play):
            self.reshard(in_play)
        enrolment.declare_queues(self.app, admitted)
        busy = updates.busy_peers(self.session.id)
        for name in admitted:
            if name not in busy and not self.dispatch(name):
                peers.release(self.session.id, [name])  # nothing left to hand out: free for other sessions

    # --- a peer reported -------------------------------------------------------------------------------

    def on_result(self, round_: int, outcomes: list[Outcome]) -> None:
        """Buffer (or reject) the update of task `round_`, fold if the buffer is full, hand its peer its next task.

        Safe to run again for the same task (a redelivered `update` whose first run died midway): the update
        moves once, and the peer gets one next task, however often this runs."""
        session = self.session
        for outcome in outcomes:
            update = updates.of_task(session.id, round_)
            if update is None or update.task_id != outcome.task or update.peer != outcome.peer:
                log.warning("session %s: no task %s of peer %s; result dropped", session.id, outcome.task,
                            outcome.peer)
                continue
            if update.status == updates.LOST or outcome.left_out:
                continue  # given up on meanwhile: its share of the budget went to another peer
            if update.status == updates.TRAINING:
                self._buffer(update, outcome)
            self.fold_while_due()
            self.resend()  # a next task recorded by a run that died before sending it
            sent = not updates.sent_after(session.id, update.peer, update.seq) and self.dispatch(update.peer)
            if not sent:
                self.fold_while_due()  # that was the last task out: the session may be done

    def _buffer(self, update: updates.Update, outcome: Outcome) -> None:
        # Its weights are read and checked once, when they are folded.
        session, result = self.session, outcome.result
        samples = gate.samples(session.plan, update.peer)
        info = {"metrics": result["final"], "seconds": result["seconds"], "samples": samples}
        now = self.clock.now()
        if result["stopped"]:
            taken = updates.settle(session.id, update.seq, updates.REJECTED, at=now,
                                   reason="it stopped before finishing", **info)
        else:
            taken = updates.settle(session.id, update.seq, updates.BUFFERED, at=now, **info)
        if taken:
            self.record_results([outcome], sessions.RUNNING, samples={update.peer: samples})

    def on_lost(self, peer: str, reason: str) -> None:
        """`peer` will not report: it is given up on, and its tasks' share of the budget goes to the others."""
        session = self.session
        if session.finished or peer not in {run.name for run in session.peers}:
            return
        if session.peer(peer).status == sessions.FAILED or self.give_up_on(peer, reason):
            return
        assignments.close(session.id, gate.closed(reason), self.clock.now(), peer=peer)
        if given_back := updates.lose_training(session.id, peer, reason):
            sessions.give_back(session.id, given_back)
            # Peers that answered their last task while the budget looked spent are idle: they take it.
            session.reload()
            busy = updates.busy_peers(session.id)
            for run in session.in_play():
                if run.name not in busy and not self.dispatch(run.name):
                    break
        self.fold_while_due()

    # --- folding ---------------------------------------------------------------------------------------

    def stalled(self) -> bool:
        """Work waits while another holds the fold lease (it may have died with it: look again later)."""
        return sessions.fold_leased(self.session.id) and self._waiting()

    def fold_while_due(self) -> None:
        """Fold while a full buffer waits, and, once every task is answered, the rest; then finish."""
        session_id = self.session.id
        while True:
            if not sessions.take_fold_lease(session_id, self.clock.now(), self.lease):
                return  # whoever holds the lease looks again when it lets go
            try:
                worked = self._step()
            finally:
                sessions.drop_fold_lease(session_id)
            if not worked and not self._waiting():
                return

    def _reloaded(self) -> bool:
        found = sessions.load(self.session.id)
        if found is None or found.status != sessions.RUNNING:
            return False
        self.session = found
        return True

    def _done(self) -> bool:
        """No task is out, and none will be sent: the budget or the time is spent, or no peer in play may take
        one (each had REFUSALS updates refused: waiting would only wait for the session's deadline)."""
        state = self.session.asynchronous
        spent = state.remaining <= 0 or (state.stop_at is not None and self.clock.now() >= state.stop_at)
        spent = spent or not any((run.rejected or 0) < REFUSALS for run in self.session.in_play())
        return spent and updates.count(self.session.id, updates.TRAINING) == 0

    def _waiting(self) -> bool:
        if not self._reloaded():
            return False
        done = self._done()
        return bool(self._due(updates.buffered(self.session.id), done)) or done

    def _due(self, pending: list[updates.Update], done: bool) -> list[updates.Update]:
        """The updates of the next fold, if one is due: the oldest of each of `buffer_size` different peers
        (fewer when fewer take tasks), so that a peer answering at once cannot fill a fold by itself; once no
        more tasks will be answered, all that wait."""
        if done:
            return pending
        oldest: dict[str, updates.Update] = {}
        for update in pending:
            oldest.setdefault(update.peer, update)
        taking = sum(1 for run in self.session.in_play() if (run.rejected or 0) < REFUSALS)
        need = min(self.settings.buffer_size, max(1, taking))
        return sorted(oldest.values(), key=lambda u: u.seq)[:need] if len(oldest) >= need else []

    def _step(self) -> bool:
        """Under the lease: one fold, or the session's end; False if there was nothing to do."""
        if not self._reloaded():
            return False
        done = self._done()
        due = self._due(updates.buffered(self.session.id), done)
        if due:
            self._fold(due)
            self._dispatch_idle()
            return True
        if done:
            self.finish()
            return True
        return False

    def _dispatch_idle(self) -> None:
        """Peers held back (HELD updates waiting) or idle take their next task once a fold made room."""
        session = self.session
        session.reload()
        busy = updates.busy_peers(session.id)
        for run in session.in_play():
            if run.name not in busy:
                self.dispatch(run.name)

    def _version_url(self, version: int) -> str:
        if version == 0:
            return self.session.plan.initial_url
        return self.storage.url(f"{self.prefix}/versions/{version}.safetensors")

    def _fold(self, pending: list[updates.Update]) -> None:
        session, version = self.session, self.session.asynchronous.version
        current = self.global_state(session.plan.global_url)
        screened, by_name, rejected = self._screened(current, pending)
        if not screened.states:
            return
        kept = sorted(screened.states, key=lambda name: by_name[name][0].seq)
        used = [by_name[name][0] for name in kept]
        contributions = [by_name[name][1] for name in kept]
        weights = [c.samples * screened.trust.get(name, 1.0) for name, c in zip(kept, contributions, strict=True)]
        merged, server_url = self.server_step(version, current, combine(
            self.settings.aggregation, [screened.states[name] for name in kept], weights))
        if self.settings.algorithm == "scaffold":
            # Each peer's weights as screening bounded them, the staleness weight undone: what its task did.
            server_url = self.scaffold_step(version, [
                (u.peer, c.base, {key: c.base[key] + (screened.states[name][key] - current[key]) / c.weight
                                  for key in current}, weights_key(self.prefix, u.seq, u.peer))
                for name, u, c in zip(kept, used, contributions, strict=True)])
        model = self.loaded(merged)
        metrics = self.evaluate_held_out(model)
        url = self.put_state(f"{self.prefix}/versions/{version + 1}.safetensors", merged, {"version": version + 1})
        folded = [{"seq": u.seq, "peer": u.peer, "staleness": c.staleness, "weight": round(c.weight, 4)}
                  for u, c in zip(used, contributions, strict=True)]
        now = self.clock.now()
        elapsed = (now - session.started_at).total_seconds() if session.started_at else None
        metrics = {**metrics, "samples": sum(c.samples for c in contributions), "updates": len(used),
                   "mean_staleness": sum(c.staleness for c in contributions) / len(contributions), "seconds": elapsed}
        round_doc = Round(round=version, peers=[u.peer for u in used], rejected=rejected,
                          outliers=screened.outliers, updates=folded, metrics=metrics,
                          model_url=self.keep_model(version, model, url,
                                                    [*(r.metrics for r in session.rounds), metrics]),
                          finished_at=now)
        if not sessions.record_fold(session.id, version, round_doc, url, self.history_after(screened), server_url):
            return  # it ended meanwhile
        self.count_used([update.peer for update in used])
        for entry in folded:
            updates.folded(session.id, entry["seq"], version + 1, entry["staleness"], entry["weight"])
        events.record_round(session.id, round_doc)
        log.info("session %s: version %d from %d update(s), staleness %s", session.id, version + 1, len(used),
                 [c.staleness for c in contributions])

    def _screened(self, current: dict[str, torch.Tensor], pending: list[updates.Update]) -> tuple[
            screening.Screened, dict[str, tuple[updates.Update, Contribution]], dict[str, str]]:
        """The buffered updates read and screened, each as `current` moved by it alone (`peer#seq` names them):
        what screening made of them, each one's update and contribution, and the refused ones with why (marked
        REJECTED here, and counted on their peers' records)."""
        version = self.session.asynchronous.version
        trust = {p["name"]: min(1.0, 2 * peers.reputation(p))
                 for p in peers.Peer.objects(name__in=[u.peer for u in pending]).as_pymongo()}
        candidates, by_name, rejected = {}, {}, {}
        for update in pending:
            name = f"{update.peer}#{update.seq}"
            # Read here, once, and not when it arrived: until its grant expires a peer could replace it anyway.
            read = self.gate.weights(weights_key(self.prefix, update.seq, update.peer), self.config)
            if isinstance(read, str):
                rejected[name] = read
                continue
            # Stale updates count less, and so do peers with a poor record (a newcomer counts fully).
            contribution = Contribution(self.global_state(self._version_url(update.base_version)), read,
                                        update.samples * trust.get(update.peer, 1.0), version - update.base_version)
            candidates[name], by_name[name] = applied(current, contribution), (update, contribution)
        # Each one bounded and judged on the held-out rows, against what recently accepted ones did.
        screened = self.screen(current, candidates, senders={name: by_name[name][0].peer for name in candidates})
        rejected.update(screened.rejected)
        for update in pending:
            name = f"{update.peer}#{update.seq}"
            # Counted once: only the run that moves it from buffered to rejected.
            if name in rejected and updates.reject(self.session.id, update.seq, rejected[name]):
                self.count_refused(update.peer, str(update.seq), rejected[name], screened=name in screened.rejected)
        return screened, by_name, rejected

    def finish(self) -> None:
        session = self.session
        if not session.rounds:
            self.end(sessions.FAILED, "no peer returned a usable update")
            return
        counts = {status: updates.count(session.id, status) for status in updates.STATUSES}
        self.store_model(session.rounds[-1].metrics,
                         extra={"schedule": self.settings.schedule, "versions": session.asynchronous.version,
                                "updates": {k.lower(): v for k, v in counts.items() if v}})
