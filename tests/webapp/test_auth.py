"""Accounts and tokens through HTTP."""

from __future__ import annotations

from datetime import timedelta

import pytest

from models import User


def test_signup_returns_the_user_without_secrets(client):
    account = {"username": "ann", "email": "Ann@Example.com", "password": "pw-123456"}
    response = client.post("/auth/signup", json=account)
    assert response.status_code == 201
    body = response.json
    assert body["username"] == "ann"
    assert body["email"] == "ann@example.com"
    assert "password" not in body and "password_hash" not in body
    stored = User.objects.get(username="ann")
    assert stored.password_hash.startswith("$2") and "pw-123456" not in stored.password_hash


@pytest.mark.parametrize(
    ("second", "field"),
    [
        ({"username": "ann", "email": "other@example.com"}, "username"),
        ({"username": "bob", "email": "ANN@example.com"}, "email"),
    ],
)
def test_duplicate_username_or_email_is_409(client, second, field):
    first = {"username": "ann", "email": "ann@example.com", "password": "pw-123456"}
    assert client.post("/auth/signup", json=first).status_code == 201
    response = client.post("/auth/signup", json={**second, "password": "pw-123456"})
    assert response.status_code == 409
    assert response.json["status"] == "Conflict"
    assert field in response.json["errors"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"username": "ann", "email": "not-an-email", "password": "pw-123456"}, "email"),
        ({"username": "ann", "email": "ann@example.com", "password": "short"}, "password"),
        ({"email": "ann@example.com", "password": "pw-123456"}, "username"),
        ({"username": "a b", "email": "ann@example.com", "password": "pw-123456"}, "username"),
    ],
)
def test_bad_signup_is_400_naming_the_field(client, body, field):
    response = client.post("/auth/signup", json=body)
    assert response.status_code == 400
    assert list(response.json["errors"]) == [field]
    assert field in response.json["message"]


def test_signin_returns_a_bearer_token(client, signup):
    signup("ann", password="pw-123456")
    response = client.post("/auth/signin", json={"email": "ann@example.com", "password": "pw-123456"})
    assert response.status_code == 200
    assert response.json["token_type"] == "bearer"
    assert response.json["username"] == "ann"
    assert response.json["expires_in"] == 3600
    token = response.json["access_token"]
    assert client.get("/peers", headers={"Authorization": f"Bearer {token}"}).status_code == 200


def test_wrong_password_and_unknown_email_answer_alike(client, signup):
    signup("ann", password="pw-123456")
    wrong = client.post("/auth/signin", json={"email": "ann@example.com", "password": "pw-654321"})
    unknown = client.post("/auth/signin", json={"email": "nobody@example.com", "password": "pw-123456"})
    assert wrong.status_code == unknown.status_code == 401
    assert wrong.json == unknown.json


@pytest.mark.parametrize(
    "header",
    [None, "Bearer", "Bearer not.a.jwt", "Token abc", "Bearer eyJhbGciOiJIUzI1NiJ9.e30.c2lnbmF0dXJl"],
)
def test_missing_or_malformed_token_is_401(client, header):
    headers = {"Authorization": header} if header else {}
    response = client.get("/sessions", headers=headers)
    assert response.status_code == 401
    assert response.json["code"] == 401 and response.json["message"]


