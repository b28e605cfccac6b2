"""`peertrain`: sign in, start a session on a CSV and watch it train, read sessions and peers, get the model.

Exit status: 0 done (a watched session COMPLETED), 1 the session FAILED, was CANCELLED or INTERRUPTED, or the server
refused or could not be reached, 2 a usage error (bad options, not signed in).
"""

from __future__ import annotations

import json
import re
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import click
import httpx
from rich import box
from rich.console import Console
from rich.table import Table

from client import machine
from client.api import Api, ApiError
from client.credentials import Credentials, Login
from client.watch import StreamLost, display_for, metrics, result, trials_table, watch

COMPLETED = "COMPLETED"
INTERRUPTED = 130


class State:
    """What every command shares: the API's address, the saved logins, the consoles."""

    def __init__(self, url: str | None) -> None:
        self.credentials = Credentials()
        self.url = (url or self.credentials.url).rstrip("/")
        # Text as it is (no markup, no colouring of numbers), and long lines unbroken in logs and pipes.
        self.console = Console(highlight=False, markup=False, soft_wrap=True)
        if not self.console.is_terminal:
            self.console.width = 240  # tables in pipes and logs keep ids whole rather than fit 80 columns

    def api(self, signed_in: bool = True) -> Api:
        if not signed_in:
            return Api(self.url)
        login = self.credentials.login(self.url)
        if login is None:
            raise click.UsageError(f"not signed in to {self.url}: run `peertrain login --email EMAIL` first")
        if login.signed_out:
            raise click.UsageError(f"the sign-in to {self.url} has expired: "
                                   f"run `peertrain login --email {login.email}`")

        def renewed(answer: dict) -> None:
            login.renewed(answer)
            self.credentials.save(self.url, login)

        api = Api(self.url, login.token, refresh=login.refresh, renewed=renewed)
        if login.expired:
            api.renew()  # before a request that may carry a whole CSV
        return api

    def sign_in(self, api: Api, email: str, password: str, as_json: bool) -> None:
        answer = api.signin(email, password)
        now = time.time()
        login = Login(answer["access_token"], answer["username"], email, now + answer["expires_in"],
                      answer.get("refresh_token", ""), now + answer.get("refresh_expires_in", 0))
        self.credentials.save(self.url, login)
        if as_json:
            emit({"url": self.url, "username": login.username, "email": email, "expires_in": answer["expires_in"]})
        else:
            self.console.print(f"signed in to {self.url} as {login.username} (token kept in {self.credentials.path})")


# Names people type from other tools (flwr ls, flwr log): the same commands.
ALIASES = {"ls": "sessions", "list": "sessions", "log": "logs"}


class Cli(click.Group):
    """Reports the server's refusals and unreachable servers in one line, exit status 1; knows ALIASES."""

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        return super().get_command(ctx, ALIASES.get(cmd_name, cmd_name))

    def resolve_command(self, ctx: click.Context,
                        args: list[str]) -> tuple[str | None, click.Command | None, list[str]]:
        _, command, rest = super().resolve_command(ctx, args)
        return (command.name if command else None), command, rest  # an alias runs as the command it names

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        super().format_commands(ctx, formatter)
        formatter.write_paragraph()
        formatter.write_text("Also: " + ", ".join(f"{alias} = {name}" for alias, name in ALIASES.items()) + ".")

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ApiError as exc:
            # A field's reason is often the message itself ("the dataset cannot be used: …"): said once.
            lines = [f"error: {exc.message}"] + [f"  {field}: {_text(msg)}" for field, msg in exc.errors.items()
                                                 if _text(msg) not in exc.message]
            if exc.status == 401 and ctx.invoked_subcommand not in ("login", "signup"):
                lines.append("  sign in again: peertrain login --email EMAIL")
            click.echo("\n".join(lines), err=True)
        except httpx.TransportError as exc:
            click.echo(f"error: cannot reach {ctx.obj.url if ctx.obj else 'the API'}: {exc}", err=True)
        except StreamLost as exc:
            click.echo(f"error: lost the event stream and could not reopen it ({exc})", err=True)
        ctx.exit(1)


