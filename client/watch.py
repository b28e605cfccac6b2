"""Watching a session: its event stream followed to the end across dropped connections, shown as bars or lines."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import Any, Protocol

import httpx
from httpx_sse import SSEError
from rich import box
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeRemainingColumn
from rich.table import Table

from client.api import Api, ApiError, Event

RECONNECT_FOR = 300.0  # seconds without a working stream before giving up
MAX_DELAY = 5.0


class StreamLost(Exception):
    """The stream could not be reopened for RECONNECT_FOR seconds."""


class Display(Protocol):
    def begin(self, session: dict[str, Any]) -> None: ...
    def event(self, event: Event) -> None: ...
    def retry(self, problem: str, delay: float) -> None: ...
    def finish(self, end: dict[str, Any], session: dict[str, Any] | None, table: Table | None = None) -> None: ...


def follow(api: Api, session_id: str, on_event: Callable[[Event], None],
           on_retry: Callable[[str, float], None], give_up_after: float = RECONNECT_FOR) -> dict[str, Any]:
    """Read the session's events until `end` (returns its data), reconnecting with Last-Event-ID when dropped."""
    last_id: str | None = None
    delay = 0.5
    failing_since: float | None = None
    while True:
        try:
            for event in api.events(session_id, last_id):
                if event.id is not None:
                    last_id = event.id
                failing_since, delay = None, 0.5
                on_event(event)
                if event.type == "end":
                    return event.data
            problem = "the server closed the stream"
        except (httpx.TransportError, SSEError) as exc:
            problem = str(exc) or type(exc).__name__
        except ApiError as exc:
            if exc.status < 500:
                raise
            problem = exc.message
        now = time.monotonic()
        failing_since = failing_since or now
        if now - failing_since > give_up_after:
            raise StreamLost(problem)
        on_retry(problem, delay)
        time.sleep(delay)
        delay = min(delay * 2, MAX_DELAY)


def watch(api: Api, session_id: str, display: Display) -> str:
    """Show the session until it ends (a search: then its trials, ranked); returns its final status."""
    display.begin(api.session(session_id))
    end = follow(api, session_id, display.event, display.retry)
    session = None if isinstance(display, JsonLines) else api.session(session_id)
    # A search's trials, ranked, above the last line (the session's status, which scripts read).
    ranked = trials_table(api.trials(session_id)) if session is not None and session.get("search") else None
    display.finish(end, session, ranked)
    return end["status"]


def _percent_or_number(metric: str, value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 100:.1f}%" if "accuracy" in metric else f"{value:.4g}"


def _setting(name: str, value: Any) -> str:
    if name == "hidden":
        return "hidden " + ("x".join(map(str, value)) or "none")
    short = {"learning_rate": "lr", "batch_size": "batch", "weight_decay": "wd"}.get(name, name)
    return f"{short} {value:.3g}" if isinstance(value, float) else f"{short} {value}"


def trials_table(listed: dict[str, Any]) -> Table:
    """A search's trials ranked as the platform ranks them: best held-out score, then lower held-out loss."""
    metric = listed.get("metric") or "value"
    best = (listed.get("best") or {}).get("number")
    ranked = sorted(listed.get("items", []), key=lambda t: (t.get("value") is None, -(t.get("value") or 0),
                                                             t.get("val_loss") or 0, t["number"]))
    table = Table("#", "trial", "peer", "status", metric, "val_loss", "epochs", "settings", "seconds",
                  box=box.SIMPLE, title=f"trials, ranked by {metric} on the held-out rows (ties: lower "
                                        f"{listed.get('tie_breaker') or 'val_loss'})")
    for place, t in enumerate(ranked, start=1):
        table.add_row(str(place), f"{t['number']}{' ★' if t['number'] == best else ''}", t["peer"], t["status"],
                      _percent_or_number(metric, t.get("value")),
                      f"{t['val_loss']:.4g}" if t.get("val_loss") is not None else "-",
                      f"{t.get('epochs_done', 0)}/{t['epochs']}",
                      " · ".join(_setting(k, v) for k, v in sorted((t.get("params") or {}).items())),
                      f"{t['seconds']:.1f}" if t.get("seconds") is not None else "-")
    return table


def metrics(data: dict[str, Any]) -> str:
    """`loss 0.41 acc 88.1% val_loss 0.45 val_acc 86.0%`, leaving out what is missing."""
    parts = []
    for key, label in (("loss", "loss"), ("accuracy", "acc"), ("val_loss", "val_loss"),
                       ("val_accuracy", "val_acc"), ("val_r2", "val_r2")):
        value = data.get(key)
        if value is None:
            continue
        parts.append(f"{label} {value * 100:.1f}%" if "acc" in label else f"{label} {value:.4g}")
    return " ".join(parts)


