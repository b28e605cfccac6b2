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


@pytest.mark.parametrize("secret", ["", "change-me-to-a-long-random-string", "s" * 31])
def test_outside_development_storage_grants_refuse_a_weak_secret_too(secret):
    # The coordinator signs grants with a key derived from JWT_SECRET_KEY: one anyone can derive would let
    # any peer forge a grant for any stored object.
    production = Settings.from_env({"PEERTRAIN_ENV": "production", "JWT_SECRET_KEY": secret})
    with pytest.raises(RuntimeError, match="JWT_SECRET_KEY"):
        production.grant_key  # noqa: B018 - reading it is the check
    assert Settings.from_env({"PEERTRAIN_ENV": "development", "JWT_SECRET_KEY": secret}).grant_key
    assert Settings.from_env({"PEERTRAIN_ENV": "production", "JWT_SECRET_KEY": "s" * 32}).grant_key