def _text(message: Any) -> str:
    if isinstance(message, list):
        return " ".join(_text(m) for m in message)
    if isinstance(message, dict):
        return "; ".join(f"{k}: {_text(v)}" for k, v in message.items())
    return str(message)


def _local(iso: str | None) -> str:
    """An API timestamp in this machine's time zone, to the second."""
    if not iso:
        return ""
    return datetime.fromisoformat(iso).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def emit(data: Any) -> None:
    """One JSON document on stdout."""
    click.echo(json.dumps(data))


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON, for scripts.")
password_option = click.option("--password", envvar="PEERTRAIN_PASSWORD", metavar="P",
                               help="Default: $PEERTRAIN_PASSWORD, else asked for on a terminal.")


# The API's rules for a new password (webapp/schemas.py SignupSchema), checked before asking for it twice.
PASSWORD_LENGTH = (8, 256)


def _password(password: str | None, confirm: bool) -> str:
    if password:
        return password
    if not sys.stdin.isatty():
        raise click.UsageError("give --password or set PEERTRAIN_PASSWORD")
    if not confirm:
        return click.prompt("Password", hide_input=True)
    low, high = PASSWORD_LENGTH
    while True:
        password = click.prompt(f"Password ({low} to {high} characters)", hide_input=True)
        if low <= len(password) <= high:
            break
        click.echo(f"a password needs {low} to {high} characters; this one has {len(password)}", err=True)
    if click.prompt("Repeat it", hide_input=True) != password:
        raise click.UsageError("the two passwords differ")
    return password


@click.group(cls=Cli, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--url", envvar="PEERTRAIN_URL", metavar="URL",
              help="The API's address. Default: $PEERTRAIN_URL, else the last one signed in to, else "
                   "http://127.0.0.1:8000.")
@click.pass_context
def main(ctx: click.Context, url: str | None) -> None:
    """Train neural networks on peers: start sessions on CSV files and watch them."""
    ctx.obj = State(url)


@main.command()
@click.option("--email", required=True)
@click.option("--username", help="Default: the part of the email before the @.")
@password_option
@json_option
@click.pass_obj
def signup(state: State, email: str, username: str | None, password: str | None, as_json: bool) -> None:
    """Create an account and sign in."""
    password = _password(password, confirm=True)
    api = state.api(signed_in=False)
    name = username or re.sub(r"[^A-Za-z0-9_.-]", "_", email.split("@")[0]).ljust(3, "_")[:40]
    api.signup(name, email, password)
    state.sign_in(api, email, password, as_json)


@main.command()
@click.option("--email", required=True)
@password_option
@json_option
@click.pass_obj
def login(state: State, email: str, password: str | None, as_json: bool) -> None:
    """Sign in and keep the token for this URL.

    The token goes to credentials.json in your config directory (~/.config/peertrain), readable by you only.
    """
    state.sign_in(state.api(signed_in=False), email, _password(password, confirm=False), as_json)


@main.command()
@json_option
@click.pass_obj
def logout(state: State, as_json: bool) -> None:
    """Forget the token kept for this URL."""
    found = state.credentials.forget(state.url)
    if as_json:
        emit({"url": state.url, "forgotten": found})
    else:
        state.console.print(f"signed out of {state.url}" if found else f"was not signed in to {state.url}")


@main.command()
@json_option
@click.pass_obj
def peers(state: State, as_json: bool) -> None:
    """The peers and their status."""
    answer = state.api().peers()
    if as_json:
        return emit(answer)
    table = Table("peer", "owner", "status", "host", "last seen", "session", "used", "refused", "timed out",
                  "failed", "reputation", box=box.SIMPLE)
    for p in answer["peers"]:
        owner = "platform" if not p.get("owner") else p["owner"] + ("" if p.get("public") else " (private)")
        status = p["status"] + (" (paused)" if p.get("paused") else "")
        table.add_row(p["name"], owner, status, p.get("hostname") or "", _local(p.get("last_seen")),
                      p.get("session_id") or "", str(p.get("accepted", 0)), str(p.get("rejected", 0)),
                      str(p.get("timed_out", 0)), str(p.get("failed", 0)), f"{p.get('reputation', 0.5):.2f}")
    state.console.print(table)
    state.console.print(f"{answer['total']} known, {answer['online']} online, {answer['free']} free to train")


