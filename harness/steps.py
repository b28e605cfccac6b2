"""The coordinator's steps of a federated round, timed where they run (bench/rounds.py --steps).

Each step is a function of the product, wrapped for the run and put back after it: the figures are the
product's own code at work, with a clock around it (wall time and the calling thread's CPU time; the gap
between them is time spent waiting: on the network, the database, or the interpreter's other threads).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import time
from collections.abc import Iterator

# The coordinator's steps of a round, in the order they run: (owner, attribute, label).
STEPS = (
    ("tasks.strategy:Strategy", "record_results", "aggregate: the peers' results and epochs recorded"),
    ("tasks.gate:Gate", "weights", "aggregate: one peer's weights read and checked"),
    ("tasks.federated:Federated", "screen", "aggregate: updates screened on the held-out rows"),
    ("tasks.federated", "combine", "aggregate: screened updates combined"),
    ("tasks.federated:Federated", "put_state", "aggregate: global weights stored"),
    ("models.session", "record_round", "aggregate: round recorded"),
    ("tasks.strategy:RoundStrategy", "launch_round", "next round: launched (all below)"),
    ("models.session", "next_round", "  its tasks recorded"),
    ("tasks.federated:SyncFederated", "specs", "  its tasks' specs and grants"),
    ("tasks.relay", "send", "  its chord sent"),
    ("tasks.federated:SyncFederated", "measure", "after the launch: round measured and its model kept"),
    ("tasks.federated:SyncFederated", "aggregate", "the whole aggregate task"),
)


@contextlib.contextmanager
def timed_steps(times: dict[str, list[tuple[float, float]]]) -> Iterator[None]:
    """Wrap each of STEPS for the run: every call's (wall, thread CPU) seconds go to `times[label]`."""
    undo = []
    for where, name, label in STEPS:
        owner = owner_of(where)
        original = owner.__dict__[name]  # as the module or class holds it (a class's own, not inherited)

        def wrapper(*args, __original=original, __label=label, **kwargs):
            wall, cpu = time.perf_counter(), time.thread_time()
            try:
                return __original(*args, **kwargs)
            finally:
                times.setdefault(__label, []).append((time.perf_counter() - wall, time.thread_time() - cpu))

        setattr(owner, name, functools.wraps(original)(wrapper))
        undo.append((owner, name, original))
    try:
        yield
    finally:
        for owner, name, original in undo:
            setattr(owner, name, original)


def owner_of(where: str):
    """The module, or the class in it ("module:Class"), that holds a step's function."""
    module, _, cls = where.partition(":")
    found = importlib.import_module(module)
    return getattr(found, cls) if cls else found
