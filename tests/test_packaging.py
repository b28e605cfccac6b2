"""A contributed machine installs the peer's side alone: `pip install '.[peer]'` brings all the peer worker imports
and none of the server's dependencies."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
SERVER_ONLY = {"flask", "mongoengine", "pymongo", "boto3", "botocore", "granian", "redis", "optuna", "bcrypt",
               "flower", "mongomock"}

# A peer worker process on a machine holding only `allowed` distributions (the others' modules cannot be found):
# its app, the train task and what the task runs, as `peertrain peer run` loads them.
PEER_PROCESS = """
import importlib.abc, json, sys
allowed, providers = json.loads(sys.argv[1]), json.loads(sys.argv[2])

class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        dists = providers.get(name.split(".")[0])
        if dists and not set(dists) & set(allowed):
            raise ModuleNotFoundError(f"No module named {name!r} (not installed on a peer)", name=name)
        return None

sys.meta_path.insert(0, NotInstalled())
import tasks.peer, tasks.training, trainer.loop, trainer.model, trainer.table, trainer.weights, client.cli
from tasks.peer import app
app.loader.import_default_modules()
app.finalize()
print(json.dumps(sorted({name.split(".")[0] for name in sys.modules})))
"""


def _name(requirement: str) -> str:
    return canonicalize_name(Requirement(requirement).name)


def _closure(names: set[str]) -> set[str]:
    """Distributions `names` need, with what they need in turn (their own extras left out)."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for text in metadata.requires(name) or []:
            requirement = Requirement(text)
            # This platform's requirements only, their own extras left out.
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(canonicalize_name(requirement.name))
    return seen


def test_the_peer_extra_brings_everything_the_peer_worker_imports_and_nothing_of_the_servers():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    peer = {_name(r) for r in project["optional-dependencies"]["peer"]} | {_name(r) for r in project["dependencies"]}
    assert not peer & SERVER_ONLY
    allowed = _closure(peer)
    assert not allowed & SERVER_ONLY, "a peer dependency pulls in a server one"

    ours = {"tasks", "trainer", "client", "settings", "celeryconfig"}
    providers = {module: sorted(canonicalize_name(d) for d in dists)
                 for module, dists in metadata.packages_distributions().items() if module not in ours}
    done = subprocess.run([sys.executable, "-c", PEER_PROCESS, json.dumps(sorted(allowed)), json.dumps(providers)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"the peer worker needs what the `peer` extra does not install:\n{done.stderr}"
    loaded = set(json.loads(done.stdout))
    assert "torch" in loaded and "celery" in loaded
    assert not {m for m in loaded if m.lower() in SERVER_ONLY}


def test_the_wheel_carries_the_peer_side():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert {"client", "tasks", "trainer"} <= set(config["packages"])
    assert {"settings", "celeryconfig"} <= set(config["py-modules"])