@main.group()
def peer() -> None:
    """Contribute a machine: enrol it, join it, run it; pause, share or remove your peers.

    \b
    On a signed-in computer:  peertrain peer add NAME        (prints a one-time token and the command)
    On the machine itself:    peertrain peer join --url URL --token TOKEN && peertrain peer run
    """


@peer.command(name="add")
@click.argument("name")
@json_option
@click.pass_obj
def peer_add(state: State, name: str, as_json: bool) -> None:
    """Enrol a machine as peer NAME: a join token, usable once within the hour."""
    answer = state.api().enrol(name)
    if as_json:
        return emit(answer)
    state.console.print(f"peer {name} enrolled; its join token works once, until {_local(answer['expires_at'])}.")
    state.console.print("On that machine (with `pip install 'peertrain[peer]'` done), run:\n")
    state.console.print(f"  {answer['command']}")


@peer.command(name="join")
@click.option("--url", "join_url", required=True, metavar="URL", help="The platform's address.")
@click.option("--token", required=True, envvar="PEERTRAIN_JOIN_TOKEN", help="The join token `peer add` printed.")
@click.option("--file", "path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Where to keep the peer's login (default: peer.env in your config directory, mode 0600).")
@json_option
def peer_join(join_url: str, token: str, path: Path | None, as_json: bool) -> None:
    """Exchange a join token for this machine's peer login (no sign-in needed: the token is the credential)."""
    url = join_url.rstrip("/")
    api = Api(url)
    try:
        joined = api.join(token)
    finally:
        api.close()
    path = path or machine.default_path()
    machine.write(path, url, joined)
    if as_json:
        return emit({"name": joined["name"], "file": str(path)})
    click.echo(f"joined {url} as peer {joined['name']}; its login is in {path} (readable by you only).")
    click.echo("Start it with: peertrain peer run")


@peer.command(name="run")
@click.option("--file", "path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The peer file `peer join` wrote (default: peer.env in your config directory).")
def peer_run(path: Path | None) -> None:
    """Run this machine's peer worker in the foreground until Ctrl-C (which lets it stop cleanly)."""
    path = path or machine.default_path()
    try:
        values = machine.read(path)
        click.echo(f"peer {values[machine.NAME]} of {values.get(machine.URL, 'the platform')}: starting its worker "
                   "(Ctrl-C stops it)", err=True)
        machine.run(path)
    except machine.PeerFileError as exc:
        raise click.UsageError(str(exc)) from None


def _change(state: State, name: str, as_json: bool, said: str, **fields: bool) -> None:
    answer = state.api().change_peer(name, **fields)
    if as_json:
        return emit(answer)
    state.console.print(f"peer {name} {said}")


@peer.command(name="pause")
@click.argument("name")
@json_option
@click.pass_obj
def peer_pause(state: State, name: str, as_json: bool) -> None:
    """Keep your peer NAME out of sessions (it stays connected)."""
    _change(state, name, as_json, "paused: no session will claim it until you resume it", paused=True)


@peer.command(name="resume")
@click.argument("name")
@json_option
@click.pass_obj
def peer_resume(state: State, name: str, as_json: bool) -> None:
    """Let your paused peer NAME take work again."""
    _change(state, name, as_json, "resumed: sessions may claim it again", paused=False)


@peer.command(name="share")
@click.argument("name")
@click.option("--off", is_flag=True, help="Stop sharing it: only your sessions (and your pools') use it.")
@json_option
@click.pass_obj
def peer_share(state: State, name: str, off: bool, as_json: bool) -> None:
    """Share your peer NAME with everyone's sessions (`--off`: only yours again)."""
    _change(state, name, as_json, "serves only you and your pools now" if off else "is shared with everyone",
            public=not off)


