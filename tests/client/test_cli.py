"""`peertrain` without a server: usage errors exit 2, an unreachable server 1, no server code loads."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from settings import ROOT

WINE = ROOT / "samples" / "wine.csv"
PEERTRAIN = Path(sys.executable).with_name("peertrain")  # installed by `make build`


def run(*args: str, home: Path, **env: str) -> subprocess.CompletedProcess[str]:
    assert PEERTRAIN.exists(), "the peertrain command is missing: run `make build`"
    environment = {k: v for k, v in os.environ.items() if not k.startswith("PEERTRAIN_")}
    environment.update(XDG_CONFIG_HOME=str(home), HOME=str(home), **env)
    # In `home`: what a command writes where it runs (a downloaded model) stays in the test's directory.
    return subprocess.run([str(PEERTRAIN), *args], capture_output=True, text=True, env=environment, timeout=60,
                          stdin=subprocess.DEVNULL, check=False, cwd=home)


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["start", "no-such.csv", "--peers", "2"], "does not exist"),
        (["start", str(WINE)], "Missing option '--peers'"),
        (["start", str(WINE), "--peers", "0"], "--peers"),
        (["start", str(WINE), "--peers", "2", "--hp", "{bad"], "not valid JSON"),
        (["start", str(WINE), "--peers", "2", "--hp", '[{"epochs": 2}]'], "one object per peer (2); got 1"),
        (["start", str(WINE), "--peers", "2", "--mode", "federated", "--epochs", "3"], "--epochs is for sweeps"),
        (["start", str(WINE), "--peers", "2", "--rounds", "3"], "--rounds: only for --mode federated"),
        (["start", str(WINE), "--peers", "2", "--schedule", "async"], "--schedule: only for --mode federated"),
        (["start", str(WINE), "--peers", "2", "--algorithm", "fedprox", "--mu", "0.1"],
         "--algorithm, --mu: only for --mode federated"),
        (["start", str(WINE), "--peers", "2", "--mode", "federated", "--algorithm", "scaffolding"], "--algorithm"),
        (["start", str(WINE), "--peers", "2", "--hp", "{}", "--trials", "4"],
         "--trials: only for sweeps that search (--search, or no --hp)"),
        (["start", str(WINE), "--peers", "2", "--mode", "federated", "--search", "{}"], "a search is a sweep's"),
        (["start", str(WINE), "--peers", "2", "--search", "no-such.json"], "cannot read no-such.json"),
        (["start", str(WINE), "--peers", "2", "--search", "[1]"], "cannot read"),
        (["start", str(WINE), "--peers", "2", "--search", "{bad"], "not valid JSON"),
        (["start", str(WINE), "--peers", "2", "--trials", "1001"], "--trials"),
        (["start", str(WINE), "--peers", "2"], "not signed in to http://127.0.0.1:8000"),
        (["sessions"], "run `peertrain login --email EMAIL` first"),
        (["login", "--email", "ann@example.com"], "give --password or set PEERTRAIN_PASSWORD"),
        (["ls"], "run `peertrain login --email EMAIL` first"),  # = sessions
        (["list"], "run `peertrain login --email EMAIL` first"),
        (["log", "abc"], "run `peertrain login --email EMAIL` first"),  # = logs
        (["logs"], "Missing argument 'ID'"),
        (["launch"], "No such command 'launch'"),
    ],
)
def test_usage_errors_exit_2_and_say_what_is_wrong(tmp_path, args, says):
    done = run(*args, home=tmp_path)
    assert done.returncode == 2, done
    assert says in done.stderr
    assert done.stdout == ""


def test_an_unreachable_server_exits_1_with_one_line(tmp_path):
    done = run("--url", "http://127.0.0.1:9", "login", "--email", "ann@example.com", "--password", "x" * 8,
               home=tmp_path)
    assert done.returncode == 1
    assert done.stderr.startswith("error: cannot reach http://127.0.0.1:9")
    assert "Traceback" not in done.stderr


def test_the_cli_loads_none_of_the_servers_code():
    # What `pip install .` on a laptop gets must be enough: the CLI imports the server's packages nowhere.
    code = ("import sys, client.cli, client.watch; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'trainer', 'models', 'tasks', 'webapp', "
            "'settings', 'flask', 'celery', 'mongoengine', 'torch', 'numpy', 'pandas', 'boto3'}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert done.stdout.strip() == "[]"


def test_a_laptop_install_gets_the_versions_the_platform_is_tested_with():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"] == {"peertrain": "client.cli:main"}
    pinned = {line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()}
    for requirement in project["dependencies"]:
        assert requirement in pinned, f"{requirement} differs from requirements.txt"


def test_help_says_the_platforms_limits_and_the_other_names(tmp_path):
    from trainer.limits import MAX_BATCH_SIZE, MAX_DROPOUT, MAX_EPOCHS, MAX_HIDDEN_LAYERS, MAX_HIDDEN_UNITS

    start = " ".join(run("start", "--help", home=tmp_path).stdout.split())  # as wrapped for 100 columns
    for limit in (f"1 to {MAX_EPOCHS}", f"1 to {MAX_BATCH_SIZE}", f"up to {MAX_HIDDEN_LAYERS} layers of 1 to "
                  f"{MAX_HIDDEN_UNITS} units", f"dropout (0 to {MAX_DROPOUT:g})"):
        assert limit in start, limit
    top = " ".join(run("--help", home=tmp_path).stdout.split())
    assert "ls = sessions, list = sessions, log = logs" in top
    assert "Usage: peertrain sessions" in run("ls", "--help", home=tmp_path).stdout



def test_signup_checks_the_password_before_asking_for_it_again(tmp_path):
    import pty
    import select
    import time

    environment = {k: v for k, v in os.environ.items() if not k.startswith("PEERTRAIN_")}
    environment.update(XDG_CONFIG_HOME=str(tmp_path), HOME=str(tmp_path))
    terminal, its_end = pty.openpty()  # a terminal, so that it asks
    process = subprocess.Popen([str(PEERTRAIN), "--url", "http://127.0.0.1:9", "signup", "--email", "ann@example.com"],
                               stdin=its_end, stdout=its_end, stderr=its_end, env=environment, cwd=tmp_path)
    os.close(its_end)
    seen = b""

    def until(text: str) -> None:
        """Wait for `text`, then forget what came up to it (what came after, in the same read, is kept)."""
        nonlocal seen
        deadline = time.monotonic() + 20
        while text.encode() not in seen:
            assert time.monotonic() < deadline, seen.decode(errors="replace")
            if select.select([terminal], [], [], 0.2)[0]:
                seen += os.read(terminal, 4096)
        seen = seen.split(text.encode(), 1)[1]

    try:
        until("Password (8 to 256 characters): ")
        os.write(terminal, b"short\n")
        until("a password needs 8 to 256 characters; this one has 5")
        until("Password (8 to 256 characters): ")  # asked again, not "repeat it"
        os.write(terminal, b"correct horse\n")
        until("Repeat it: ")
        os.write(terminal, b"correct horse\n")
        until("error: cannot reach http://127.0.0.1:9")  # only then does it call the server
        assert process.wait(20) == 1
    finally:
        process.kill()
        process.wait()
        os.close(terminal)
