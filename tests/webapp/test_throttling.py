"""Sign-in and sign-up throttling: per account, per client address, and the bounded hashing slots."""

from __future__ import annotations

import uuid

import pytest

from tests import services
from webapp import create_app


@pytest.fixture
def proxied_app(db, storage_dir):
    """The API behind one trusted proxy, which names the client in X-Forwarded-For (compose's nginx)."""

    def make(**config):
        return create_app({"TESTING": True, "MONGODB_URI": db, "STORAGE_URL": str(storage_dir), "BCRYPT_ROUNDS": 4,
                           "TRUSTED_PROXIES": 1, **config})

    return make


def _signin(client, email: str, password: str, address: str):
    return client.post("/auth/signin", json={"email": email, "password": password},
                       headers={"X-Forwarded-For": address})


def _assert_throttled(response) -> None:
    assert response.status_code == 429, response.json
    assert set(response.json) == {"code", "status", "message"}
    assert response.json["status"] == "Too Many Requests"
    retry = int(response.headers["Retry-After"])
    assert 0 < retry <= 60
    assert f"try again in {retry} s" in response.json["message"]


def test_wrong_passwords_for_one_account_are_throttled_from_any_address(client, signup):
    signup("ann", password="pw-123456")
    signup("bob", password="pw-123456")
    answers = [client.post("/auth/signin", json={"email": "ann@example.com", "password": f"guess-{i}"})
               for i in range(6)]
    assert [a.status_code for a in answers] == [401] * 5 + [429]
    _assert_throttled(answers[-1])
    assert "this account" in answers[-1].json["message"]
    # The right password waits too, and the same address may still try another account.
    right = client.post("/auth/signin", json={"email": "ANN@example.com", "password": "pw-123456"})
    assert right.status_code == 429
    other = client.post("/auth/signin", json={"email": "bob@example.com", "password": "pw-123456"})
    assert other.status_code == 200


def test_the_account_limit_follows_the_account_across_addresses(proxied_app):
    client = proxied_app().test_client()
    client.post("/auth/signup", json={"username": "ann", "email": "ann@example.com", "password": "pw-123456"},
                headers={"X-Forwarded-For": "192.0.2.1"})
    codes = [_signin(client, "ann@example.com", "wrong-one", f"198.51.100.{i}").status_code for i in range(6)]
    assert codes == [401] * 5 + [429]


def test_successful_sign_ins_do_not_count_against_the_account(client, signup):
    signup("ann", password="pw-123456")
    attempts = ["wrong"] * 4 + ["pw-123456"] * 3 + ["wrong"]
    codes = [client.post("/auth/signin", json={"email": "ann@example.com", "password": p}).status_code
             for p in attempts]
    assert codes == [401] * 4 + [200] * 3 + [401]


def test_one_address_is_throttled_across_accounts(proxied_app):
    client = proxied_app().test_client()
    codes = [_signin(client, f"user{i}@example.com", "pw-123456", "203.0.113.7").status_code for i in range(21)]
    assert codes == [401] * 20 + [429]
    _assert_throttled(_signin(client, "one-more@example.com", "pw-123456", "203.0.113.7"))
    assert _signin(client, "one-more@example.com", "pw-123456", "203.0.113.8").status_code == 401


def test_a_client_cannot_pick_its_address_with_x_forwarded_for(client, proxied_app):
    # No trusted proxy: the header is ignored, the connection's address counts.
    codes = [_signin(client, f"u{i}@example.com", "pw-123456", f"198.51.100.{i}").status_code for i in range(21)]
    assert codes[-1] == 429
    # One trusted proxy: only the address it appended counts, not what the client put before it.
    behind = proxied_app().test_client()
    codes = [_signin(behind, f"u{i}@example.com", "pw-123456", f"198.51.100.{i}, 203.0.113.9").status_code
             for i in range(21)]
    assert codes[-1] == 429


def test_sign_ups_from_one_address_are_throttled(proxied_app):
    client = proxied_app(AUTH_LIMIT_PER_ADDRESS="3/minute").test_client()
    codes = [client.post("/auth/signup", json={"username": f"user{i}", "email": f"user{i}@example.com",
                                               "password": "pw-123456"},
                         headers={"X-Forwarded-For": "203.0.113.5"}).status_code for i in range(4)]
    assert codes == [201] * 3 + [429]


def test_counters_are_shared_by_api_processes_through_redis(proxied_app):
    services.require(services.redis_up(), "Redis")
    config = {"RATE_LIMIT_STORAGE_URL": services.REDIS_URL, "AUTH_LIMIT_PER_ADDRESS": "4/minute"}
    first, second = proxied_app(**config).test_client(), proxied_app(**config).test_client()
    address = f"unique-{uuid.uuid4().hex}"  # another test run on the same Redis counts its own
    codes = [_signin(client, f"u{i}@example.com", "pw", address).status_code
             for i, client in enumerate([first, second] * 3)]
    assert codes == [401] * 4 + [429] * 2


def test_without_redis_each_process_still_throttles(proxied_app):
    app = proxied_app(RATE_LIMIT_STORAGE_URL="redis://127.0.0.1:1/0", AUTH_LIMIT_PER_ADDRESS="2/minute")
    client = app.test_client()
    codes = [_signin(client, f"u{i}@example.com", "pw", "203.0.113.1").status_code for i in range(3)]
    assert codes == [401, 401, 429]


def test_a_bad_limit_setting_stops_the_api_naming_it(db, storage_dir):
    with pytest.raises(ValueError, match="AUTH_LIMIT_PER_ACCOUNT"):
        create_app({"MONGODB_URI": db, "STORAGE_URL": str(storage_dir), "AUTH_LIMIT_PER_ACCOUNT": "lots"})


def test_a_sign_in_finding_every_hashing_slot_busy_is_503_at_once(app, client, signup, auth):
    from webapp.extensions import passwords

    signup("bob", password="pw-123456")
    with app.app_context(), passwords().slot():  # another sign-in is hashing
        busy = client.post("/auth/signin", json={"email": "bob@example.com", "password": "pw-123456"})
        assert busy.status_code == 503
        assert busy.headers["Retry-After"] == "1"
        assert "try again" in busy.json["message"]
        # The rest of the API goes on meanwhile.
        assert client.get("/peers", headers=auth).status_code == 200
    after = client.post("/auth/signin", json={"email": "bob@example.com", "password": "pw-123456"})
    assert after.status_code == 200