@peer.command(name="remove")
@click.argument("name")
@json_option
@click.pass_obj
def peer_remove(state: State, name: str, as_json: bool) -> None:
    """Remove your peer NAME: its login stops working at once."""
    state.api().remove_peer(name)
    if as_json:
        return emit({"name": name, "removed": True})
    state.console.print(f"peer {name} removed; its login no longer works")


@main.group()
def pool() -> None:
    """Share chosen peers of yours with chosen users; start a session on them with `start --pool NAME`."""


@pool.command(name="list")
@json_option
@click.pass_obj
def pool_list(state: State, as_json: bool) -> None:
    """The pools you own or belong to."""
    answer = state.api().pools()
    if as_json:
        return emit(answer)
    table = Table("pool", "owner", "members", "peers", box=box.SIMPLE)
    for p in answer["pools"]:
        table.add_row(p["name"], p["owner"] or "", ", ".join(p["members"]), ", ".join(p["peers"]))
    state.console.print(table)


@pool.command(name="create")
@click.argument("name")
@click.option("--member", "members", multiple=True, metavar="USERNAME", help="A user who may train on it (repeat).")
@click.option("--peer", "peers_", multiple=True, metavar="PEER", help="A peer of yours it shares (repeat).")
@json_option
@click.pass_obj
def pool_create(state: State, name: str, members: tuple[str, ...], peers_: tuple[str, ...], as_json: bool) -> None:
    """Create pool NAME sharing --peer peers of yours with --member users."""
    answer = state.api().create_pool(name, list(members), list(peers_))
    if as_json:
        return emit(answer)
    state.console.print(f"pool {name}: {', '.join(answer['peers']) or 'no peers'} shared with "
                        f"{', '.join(answer['members']) or 'no one else'}")


@pool.command(name="delete")
@click.argument("name")
@click.pass_obj
def pool_delete(state: State, name: str) -> None:
    """Delete your pool NAME (its peers stay yours)."""
    state.api().delete_pool(name)
    state.console.print(f"pool {name} deleted")


FEDERATED_ONLY = ("rounds", "local_epochs", "partition", "alpha", "aggregation", "min_peers", "schedule",
                  "buffer_size", "max_updates", "algorithm", "mu", "server_lr")
SEARCH_ONLY = ("trials", "sampler", "pruner")


def _space(value: str) -> dict[str, Any]:
    """A search space from a JSON file (or JSON text given inline)."""
    text = value if value.lstrip().startswith("{") else None
    if text is None:
        try:
            text = Path(value).read_text()
        except OSError as exc:
            raise click.BadParameter(f"cannot read {value}: {exc.strerror}", param_hint="--search") from None
    try:
        space = json.loads(text)
    except ValueError as exc:
        raise click.BadParameter(f"not valid JSON ({exc})", param_hint="--search") from None
    if not isinstance(space, dict):
        raise click.BadParameter("a search space is a JSON object: setting -> list, range or value",
                                 param_hint="--search")
    return space


def _hyperparameters(hp_json: str | None, num_peers: int, **overrides: Any) -> Any:
    hp: Any = {}
    if hp_json:
        try:
            hp = json.loads(hp_json)
        except ValueError as exc:
            raise click.BadParameter(f"not valid JSON ({exc})", param_hint="--hp") from None
    items = hp if isinstance(hp, list) else [hp]
    if not all(isinstance(item, dict) for item in items):
        raise click.BadParameter("give a JSON object, or a list of one object per peer", param_hint="--hp")
    if isinstance(hp, list) and len(hp) != num_peers:
        raise click.BadParameter(f"a list needs one object per peer ({num_peers}); got {len(hp)}", param_hint="--hp")
    for item in items:
        item.update({k: v for k, v in overrides.items() if v is not None})
    return hp


