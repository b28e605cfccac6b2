"""The limits every training is held to, by the API and by each peer before it trains."""

from __future__ import annotations

import pytest

from trainer.limits import LimitError, check_hyperparameters, check_table_size


def test_defaults_fill_in_what_is_not_given():
    assert check_hyperparameters({"epochs": 3}) == {"batch_size": 64, "epochs": 3, "learning_rate": 0.001,
                                                    "hidden": [128, 64], "optimizer": "adam", "dropout": 0.0,
                                                    "weight_decay": 0.0}


@pytest.mark.parametrize(("hp", "message"), [
    ({"epochs": 10**9}, "epochs must be a whole number from 1 to 1000"),
    ({"epochs": 2.5}, "epochs must be a whole number"),
    ({"epochs": True}, "epochs must be a whole number"),
    ({"hidden": [12000, 12000]}, "each hidden layer must have 1 to 4096 units"),
    ({"hidden": [8] * 9}, "at most 8 layer sizes"),
    ({"hidden": "128"}, "hidden must be a list"),
    ({"batch_size": 0}, "batch_size must be a whole number from 1 to 65536"),
    ({"learning_rate": 0}, "learning_rate must be above 0"),
    ({"learning_rate": float("nan")}, "learning_rate must be a number"),
    ({"dropout": 0.95}, "dropout must be at least 0 and at most 0.9"),
    ({"optimizer": "lbfgs"}, "optimizer must be one of adam, sgd"),
    ({"momentum": 0.9}, "unknown hyperparameter 'momentum'; the known ones are batch_size, epochs"),
])
def test_out_of_range_hyperparameters_are_refused_with_the_reason(hp, message):
    with pytest.raises(LimitError, match=message):
        check_hyperparameters(hp)


def test_a_dataset_too_large_is_refused():
    check_table_size(1000, 10)
    with pytest.raises(LimitError, match="rows"):
        check_table_size(10**8, 10)
    with pytest.raises(LimitError, match="feature columns"):
        check_table_size(10, 10**6)
