"""The protocol's messages: what a peer reports is reduced to what the schemas know, what it is sent is checked."""

from __future__ import annotations

import pytest

from tasks import protocol
from trainer.limits import LimitError


def test_a_result_is_reduced_to_known_fields_and_in_range_epochs():
    reported = {
        "peer": "someone-else", "round": 7, "samples": 10**12, "weights_url": "s3://elsewhere/w",
        "final": {"epoch": 2, "loss": 0.5, "val_accuracy": 0.9, "extra": "x"},
        "history": [{"epoch": 1, "loss": 1.0}, {"epoch": 2, "loss": "abc"}, {"epoch": 2, "loss": 0.4},
                    {"epoch": 999, "loss": 0.0}, "junk", {"epoch": 1, "loss": 9.9}],
        "bytes_fetched": 123, "seconds": 1.5, "stopped": False, "device": "cpu",
    }
    clean = protocol.train_result(reported, epochs=2)
    # Who it is from, how much it counts and where its weights are: not a peer's say.
    assert set(clean) == {"final", "history", "bytes_fetched", "seconds", "stopped", "device"}
    assert "extra" not in clean["final"]
    # One entry per epoch in range, the first one seen; values that are not numbers become None.
    assert [(h["epoch"], h["loss"]) for h in clean["history"]] == [(1, 1.0), (2, None)]
    assert clean["final"]["epochs"] == 2 and clean["bytes_fetched"] == 123 and clean["stopped"] is False


def test_anything_that_is_not_a_result_becomes_an_empty_stopped_one():
    for junk in (None, "x", [], {"history": "x", "final": [1], "bytes_fetched": -5, "seconds": float("inf")},
                 {"bytes_fetched": True, "stopped": "no", "history": [{"epoch": True}, {"epoch": 1.0}]}):
        clean = protocol.train_result(junk, epochs=3)
        assert clean["history"] == [] and clean["final"] == {} and clean["stopped"] is True
        assert clean["bytes_fetched"] == 0 and clean["seconds"] == 0.0


def test_a_failure_is_described_as_bounded_plain_text():
    described = protocol.describe_failure({"exc_type": "ValueError", "exc_message": ["bad", "spec"]})
    assert described == "ValueError: bad spec"
    text = protocol.describe_failure({"exc_type": "X", "exc_message": "\x1b[31m" + "a" * 5000})
    assert len(text) == 500 and "\x1b" not in text


def spec(**changes):
    base = {"session": "s", "round": 3, "seed": 1, "target": "label", "features": ["a"], "task": "classification",
            "hyperparameters": {"epochs": 2}, "data": "http://x/d", "data_id": "d", "weights": "http://x/w",
            "unknown": "ignored"}
    return {**base, **changes}


def test_a_peer_checks_its_spec_before_training():
    checked = protocol.train_spec(spec())
    assert checked["hyperparameters"]["epochs"] == 2 and checked["hyperparameters"]["batch_size"] == 64
    assert "unknown" not in checked and checked["keep_data"] is False and checked["initial_weights"] is None
    # An asynchronous session numbers its tasks one by one: far past any round count.
    assert protocol.train_spec(spec(round=250_000))["round"] == 250_000


@pytest.mark.parametrize(("changes", "named"), [
    ({"round": -1}, "round"), ({"round": True}, "round"), ({"seed": 2**40}, "seed"), ({"task": "magic"}, "task"),
    ({"features": "a,b"}, "features"), ({"data": ""}, "data"), ({"hyperparameters": {"epochs": 10**6}}, "epochs"),
    ({"hyperparameters": {"shell": "rm -rf /"}}, "shell"),
])
def test_a_spec_out_of_bounds_is_refused_naming_the_field(changes, named):
    with pytest.raises(LimitError, match=named):
        protocol.train_spec(spec(**changes))
    with pytest.raises(LimitError):
        protocol.train_spec(["not", "an", "object"])


def test_a_task_id_names_its_session_and_round():
    task = protocol.TaskId.new("abc", 7)
    assert protocol.TaskId.parse(str(task)) == task and task.session == "abc" and task.round == 7
    for bad in (None, 5, "", "a:b:c", "a:1", "a:1:", ":1:x", "a:-1:x"):
        assert protocol.TaskId.parse(bad) is None


@pytest.mark.parametrize(("text", "name"), [("peer.a", "a"), ("peer.gpu-1", "gpu-1"), ("guest", None), (None, None),
                                            ("peer.", None), ("peer.a b", None)])
def test_peer_names_come_from_broker_users(text, name):
    assert protocol.peer_of(text) == name


@pytest.mark.parametrize(("hostname", "name"), [("peer.a@host", "a"), ("peer.gpu-1@x.y", "gpu-1"),
                                                ("coordinator@host", None), ("peer.@host", None), (None, None)])
def test_peer_names_come_from_worker_hostnames(hostname, name):
    assert protocol.peer_of_worker(hostname) == name


def test_one_name_makes_a_peers_queue_worker_and_login():
    assert protocol.task_queue("a") == "peer.a" and protocol.broker_user("a") == "peer.a"
    # A deployment on a virtual host of its own scopes its logins (a broker's users are shared by every vhost).
    assert protocol.broker_user("a", "staging") == "peer.a@staging"
    assert protocol.peer_of("peer.a@staging") == protocol.peer_of("peer.a") == "a"
    assert protocol.peer_of("guest") is None and protocol.peer_of("peer.a.b@x") is None
    assert protocol.peer_of_worker(protocol.worker_name("a", "h")) == "a"
    assert f"-Q {protocol.task_queue('a')} -n {protocol.worker_name('a')}" in protocol.worker_command("a")


def test_a_heartbeat_with_values_that_are_not_numbers_is_refused():
    beat = {"uuid": "t", "session": "s", "peer": "a", "round": 0, "epoch": 1, "loss": 0.5, "other": "x"}
    assert protocol.heartbeat(beat)["loss"] == 0.5
    for bad in ({"loss": "lots"}, {"loss": float("nan")}, {"epoch": 0}, {"epoch": 1.5}, {"round": True}):
        with pytest.raises(ValueError):
            protocol.heartbeat({**beat, **bad})