@main.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--peers", "num_peers", type=click.IntRange(min=1), required=True, help="How many peers train.")
@click.option("--mode", type=click.Choice(["sweep", "federated"]), default="sweep", show_default=True)
@click.option("--epochs", type=click.IntRange(min=1), help="Sweep: epochs for every peer (1 to 1000; default 10).")
@click.option("--lr", "learning_rate", type=click.FloatRange(min=0, min_open=True),
              help="Learning rate for every peer (above 0, at most 10; default 0.001).")
@click.option("--batch-size", type=click.IntRange(min=1), help="Batch size for every peer (1 to 65536; default 64).")
@click.option("--hp", "hp_json", metavar="JSON",
              help='Hyperparameters: one object for every peer, or a list with one per peer, e.g. '
                   '\'[{"learning_rate": 0.01}, {"learning_rate": 0.001}]\'. Known: batch_size, epochs, '
                   'learning_rate, hidden (up to 8 layers of 1 to 4096 units; default [128, 64]), optimizer '
                   '(adam, sgd), dropout (0 to 0.9).')
@click.option("--target", help="The target column (default: label).")
@click.option("--features", metavar="A,B,...", help="Feature columns (default: all but the target).")
@click.option("--task", type=click.Choice(["classification", "regression"]))
@click.option("--rounds", type=click.IntRange(min=1), help="Federated: rounds.")
@click.option("--local-epochs", type=click.IntRange(min=1), help="Federated: epochs per peer per round.")
@click.option("--partition", type=click.Choice(["iid", "label_skew"]), help="Federated: how data is split.")
@click.option("--alpha", type=click.FloatRange(min=0, min_open=True),
              help="Federated label skew: smaller is more skewed.")
@click.option("--aggregation", type=click.Choice(["fedavg", "median", "trimmed_mean"]), help="Federated.")
@click.option("--algorithm", type=click.Choice(["fedavg", "fedavgm", "fedadam", "fedyogi", "fedprox", "scaffold"]),
              help="Federated: how the peers' work becomes the global model (default fedavg, scaffold with "
                   "--partition label_skew; see docs/operations.md).")
@click.option("--mu", type=click.FloatRange(min=0, max=10, min_open=True),
              help="Federated, fedprox: the proximal term's weight (above 0, at most 10; default 0.01).")
@click.option("--server-lr", type=click.FloatRange(min=0, max=10, min_open=True),
              help="Federated, fedavgm/fedadam/fedyogi: the server optimizer's step.")
@click.option("--min-peers", type=click.IntRange(min=1), help="Federated: a round goes on with this many.")
@click.option("--schedule", type=click.Choice(["sync", "async"]),
              help="Federated: rounds (sync), or each update folded in as it comes (async).")
@click.option("--buffer-size", type=click.IntRange(min=1), help="Async: updates folded together.")
@click.option("--max-updates", type=click.IntRange(min=1), help="Async: tasks handed out in all.")
@click.option("--time-budget", type=click.IntRange(min=1), metavar="SECONDS",
              help="Async: no task is handed out after this. Search: no trial is begun or continued after this.")
@click.option("--search", "space", metavar="FILE",
              help='Sweep: search this space (a JSON file, or JSON text): setting -> list of values, range '
                   '{"low": …, "high": …, "log": true}, or one value, e.g. \'{"learning_rate": {"low": 1e-4, '
                   '"high": 0.1, "log": true}, "batch_size": [32, 64, 128]}\'. Without --search and --hp a sweep '
                   'searches a default space (learning rate, batch size, layers, weight decay, dropout).')
@click.option("--trials", type=click.IntRange(min=1, max=1000),
              help="Search: configurations to try in all (at least --peers, at most 1000; default 4 x --peers).")
@click.option("--sampler", type=click.Choice(["tpe", "random"]), help="Search: how trials are chosen (default tpe).")
@click.option("--pruner", type=click.Choice(["asha", "median", "none"]),
              help="Search: how losing trials are stopped early (default asha: successive halving).")
@click.option("--pool", help="Whose peers train it: public (default: the platform's and those shared with everyone), "
                             "mine (only your own), or a pool you own or belong to (`peertrain pool list`).")
