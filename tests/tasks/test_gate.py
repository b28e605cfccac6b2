"""The trust gate: what a peer sends is believed only as far as the platform's own records back it."""

from __future__ import annotations

import pytest
import torch

from models import assignment as assignments
from models import utcnow
from tasks import protocol
from tasks.gate import Dropped, Gate, Outcome
from tasks.services import FrozenClock
from tasks.storage import LocalStorage
from trainer.model import ModelConfig, SimpleDNN
from trainer.weights import state_to_bytes

CONFIG = ModelConfig(4, 2, (8,), 0.0, "classification")


@pytest.fixture
def gate(db, tmp_path) -> Gate:
    assignments.record([{"_id": "s:0:a", "session_id": "5f0000000000000000000001", "peer": "a", "round": 0,
                         "epochs": 2, "position": 0, "chord": None, "sent_at": utcnow(), "deadline": None}])
    return Gate(LocalStorage(tmp_path), FrozenClock())


def result(task_id="s:0:a", status="SUCCESS", **fields):
    history = [{"epoch": 1, "loss": 0.5}, {"epoch": 2, "loss": 0.4}]
    return protocol.result_message(task_id, status, {"final": history[-1], "history": history, "stopped": False,
                                                     **fields})


@pytest.mark.parametrize(("user", "size", "payload", "why"), [
    ("guest", 10, result(), "not from a peer"),  # the platform's own login, or anyone unstamped
    (None, 10, result(), "not from a peer"),
    ("peer.a", protocol.MAX_RESULT_BYTES + 1, result(), "too large"),
    ("peer.a", 10, {"task_id": "s:0:a", "status": "DONE"}, "malformed"),
    ("peer.a", 10, ["s:0:a"], "malformed"),
    ("peer.a", 10, result("s:0:zzz"), "unknown task"),  # a task the coordinator never sent
    ("peer.b", 10, result(), "not its task"),  # a's task, reported by b
])
def test_a_result_not_backed_by_the_platforms_records_is_dropped(gate, user, size, payload, why):
    with pytest.raises(Dropped) as dropped:
        gate.report(user, size, payload)
    assert dropped.value.reason == why


def test_a_peer_cannot_make_its_result_read_as_another_verdict(gate):
    """A result dressed as a "left out" verdict (or naming another peer, round or sample count) is still a
    trained result of the task the coordinator sent, as the coordinator recorded it."""
    assignment, outcome = gate.report("peer.a", 10, result(kind="left_out", reason="x", peer="b", round=9,
                                                           samples=10**12))
    assert (outcome.kind, outcome.peer, outcome.round, outcome.task) == ("trained", "a", 0, "s:0:a")
    assert outcome.reason is None and set(outcome.result) == {"final", "history", "bytes_fetched", "seconds",
                                                             "stopped", "device"}
    failed = gate.report("peer.a", 10, protocol.result_message("s:0:a", "FAILURE", {"exc_type": "OSError"}))[1]
    assert failed.left_out and failed.reason == "failed: OSError"
    assert gate.report("peer.a", 10, protocol.result_message("s:0:a", "STARTED", None)) is None


def test_an_outcome_passed_between_the_coordinators_tasks_is_one_the_gate_made(gate):
    with pytest.raises(ValueError):
        Outcome.from_message({"task": "t", "peer": "a", "round": 0, "left_out": "spoofed"})
    decided = gate.report("peer.a", 10, result())[1]
    assert Outcome.from_message(decided.to_message()) == decided


def test_weights_are_read_where_the_coordinator_put_them_capped_and_checked(gate):
    good = SimpleDNN(CONFIG, seed=0).state_dict()
    gate.storage.put_bytes("w/good", state_to_bytes(good))
    assert set(gate.weights("w/good", CONFIG)) == set(good)
    gate.storage.put_bytes("w/nan", state_to_bytes({k: torch.full_like(v, float("nan")) for k, v in good.items()}))
    gate.storage.put_bytes("w/huge", b"x" * 10_000_000)
    gate.storage.put_bytes("w/shape", state_to_bytes(SimpleDNN(ModelConfig(4, 2, (9,)), seed=0).state_dict()))
    for key in ("w/nan", "w/huge", "w/shape", "w/missing"):
        assert isinstance(gate.weights(key, CONFIG), str), key


def test_a_peers_budget_is_spent_before_its_messages_are_read_and_refills_with_time():
    from tasks.gate import Budget

    now = [0.0]
    budget = Budget(rate=10, burst=20, clock=lambda: now[0])
    assert sum(budget.allow("peer.flood") for _ in range(100)) == 20  # its burst, then nothing
    assert budget.allow("peer.honest")  # another peer's budget is its own
    assert all(budget.allow("guest") for _ in range(1000))  # the platform's own processes are not limited
    now[0] += 1.0
    assert sum(budget.allow("peer.flood") for _ in range(100)) == 10  # ten a second