def test_expired_token_is_401(client, app, signup):
    from flask_jwt_extended import create_access_token

    signup("ann")
    user = User.objects.get(username="ann")
    with app.app_context():
        token = create_access_token(identity=user, expires_delta=timedelta(seconds=-1))
    response = client.get("/sessions", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 401
    assert "expired" in response.json["message"]


def test_a_refresh_token_gets_new_access_tokens_until_it_expires(client, app, signup):
    """A session outlives an access token: the refresh token sign-in gave gets new ones, and is good for nothing
    else; once it expires too, the user is told to sign in again."""
    from flask_jwt_extended import create_refresh_token

    signup("ann", password="pw-123456")
    answer = client.post("/auth/signin", json={"email": "ann@example.com", "password": "pw-123456"}).json
    assert answer["refresh_expires_in"] == 30 * 86400
    refresh = {"Authorization": f"Bearer {answer['refresh_token']}"}
    renewed = client.post("/auth/refresh", headers=refresh)
    assert renewed.status_code == 200 and renewed.json["username"] == "ann" and renewed.json["expires_in"] == 3600
    assert "refresh_token" not in renewed.json
    access = {"Authorization": f"Bearer {renewed.json['access_token']}"}
    assert client.get("/sessions", headers=access).status_code == 200
    # Each token for its own use: a refresh token reads nothing, an access token refreshes nothing.
    assert client.get("/sessions", headers=refresh).status_code == 401
    assert client.post("/auth/refresh", headers=access).status_code == 401
    with app.app_context():
        old = create_refresh_token(identity=User.objects.get(username="ann"), expires_delta=timedelta(seconds=-1))
    expired = client.post("/auth/refresh", headers={"Authorization": f"Bearer {old}"})
    assert expired.status_code == 401 and expired.json["message"] == "your sign-in expired; sign in again"


def test_token_signed_with_another_secret_is_401(client, app, signup):
    import jwt as pyjwt

    signup("ann")
    user = User.objects.get(username="ann")
    claims = {"sub": str(user.id), "type": "access", "fresh": False}
    forged = pyjwt.encode(claims, "another-secret-that-is-long-enough-for-hs256", "HS256")
    assert client.get("/sessions", headers={"Authorization": f"Bearer {forged}"}).status_code == 401


def test_production_refuses_to_start_without_a_jwt_secret(db):
    from webapp import create_app

    with pytest.raises(RuntimeError, match="JWT_SECRET_KEY"):
        create_app({"PEERTRAIN_ENV": "production", "JWT_SECRET_KEY": "", "MONGODB_URI": db})
    assert create_app({"PEERTRAIN_ENV": "production", "JWT_SECRET_KEY": "s" * 32, "MONGODB_URI": db})


def test_an_internationalised_mailbox_is_400_saying_what_to_use(client):
    account = {"username": "uwe", "email": "ü@exämple.com", "password": "pw-123456"}
    response = client.post("/auth/signup", json=account)
    assert response.status_code == 400, response.json
    assert list(response.json["errors"]) == ["email"]
    assert "before the @" in response.json["message"]
    # The domain alone may be internationalised: it has an ASCII (xn--) form.
    response = client.post("/auth/signup", json={**account, "email": "uwe@exämple.com"})
    assert response.status_code == 201, response.json


def test_a_signed_token_whose_subject_is_not_an_account_id_is_401(client, app):
    import jwt as pyjwt

    claims = {"sub": "not-an-account-id", "type": "access", "fresh": False}
    token = pyjwt.encode(claims, app.config["JWT_SECRET_KEY"], "HS256")
    response = client.get("/peers", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 401, response.json
    assert "sign in again" in response.json["message"]
    assert response.headers["WWW-Authenticate"] == "Bearer"


@pytest.mark.parametrize(
    ("first", "second", "field"),
    [
        ({"username": "CaseUser", "email": "one@example.com"}, {"username": "caseuser", "email": "two@example.com"},
         "username"),
        ({"username": "ann", "email": "Ann@x.com"}, {"username": "bob", "email": "ann@x.com"}, "email"),
    ],
)
def test_names_and_emails_differing_only_in_case_are_409(client, first, second, field):
    assert client.post("/auth/signup", json={**first, "password": "pw-123456"}).status_code == 201
    response = client.post("/auth/signup", json={**second, "password": "pw-123456"})
    assert response.status_code == 409, response.json
    assert list(response.json["errors"]) == [field]


def test_the_database_itself_refuses_a_name_differing_only_in_case(db):
    from mongoengine import NotUniqueError

    User(username="CaseUser", email="one@example.com", password_hash="x").save()
    with pytest.raises(NotUniqueError):
        User(username="caseuser", email="two@example.com", password_hash="x").save()
    with pytest.raises(NotUniqueError):
        User(username="other", email="ONE@example.com", password_hash="x").save()


def test_accounts_stored_before_case_folding_still_sign_in_and_keep_their_names(client, app):
    from webapp import create_app

    account = {"username": "OldTimer", "email": "old@example.com", "password": "pw-123456"}
    assert client.post("/auth/signup", json=account).status_code == 201
    # As earlier versions stored an account: no case-folded key.
    User._get_collection().update_many({}, {"$unset": {"username_key": ""}})
    restarted = create_app({k: app.config[k] for k in ("TESTING", "MONGODB_URI", "STORAGE_URL", "BCRYPT_ROUNDS")})
    client = restarted.test_client()
    signin = client.post("/auth/signin", json={"email": "old@example.com", "password": "pw-123456"})
    assert signin.status_code == 200 and signin.json["username"] == "OldTimer"
    taken = client.post("/auth/signup", json={**account, "username": "oldtimer", "email": "new@example.com"})
    assert taken.status_code == 409, taken.json


def test_a_form_encoded_signin_is_told_to_send_json(client, signup):
    signup("ann", password="pw-123456")
    response = client.post("/auth/signin", data={"email": "ann@example.com", "password": "pw-123456"})
    assert response.status_code == 400
    assert "send JSON" in response.json["message"]
    assert "Content-Type: application/json" in response.json["message"]


@pytest.mark.parametrize(
    "secret",
    ["", "change-me-to-a-long-random-string", "s" * 31, "é" * 15],
    ids=["empty", "placeholder", "31-bytes", "30-bytes-in-15-characters"],
)
def test_production_refuses_a_missing_weak_or_placeholder_secret(db, secret):
    from webapp import create_app

    with pytest.raises(RuntimeError, match="JWT_SECRET_KEY"):
        create_app({"PEERTRAIN_ENV": "production", "JWT_SECRET_KEY": secret, "MONGODB_URI": db})


def test_the_placeholder_refused_is_the_one_env_example_shows():
    from settings import PLACEHOLDER_SECRET, ROOT

    assert f"\nJWT_SECRET_KEY={PLACEHOLDER_SECRET}\n" in (ROOT / ".env.example").read_text()