@click.option("--detach", is_flag=True, help="Print the session's id and return instead of watching it.")
@json_option
@click.pass_obj
def start(state: State, file: Path, num_peers: int, mode: str, epochs: int | None, learning_rate: float | None,
          batch_size: int | None, hp_json: str | None, target: str | None, features: str | None, task: str | None,
          space: str | None, detach: bool, as_json: bool, **options: Any) -> None:
    """Start a session on a CSV and watch it.

    FILE is a CSV with a header row. A sweep without --hp searches (--search, or a default space): trials
    on the peers, the losing ones stopped early, a ranked table of them at the end. The command follows
    the session to its end (exit status 0 when it COMPLETED, 1 otherwise) unless --detach is given.
    """
    given = {k: v for k, v in options.items() if v is not None}
    # Settings given with --hp (and no --search) are run as given; otherwise a sweep searches.
    searching = mode == "sweep" and (space is not None or not hp_json)
    wrong = [k for k in given if (mode == "sweep" and k in FEDERATED_ONLY) or (k in SEARCH_ONLY and not searching)
             or (k == "time_budget" and not searching and options.get("schedule") != "async")]
    if wrong:
        names = ", ".join("--" + k.replace("_", "-") for k in wrong)
        raise click.UsageError(f"{names}: only for --mode federated" if wrong[0] in FEDERATED_ONLY
                               else f"{names}: only for sweeps that search (--search, or no --hp)")
    if mode == "federated" and epochs is not None:
        raise click.UsageError("--epochs is for sweeps: a federated session trains --rounds × --local-epochs")
    if space is not None and mode != "sweep":
        raise click.UsageError("--search: a search is a sweep's (--mode sweep)")
    hp = _hyperparameters(hp_json, num_peers, epochs=epochs, learning_rate=learning_rate, batch_size=batch_size)
    form = {"num_peers": str(num_peers), "mode": mode}
    if hp:
        form["hyperparameters"] = json.dumps(hp)
    if searching:
        # --epochs, --lr, --batch-size are held fixed, and the rest of the default space is searched.
        form["search"] = json.dumps(_space(space) if space is not None else {})
    for key, value in {"target": target, "features": features, "task": task, **given}.items():
        if value is not None:
            form[key] = str(value)
    api = state.api()
    started = api.start(file, form)
    session_id = started["session_id"]
    if detach:
        return emit(started) if as_json else state.console.print(session_id)
    if as_json:
        emit({"event": "started", "id": None, "data": started})
    else:
        state.console.print(f"started session {session_id} on {', '.join(started['assigned_peers'])}")
        state.console.print(f"dashboard: {state.url}/#/sessions/{session_id}")
    _watch(state, api, session_id, as_json)


@main.command(name="watch")
@click.argument("session_id", metavar="ID")
@json_option
@click.pass_obj
def watch_command(state: State, session_id: str, as_json: bool) -> None:
    """Follow a session to its end.

    A progress bar per peer on a terminal; otherwise a line (--json: an object) per event. Exit status 0
    when the session COMPLETED, 1 when it FAILED, was CANCELLED or INTERRUPTED.
    """
    _watch(state, state.api(), session_id, as_json)


@main.command()
@click.argument("session_id", metavar="ID")
@json_option
@click.pass_obj
def logs(state: State, session_id: str, as_json: bool) -> None:
    """A session's events as lines, from its start, followed to its end.

    One line per status change, epoch, round and peer's result (--json: an object per event), as `watch`
    writes to a pipe; the same exit status as `watch`.
    """
    _watch(state, state.api(), session_id, as_json, lines=True)


def _watch(state: State, api: Api, session_id: str, as_json: bool, lines: bool = False) -> None:
    try:
        status = watch(api, session_id, display_for(state.console, as_json, lines=lines))
    except KeyboardInterrupt:
        click.echo(f"\nstopped watching; the session goes on (peertrain watch {session_id})", err=True)
        status = None
    if status == "INTERRUPTED":
        click.echo(f"the platform stopped under it; go on with: peertrain resume {session_id}", err=True)
    ctx = click.get_current_context()
    ctx.exit(INTERRUPTED if status is None else 0 if status == COMPLETED else 1)


