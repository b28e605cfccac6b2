"""Throttling sign-in and sign-up per client address and per account (Flask-Limiter).

The client address is the connection's, or, behind TRUSTED_PROXIES proxies, the one the nearest of
them appended to X-Forwarded-For (werkzeug's ProxyFix, applied in create_app): a client cannot
choose its own by sending the header.
"""

from __future__ import annotations

import hashlib
import math
import time

import flask
import limits
from flask import Flask, current_app, request
from flask_limiter import Limiter, RateLimitExceeded
from flask_limiter.util import get_remote_address

from models.user import fold
from webapp.errors import payload

LIMITER = "peertrain.limiter"  # Flask-Limiter keeps its own set under "limiter"
# The answers that count against an account: a wrong password, a name or email already taken.
FAILED = (401, 409)


def _account() -> str:
    body = request.get_json(silent=True)
    email = body.get("email") if isinstance(body, dict) else None
    # Hashed: the key stays short whatever was sent, and the counter store holds no addresses.
    return "account:" + hashlib.sha256(fold(str(email)).strip().encode()).hexdigest()


def _no_account() -> bool:
    body = request.get_json(silent=True)
    return not (isinstance(body, dict) and isinstance(body.get("email"), str))


def _checked(setting: str, value: str) -> str:
    try:
        limits.parse_many(value)
    except ValueError:
        raise ValueError(f"{setting} must be a rate such as 5/minute or 5/minute;20/hour, got {value!r}") from None
    return value


def init_app(app: Flask, blueprint: flask.Blueprint) -> Limiter:
    """Throttle every route of `blueprint` (the accounts routes) with the app's settings."""
    limiter = Limiter(
        get_remote_address,
        storage_uri=app.config["RATE_LIMIT_STORAGE_URL"],
        strategy="moving-window",
        # Redis gone: each process keeps counting on its own rather than failing every sign-in.
        in_memory_fallback_enabled=True,
        key_prefix="peertrain",
    )
    per_address = _checked("AUTH_LIMIT_PER_ADDRESS", app.config["AUTH_LIMIT_PER_ADDRESS"])
    per_account = _checked("AUTH_LIMIT_PER_ACCOUNT", app.config["AUTH_LIMIT_PER_ACCOUNT"])
    limiter.limit(per_address, error_message=lambda: _message("from your address"))(blueprint)
    limiter.limit(per_account, key_func=_account, exempt_when=_no_account,
                  deduct_when=lambda response: response.status_code in FAILED,
                  error_message=lambda: _message("that failed for this account"))(blueprint)
    limiter.init_app(app)
    app.extensions[LIMITER] = limiter
    app.register_error_handler(RateLimitExceeded, _too_many)
    return limiter


def _retry_after() -> int:
    limit = current_app.extensions[LIMITER].current_limit
    return max(1, math.ceil(limit.window.reset_time - time.time())) if limit is not None else 60


def _message(whose: str) -> str:
    return f"too many attempts {whose}; try again in {_retry_after()} s (the Retry-After header)"


def _too_many(error: RateLimitExceeded):
    response = flask.jsonify(payload(429, error.description))
    response.status_code = 429
    response.headers["Retry-After"] = str(_retry_after())
    return response
