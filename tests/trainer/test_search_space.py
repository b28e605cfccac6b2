"""Search spaces: what a user may ask a sweep to vary, refused clearly when it cannot be searched."""

from __future__ import annotations

import pytest

from trainer import search


def test_a_space_of_lists_ranges_and_fixed_values_is_normalised_with_the_rest_fixed():
    space = search.parse({"learning_rate": {"low": 1e-4, "high": 1e-1, "log": True}, "batch_size": [32, 64, 32],
                          "hidden": [[64], [128, 64]], "epochs": {"low": 5, "high": 20}, "optimizer": "sgd"},
                         fixed={"dropout": 0.2})
    assert space["learning_rate"] == {"low": 1e-4, "high": 1e-1, "log": True, "int": False}
    assert space["batch_size"] == {"choices": [32, 64]}  # a value given twice is one choice
    assert space["hidden"] == {"choices": [[64], [128, 64]]}
    assert space["epochs"] == {"low": 5, "high": 20, "log": False, "int": True}
    assert space["optimizer"] == {"value": "sgd"} and space["dropout"] == {"value": 0.2}
    assert space["weight_decay"] == {"value": 0.0}  # the platform's default
    assert search.max_epochs(space) == 20


def test_one_architecture_is_a_fixed_value_and_a_list_of_them_a_choice():
    assert search.parse({"hidden": [128, 64], "batch_size": [16, 32]})["hidden"] == {"value": [128, 64]}


@pytest.mark.parametrize(("space", "message"), [
    ([1, 2], "give the search space as a JSON object"),
    ({"momentum": [0.9]}, "momentum: not a setting a search can vary"),
    ({"learning_rate": {"low": 0.1, "high": 0.01}}, "learning_rate: low (0.1) must be below high (0.01)"),
    ({"learning_rate": {"low": 0.0, "high": 0.1, "log": True}}, "learning_rate: learning_rate must be above 0"),
    ({"weight_decay": {"low": 0.0, "high": 0.1, "log": True}}, "weight_decay: a log range must start above 0"),
    ({"epochs": {"low": 1, "high": 5000}}, "epochs: epochs must be a whole number from 1 to 1000"),
    ({"epochs": {"low": 1.5, "high": 5}}, "epochs: a range of whole numbers"),
    ({"optimizer": {"low": 1, "high": 2}}, "optimizer: give a list of values to choose from"),
    ({"batch_size": []}, "batch_size: the list of values is empty"),
    ({"optimizer": ["adam", "rmsprop"]}, "optimizer: optimizer must be one of adam, sgd"),
    ({"learning_rate": {"low": 0.1}}, 'learning_rate: a range is {"low": …, "high": …, "log": true|false}'),
    ({"epochs": 30}, "the search space varies nothing"),
    ({"batch_size": [64, 64]}, "the search space varies nothing"),
])
def test_a_space_that_cannot_be_searched_is_refused_naming_what_to_change(space, message):
    with pytest.raises(search.SpaceError) as caught:
        search.parse(space)
    assert message in str(caught.value)


def test_the_default_space_varies_several_settings_and_keeps_what_the_user_fixed():
    space = search.default_space()
    varied = [name for name, dimension in space.items() if "value" not in dimension]
    assert set(varied) >= {"learning_rate", "batch_size", "hidden", "weight_decay", "dropout"}
    assert search.default_space({"batch_size": 16})["batch_size"] == {"value": 16}


def test_a_trials_settings_are_the_spaces_fixed_values_and_its_sampled_ones_within_the_limits():
    space = search.parse({"hidden": [[64], [128, 64]], "learning_rate": {"low": 1e-3, "high": 1e-2}})
    hp = search.hyperparameters(space, {"hidden": search.encode("hidden", [64]), "learning_rate": 0.005})
    assert hp["hidden"] == [64] and hp["learning_rate"] == 0.005 and hp["epochs"] == 10


@pytest.mark.parametrize(("epochs", "first", "expected"), [
    (9, 1, [1, 3, 9]), (10, 1, [1, 3, 9, 10]), (100, 4, [4, 12, 36, 100]), (3, 4, [3]),
])
def test_a_trial_pauses_at_the_rungs_below_its_epochs_and_at_its_last(epochs, first, expected):
    assert search.rungs(epochs, first) == expected
    assert search.rungs(epochs, first, pruned=False) == [epochs]


def test_the_first_rung_scores_the_longest_trial_at_most_four_times():
    for epochs in range(1, 1001):
        space = search.parse({"epochs": epochs, "batch_size": [16, 32]})
        assert len(search.rungs(epochs, search.min_resource(space))) <= search.MAX_RUNGS