@main.command()
@json_option
@click.pass_obj
def sessions(state: State, as_json: bool) -> None:
    """Your sessions, newest first."""
    answer = state.api().sessions()
    if as_json:
        return emit(answer)
    table = Table("id", "created", "status", "mode", "dataset", "peers", box=box.SIMPLE)
    for s in answer["items"]:
        table.add_row(s["id"], _local(s["created_at"]), s["status"], s["mode"], s["filename"], str(s["num_peers"]))
    state.console.print(table)


@main.command()
@click.argument("session_id", metavar="ID")
@json_option
@click.pass_obj
def show(state: State, session_id: str, as_json: bool) -> None:
    """One session with each peer's progress."""
    s = state.api().session(session_id)
    if as_json:
        return emit(s)
    out = state.console
    out.print(f"session {s['id']}: {s['status']}" + (f" ({s['reason']})" if s.get("reason") else ""))
    out.print(f"{s['mode']} on {s['dataset']['filename']} ({s['dataset']['rows']} rows), target {s['target']}")
    table = Table("peer", "status", "epoch", "metrics", "error", box=box.SIMPLE)
    for p in s["peers"]:
        table.add_row(p["name"], p["status"], f"{p.get('epoch', 0)}/{p.get('epochs') or '?'}", metrics(p),
                      p.get("error") or "")
    out.print(table)
    if s.get("search"):
        out.print(trials_table(state.api().trials(s["id"])))
    if result(s):
        out.print(result(s))
    if s.get("model_available"):
        out.print(f"model: peertrain model {s['id']}   (writes peertrain-{s['id']}.safetensors)")


@main.command()
@click.argument("session_id", metavar="ID")
@json_option
@click.pass_obj
def cancel(state: State, session_id: str, as_json: bool) -> None:
    """Stop a pending or running session."""
    answer = state.api().cancel(session_id)
    if as_json:
        return emit(answer)
    state.console.print(f"cancellation requested for session {session_id}")


@main.command()
@click.argument("session_id", metavar="ID")
@click.option("--detach", is_flag=True, help="Return once it is resumed instead of following it to its end.")
@json_option
@click.pass_obj
def resume(state: State, session_id: str, detach: bool, as_json: bool) -> None:
    """Go on with a session the platform's stop or crash INTERRUPTED, on the peers it had.

    Federated rounds already done are kept; sweep peers go on from their last checkpointed epoch. Then it is
    followed as `watch` follows it (exit status 0 when it COMPLETED), unless --detach."""
    api = state.api()
    answer = api.resume(session_id)
    if detach:
        return emit(answer) if as_json else state.console.print(f"session {session_id} resumed")
    if not as_json:
        state.console.print(f"resumed session {session_id}")
    _watch(state, api, session_id, as_json)


@main.command()
@click.argument("session_id", metavar="ID")
@click.option("-o", "--output", type=click.Path(dir_okay=False, writable=True, path_type=Path),
              help="Where to write the model (a safetensors file). Default: peertrain-ID.safetensors here "
                   "(peertrain-ID-round-N.safetensors with --round).")
@click.option("--round", "round_", type=click.IntRange(min=0),
              help="A federated session's global model after this round (default: the final model).")
@json_option
@click.pass_obj
def model(state: State, session_id: str, output: Path | None, round_: int | None, as_json: bool) -> None:
    """Download a session's model: the final one, or a federated session's after any round."""
    if output is None:
        output = Path(f"peertrain-{session_id}" + (f"-round-{round_}" if round_ is not None else "") + ".safetensors")
    partial = output.with_name(output.name + ".part")
    try:
        with partial.open("wb") as out:
            size = state.api().model(session_id, out, round_)
        partial.replace(output)
    finally:
        partial.unlink(missing_ok=True)
    if as_json:
        return emit({"session_id": session_id, "path": str(output), "bytes": size})
    state.console.print(f"wrote {output} ({size:,} bytes)")
