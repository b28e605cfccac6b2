"""Every error the API returns, in one JSON shape: {"code", "status", "message", "errors"?}."""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

import flask_smorest
from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException, InternalServerError, MethodNotAllowed, RequestEntityTooLarge

from webapp import outages
from webapp.extensions import jwt
from webapp.passwords import Busy

log = logging.getLogger(__name__)

# Where webargs found a field; a user only needs the field.
LOCATIONS = ("json", "form", "files", "query", "multipart")


def payload(code: int, message: str, errors: dict[str, Any] | None = None) -> dict[str, Any]:
    """The error body for status `code`."""
    body: dict[str, Any] = {"code": code, "status": HTTPStatus(code).phrase, "message": message}
    if errors:
        body["errors"] = errors
    return body


def _flatten(errors: Any, prefix: str = "") -> list[str]:
    # {"form": {"num_peers": ["Missing data."]}} -> ["num_peers: Missing data."]: the location is noise to a user.
    if isinstance(errors, dict):
        out: list[str] = []
        for key, value in errors.items():
            name = "" if key in LOCATIONS and not prefix else f"{prefix}{key}"
            out.extend(_flatten(value, f"{name}." if name else ""))
        return out
    if isinstance(errors, list) and all(isinstance(e, str) for e in errors):
        return [f"{prefix.rstrip('.')}: {' '.join(errors)}" if prefix else " ".join(errors)]
    if isinstance(errors, list):
        return [m for e in errors for m in _flatten(e, prefix)]
    return [f"{prefix.rstrip('.')}: {errors}" if prefix else str(errors)]


def handle_http_exception(error: HTTPException):
    code = error.code or 500
    if code == 304:
        return _not_modified()
    data = getattr(error, "data", None) or {}
    errors = data.get("errors") or data.get("messages")
    if isinstance(error, InternalServerError):
        original = getattr(error, "original_exception", None)
        if original is not None:
            log.error("unhandled error", exc_info=original)
        # Never a stack trace, nor an exception's text, to a client.
        message = "internal error; it has been logged"
    elif "message" in data:
        message = data["message"]
    elif errors:
        message = "invalid request: " + "; ".join(_flatten(errors))
    else:
        message = error.description or HTTPStatus(code).phrase
    if code == 413 and "message" not in data and error.description == RequestEntityTooLarge.description:
        message = "the upload is larger than this server accepts"
    response = jsonify(payload(code, message, _strip_locations(errors) if errors else None))
    response.status_code = code
    # The exception's own headers: a 405's Allow (RFC 9110), a 401's WWW-Authenticate.
    for name, value in error.get_headers():
        if name.lower() != "content-type":
            response.headers[name] = value
    for name, value in (data.get("headers") or {}).items():
        response.headers[name] = value
    if isinstance(error, MethodNotAllowed) and error.valid_methods:
        response.headers["Allow"] = ", ".join(sorted(error.valid_methods))
    return response


def _not_modified() -> Response:
    # flask-smorest's ETag check (@blp.etag) found the client's copy current: no body, and the tag it
    # sent back (RFC 9110 wants the ETag on a 304).
    response = Response(status=304)
    tags = list(request.if_none_match.as_set())
    if len(tags) == 1:
        response.set_etag(tags[0])
    return response


def _strip_locations(errors: dict[str, Any]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for key, value in errors.items():
        if key in LOCATIONS and isinstance(value, dict):
            merged.update(value)
        else:
            merged[key] = value
    return merged


def _unauthorized(message: str):
    response = jsonify(payload(401, message))
    response.status_code = 401
    response.headers["WWW-Authenticate"] = "Bearer"
    return response


@jwt.unauthorized_loader
def _missing_token(reason: str):
    return _unauthorized(f"missing access token: {reason}")


@jwt.invalid_token_loader
def _invalid_token(reason: str):
    return _unauthorized(f"invalid access token: {reason}")


@jwt.expired_token_loader
def _expired_token(header: dict, data: dict):
    if data.get("type") == "refresh":
        return _unauthorized("your sign-in expired; sign in again")
    return _unauthorized("the access token has expired; get a new one with the refresh token "
                         "(POST /auth/refresh), or sign in again")


@jwt.revoked_token_loader
def _revoked_token(header: dict, data: dict):
    return _unauthorized("the access token has been revoked; sign in again")


@jwt.token_verification_failed_loader
def _foreign_token(header: dict, data: dict):
    return _unauthorized("invalid access token: it names no account of this server; sign in again")


@jwt.user_lookup_error_loader
def _user_gone(header: dict, data: dict):
    response = jsonify(payload(404, "the user of this token no longer exists"))
    response.status_code = 404
    return response


def init_app(app: Flask, api: flask_smorest.Api) -> None:
    # smorest registered its own handler for HTTPException; ours replaces it so every error, the
    # ones raised outside a view (404 routing, 405, 413) included, comes out in one shape.
    api.handle_http_exception = handle_http_exception
    app.register_error_handler(HTTPException, handle_http_exception)
    app.register_error_handler(Exception, _unhandled)
    app.register_error_handler(Busy, _busy)


def _busy(error: Busy):
    response = jsonify(payload(503, "the server is busy checking other passwords; try again in a second"))
    response.status_code = 503
    response.headers["Retry-After"] = "1"
    return response


def _unhandled(error: Exception):
    if isinstance(error, HTTPException):
        return handle_http_exception(error)
    if outages.transient(error):
        log.warning("a service did not answer", exc_info=error)
        response = jsonify(payload(503, "a service the API needs did not answer; try again shortly"))
        response.status_code = 503
        response.headers["Retry-After"] = "5"
        return response
    wrapped = InternalServerError(original_exception=error)
    return handle_http_exception(wrapped)
