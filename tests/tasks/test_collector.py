"""What the coordinator keeps of a peer's reported result: known fields of known types, its own names."""

from __future__ import annotations

from tasks.collector import clean_result, describe_failure


def test_a_result_is_reduced_to_known_fields_named_by_the_coordinator():
    reported = {
        "peer": "someone-else", "round": 7, "samples": 10**12, "weights_url": "s3://elsewhere/w",
        "final": {"epoch": 2, "loss": 0.5, "val_accuracy": 0.9, "extra": "x"},
        "history": [{"epoch": 1, "loss": 1.0}, {"epoch": 2, "loss": "abc"}, {"epoch": 2, "loss": 0.4},
                    {"epoch": 999, "loss": 0.0}, "junk", {"epoch": 1, "loss": 9.9}],
        "bytes_fetched": 123, "seconds": 1.5, "stopped": False, "device": "cpu",
    }
    clean = clean_result(reported, peer="a", round_=0, epochs=2)
    assert clean["peer"] == "a" and clean["round"] == 0
    assert "samples" not in clean and "weights_url" not in clean and "extra" not in clean["final"]
    # One entry per epoch in range, the first one seen; values that are not numbers become None.
    assert [(h["epoch"], h["loss"]) for h in clean["history"]] == [(1, 1.0), (2, None)]
    assert clean["final"]["epochs"] == 2 and clean["bytes_fetched"] == 123 and clean["stopped"] is False


def test_anything_that_is_not_a_result_becomes_an_empty_stopped_one():
    for junk in (None, "x", [], {"history": "x", "final": [1], "bytes_fetched": -5, "seconds": float("inf")}):
        clean = clean_result(junk, peer="a", round_=1, epochs=3)
        assert clean["history"] == [] and clean["final"] == {} and clean["stopped"] is True
        assert clean["bytes_fetched"] == 0 and clean["seconds"] == 0.0


def test_a_failure_is_described_as_bounded_plain_text():
    assert describe_failure({"exc_type": "ValueError", "exc_message": ["bad", "spec"]}) == "ValueError: bad spec"
    text = describe_failure({"exc_type": "X", "exc_message": "\x1b[31m" + "a" * 5000})
    assert len(text) == 500 and "\x1b" not in text
