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
    return subprocess.run([str(PEERTRAIN), *args], capture_output=True, text=True, env=environment, timeout=60,
                          stdin=subprocess.DEVNULL, check=False)


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
        (["start", str(WINE), "--peers", "2"], "not signed in to http://127.0.0.1:8000"),
        (["sessions"], "run `peertrain login --email EMAIL` first"),
        (["login", "--email", "ann@example.com"], "give --password or set PEERTRAIN_PASSWORD"),
        (["model", "abc"], "Missing option '-o'"),
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
