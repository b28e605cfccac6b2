"""The peertrain REST API: a Flask app factory."""

from __future__ import annotations

import logging
import secrets
from typing import Any

from flask import Flask
from werkzeug.middleware.proxy_fix import ProxyFix

import models
from models import user as users
from settings import DEVELOPMENT, Settings, secret_problem

log = logging.getLogger(__name__)


def create_app(test_config: dict[str, Any] | None = None, settings: Settings | None = None,
               celery: Any = None) -> Flask:
    """Build the API: defaults from `settings` (the environment), then `test_config` on top. `celery`: the
    Celery app it sends tasks with (default: the platform's app made from `settings`)."""
    settings = settings or Settings.from_env()
    if celery is None:
        from tasks.celery import create_app as create_celery

        celery = create_celery(settings)
    app = Flask(__name__)
    app.config.from_mapping(_config(settings))
    if test_config:
        app.config.update(test_config)
    _require_secret(app)
    if app.config["TRUSTED_PROXIES"]:
        # The client's address is the one the nearest trusted proxy appended to X-Forwarded-For.
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=app.config["TRUSTED_PROXIES"])  # type: ignore[method-assign]
    models.ensure_connected(app.config["MONGODB_URI"])
    clashes = users.add_missing_keys()
    if clashes:
        log.warning("accounts whose names differ from another's only in case: %s", ", ".join(clashes))

    from webapp import errors, extensions, throttling

    api = extensions.init_app(app, celery)
    errors.init_app(app, api)

    from webapp.auth import blp as auth
    from webapp.datasets import blp as datasets
    from webapp.health import blp as health
    from webapp.peers import SETTINGS
    from webapp.peers import blp as peers
    from webapp.peers import join_blp as join
    from webapp.peers import pools_blp as pools
    from webapp.schemas import HyperparametersSchema
    from webapp.sessions import blp as sessions

    throttling.init_app(app, auth)
    api.spec.components.schema("Hyperparameters", schema=HyperparametersSchema)  # see schemas.HYPERPARAMETERS_REF
    app.extensions[SETTINGS] = settings  # enrolment issues broker logins as `tasks.registry` does
    for blueprint in (auth, peers, join, pools, sessions, datasets, health):
        api.register_blueprint(blueprint)
    from webapp import objects

    app.register_blueprint(objects.blp)  # peers' door to local storage; not part of the documented API
    from webapp.dashboard import bp as dashboard

    app.register_blueprint(dashboard)
    return app


def _config(settings: Settings) -> dict[str, Any]:
    return {
        "PEERTRAIN_ENV": settings.env,
        "MONGODB_URI": settings.mongodb_uri,
        "STORAGE_URL": settings.storage_url,
        "S3_ENDPOINT_URL": settings.s3_endpoint_url,
        "S3_REGION": settings.s3_region,
        "PUBLIC_URL": settings.public_base_url,
        "GRANT_KEY": settings.grant_key,
        "JWT_SECRET_KEY": settings.jwt_secret_key,
        "JWT_ACCESS_TOKEN_EXPIRES": settings.jwt_expires_seconds,
        "JWT_REFRESH_TOKEN_EXPIRES": settings.jwt_refresh_expires_seconds,
        "BCRYPT_ROUNDS": settings.bcrypt_rounds,
        "PASSWORD_HASHING_SLOTS": settings.password_hashing_slots,
        "AUTH_LIMIT_PER_ADDRESS": settings.auth_limit_per_address,
        "AUTH_LIMIT_PER_ACCOUNT": settings.auth_limit_per_account,
        "RATE_LIMIT_STORAGE_URL": settings.rate_limit_storage_url,
        "TRUSTED_PROXIES": settings.trusted_proxies,
        "MAX_CONTENT_LENGTH": settings.max_upload_mb * 1024 * 1024,
        # Form fields are small; the cap above is for the file.
        "MAX_FORM_MEMORY_SIZE": 1024 * 1024,
        "COORDINATOR_QUEUE": settings.coordinator_queue,
        "PEER_TIMEOUT_SECONDS": settings.peer_timeout_seconds,
        "JOIN_TOKEN_SECONDS": settings.join_token_seconds,
        "TRAIN_TIME_LIMIT": settings.train_time_limit,
        "API_TITLE": "peertrain",
        "API_VERSION": "1.0",
        "OPENAPI_VERSION": "3.0.3",
        "OPENAPI_URL_PREFIX": "/",
        "OPENAPI_JSON_PATH": "openapi.json",
        "OPENAPI_SWAGGER_UI_PATH": "/docs",
        # Swagger UI's files are vendored (webapp/static/vendor/), so /docs works offline; no validator badge,
        # which would load an image from swagger.io.
        "OPENAPI_SWAGGER_UI_URL": "/static/vendor/swagger-ui/",
        "OPENAPI_SWAGGER_UI_CONFIG": {"validatorUrl": None},
        "API_SPEC_OPTIONS": {
            "components": {
                "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}}
            }
        },
    }


def _require_secret(app: Flask) -> None:
    problem = secret_problem(app.config["JWT_SECRET_KEY"])
    if problem is None:
        return
    if app.config["PEERTRAIN_ENV"] != DEVELOPMENT:
        raise RuntimeError(f"{problem}: outside development the API refuses to start without a strong secret; "
                           "set one with python3 -c 'import secrets; print(secrets.token_urlsafe(48))'")
    if app.config["JWT_SECRET_KEY"]:
        log.warning("%s; accepted only because PEERTRAIN_ENV is development", problem)
        return
    # A per-process secret: tokens die with the process, which is what a laptop run wants.
    app.config["JWT_SECRET_KEY"] = secrets.token_urlsafe(32)
    log.warning("JWT_SECRET_KEY is not set; using a random one for this development process")