def result(session: dict[str, Any] | None) -> str:
    r = (session or {}).get("results") or {}
    if not r.get("metric") or r.get("best_value") is None:
        return ""
    if r.get("best_trial") is not None:
        return (f"best trial {r['best_trial']} (peer {r['best_peer']}, epoch {r.get('best_epoch')}): {r['metric']} "
                f"{_percent_or_number(r['metric'], r['best_value'])}")
    who = f"best peer {r['best_peer']}" if r.get("best_peer") else "global model"
    value = r["best_value"]
    return f"{who}: {r['metric']} " + (f"{value * 100:.1f}%" if "accuracy" in r["metric"] else f"{value:.4g}")


class Plan:
    """What the session's static facts say about its progress: epochs per peer, rounds."""

    def __init__(self, session: dict[str, Any]) -> None:
        self.session = session
        self.federated = session.get("mode") == "federated"
        fed = session.get("federated") or {}
        self.rounds = fed.get("rounds", 1)
        self.local_epochs = fed.get("local_epochs", 1)
        self.epochs = {p["name"]: p.get("epochs") or 1 for p in session.get("peers", [])}
        self.searching = bool(session.get("search"))
        self.trial: dict[str, int] = {}  # a searching sweep's peer -> the trial it trains now
        # Asynchronous: a peer does as many tasks as it is fast enough for; the global model gets a version
        # every `buffer_size` updates (the last may fold fewer).
        self.apart = fed.get("schedule") == "async"
        self.unit = "version" if self.apart else "round"  # what the global model's steps are called
        if self.apart:
            self.rounds = -(-fed["max_updates"] // fed["buffer_size"])

    def total(self, peer: str) -> int:
        if self.apart:
            return self.local_epochs
        return self.rounds * self.local_epochs if self.federated else self.epochs.get(peer, 1)

    def done(self, beat: dict[str, Any]) -> int:
        if self.apart:
            return beat["epoch"]
        return beat["round"] * self.local_epochs + beat["epoch"] if self.federated else beat["epoch"]

    def step(self, beat: dict[str, Any]) -> str:
        if beat.get("peer") in self.trial:
            return f"trial {self.trial[beat['peer']]} epoch {beat['epoch']}/{beat['epochs']}"
        if self.apart:
            return f"update {beat['round'] + 1} epoch {beat['epoch']}/{beat['epochs']}"
        if self.federated:
            return f"round {beat['round'] + 1}/{self.rounds} epoch {beat['epoch']}/{beat['epochs']}"
        return f"epoch {beat['epoch']}/{beat['epochs']}"

    def describe(self) -> str:
        s = self.session
        names = ", ".join(p["name"] for p in s.get("peers", []))
        what = f"search of {s['search']['trials']} trials" if self.searching else s["mode"]
        return f"session {s['id']}: {what} on {s['dataset']['filename']}, peers {names}"

    def trial_line(self, d: dict[str, Any]) -> str | None:
        """A trial event worth a line: one that began or ended."""
        metric = "val_accuracy" if self.session.get("task", "classification") == "classification" else "val_r2"
        settings = " · ".join(_setting(k, v) for k, v in sorted((d.get("params") or {}).items()))
        if d["status"] == "RUNNING" and d["epochs_done"] == 0:
            return f"trial {d['number']} on {d['peer']}: {settings}"
        if d["status"] in ("COMPLETED", "PRUNED", "FAILED"):
            return (f"trial {d['number']} {d['status'].lower()} after {d['epochs_done']}/{d['epochs']} epochs: "
                    f"{metric} {_percent_or_number(metric, d.get('value'))}"
                    + (f" ({d['reason']})" if d.get("reason") and d["status"] != "COMPLETED" else ""))
        return None

    def settings(self, peer: str) -> str:
        """A peer's hyperparameters in a few words: `lr 0.01 · batch 64 · adam · hidden 128x64`."""
        hp = next((p.get("hyperparameters") or {} for p in self.session.get("peers", []) if p["name"] == peer), {})
        parts = [f"lr {hp['learning_rate']:g}" if "learning_rate" in hp else "",
                 f"batch {hp['batch_size']}" if "batch_size" in hp else "", hp.get("optimizer", ""),
                 "hidden " + "x".join(map(str, hp["hidden"])) if hp.get("hidden") else "",
                 f"dropout {hp['dropout']:g}" if hp.get("dropout") else ""]
        return " · ".join(part for part in parts if part)


class JsonLines:
    """One JSON object per event on stdout, for scripts: {"event", "id", "data"}."""

    def begin(self, session: dict[str, Any]) -> None:
        pass

    def event(self, event: Event) -> None:
        # The stream's ids are integers (sent as text, as SSE does).
        number = int(event.id) if event.id is not None and event.id.isdigit() else event.id
        print(json.dumps({"event": event.type, "id": number, "data": event.data}), flush=True)

    def retry(self, problem: str, delay: float) -> None:
        print(f"connection lost ({problem}); reconnecting in {delay:g} s", file=sys.stderr, flush=True)

    def finish(self, end: dict[str, Any], session: dict[str, Any] | None, table: Table | None = None) -> None:
        pass


class Lines:
    """A plain line per event, for logs and pipes (stdout is not a terminal)."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.plan: Plan | None = None

    def say(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False, soft_wrap=True)

    def begin(self, session: dict[str, Any]) -> None:
        self.plan = Plan(session)
        self.say(self.plan.describe())
        for peer in self.plan.epochs:
            self.say(f"  {peer}: {self.plan.settings(peer)}")

    def event(self, event: Event) -> None:
        d, plan = event.data, self.plan
        if event.type == "heartbeat":
            self.say(f"{d['peer']} {plan.step(d)} {metrics(d)}")
        elif event.type == "round":
            self.say(f"{plan.unit} {d['round'] + 1}/{plan.rounds} global model {metrics(d.get('metrics') or {})}"
                     + "".join(f"; {peer} left out: {why}" for peer, why in (d.get("rejected") or {}).items()))
        elif event.type == "status":
            self.say(f"status {d['status']}" + (f": {d['reason']}" if d.get("reason") else ""))
        elif event.type == "peer":
            self.say(f"{d['peer']} {d['status']}" + (f": {d['error']}" if d.get("error") else ""))
        elif event.type == "trial":
            if d["status"] == "RUNNING":
                plan.trial[d["peer"]] = d["number"]
            if (line := plan.trial_line(d)) is not None:
                self.say(line)

    def retry(self, problem: str, delay: float) -> None:
        self.say(f"connection lost ({problem}); reconnecting in {delay:g} s")

    def finish(self, end: dict[str, Any], session: dict[str, Any] | None, table: Table | None = None) -> None:
        if table is not None:
            self.console.print(table)
        summary = result(session)
        self.say(f"{end['status']}" + (f": {end['reason']}" if end.get("reason") else "")
                 + (f" ({summary})" if summary else ""))


class Bars(Lines):
    """One progress bar per peer (and one for the global model's rounds), for a terminal."""

    def __init__(self, console: Console) -> None:
        super().__init__(console)
        self.progress = Progress(
            TextColumn("[bold]{task.description:<12}"),
            TextColumn("{task.fields[settings]}"),
            BarColumn(bar_width=24),
            TextColumn("{task.fields[step]:<22}"),
            TextColumn("{task.fields[metrics]}"),
            TimeRemainingColumn(),
            console=console,
        )
        self.tasks: dict[str, TaskID] = {}

    def say(self, text: str) -> None:
        self.progress.console.print(text, markup=False, highlight=False)

    def begin(self, session: dict[str, Any]) -> None:
        self.plan = plan = Plan(session)
        self.say(plan.describe())  # each peer's settings are beside its bar
        width = max((len(plan.settings(peer)) for peer in plan.epochs), default=0)
        for peer in plan.epochs:
            self.tasks[peer] = self.progress.add_task(peer, total=plan.total(peer), step="waiting", metrics="",
                                                      settings=plan.settings(peer).ljust(width))
        if plan.federated:
            self.tasks[""] = self.progress.add_task("global", total=plan.rounds, step=f"{plan.unit} 0/{plan.rounds}",
                                                    metrics="", settings=" " * width)
        self.progress.start()

    def event(self, event: Event) -> None:
        d, plan = event.data, self.plan
        if event.type == "heartbeat" and d.get("peer") in self.tasks:
            self.progress.update(self.tasks[d["peer"]], completed=plan.done(d), step=plan.step(d), metrics=metrics(d))
        elif event.type == "round" and "" in self.tasks:
            self.progress.update(self.tasks[""], completed=d["round"] + 1,
                                 step=f"{plan.unit} {d['round'] + 1}/{plan.rounds}",
                                 metrics=metrics(d.get("metrics") or {}))
            for peer, why in (d.get("rejected") or {}).items():
                self.say(f"{plan.unit} {d['round'] + 1}: {peer} left out: {why}")
        elif event.type == "peer" and d.get("peer") in self.tasks:
            self.progress.update(self.tasks[d["peer"]], description=f"{d['peer']} {d['status'].lower()}"
                                 if d["status"] != "RUNNING" else d["peer"])
            if d.get("error"):
                self.say(f"{d['peer']} {d['status']}: {d['error']}")
        elif event.type == "trial" and d.get("peer") in self.tasks:
            if d["status"] == "RUNNING":
                plan.trial[d["peer"]] = d["number"]
                settings = " · ".join(_setting(k, v) for k, v in sorted((d.get("params") or {}).items()))
                self.progress.update(self.tasks[d["peer"]], total=d["epochs"], completed=d["epochs_done"],
                                     settings=settings, step=f"trial {d['number']}")
            if d["status"] != "RUNNING" and (line := plan.trial_line(d)) is not None:
                self.say(line)
        elif event.type == "status":
            super().event(event)

    def finish(self, end: dict[str, Any], session: dict[str, Any] | None, table: Table | None = None) -> None:
        self.progress.stop()
        super().finish(end, session, table)


def display_for(console: Console, as_json: bool, lines: bool = False) -> Display:
    """JSON lines for scripts, bars on a terminal (unless `lines`), plain lines otherwise."""
    if as_json:
        return JsonLines()
    return Bars(console) if console.is_terminal and not lines else Lines(console)
