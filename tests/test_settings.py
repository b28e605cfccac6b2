"""Settings read from the environment: types, booleans, and errors that name the variable."""

import pytest

from settings import Settings


def test_defaults_work_without_any_environment():
    settings = Settings.from_env({})
    assert settings.port == 8000
    assert settings.peer_keep_memory is True


@pytest.mark.parametrize(("raw", "expected"), [("false", False), ("0", False), (" No ", False), ("on", True),
                                               ("TRUE", True), ("1", True)])
def test_booleans_are_read_as_words(raw, expected):
    assert Settings.from_env({"PEER_KEEP_MEMORY": raw}).peer_keep_memory is expected


@pytest.mark.parametrize(("env", "raw", "named"), [("PEER_KEEP_MEMORY", "maybe", "true or false"),
                                                   ("PORT", "eighty", "int")])
def test_a_bad_value_names_the_variable_and_what_it_must_be(env, raw, named):
    with pytest.raises(ValueError, match=rf"{env} must be {named}, got '{raw}'"):
        Settings.from_env({env: raw})
