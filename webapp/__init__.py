"""The peertrain REST API: a Flask app factory."""

from __future__ import annotations

import logging
import secrets
from typing import Any

from flask import Flask

import models
from settings import Settings

log = logging.getLogger(__name__)


def create_app(test_config: dict[str, Any] | None = None, settings: Settings | None = None) -> Flask:
    """Build the API: defaults from `settings` (the environment), then `test_config` on top."""
    settings = settings or Settings.from_env()
    app = Flask(__name__)
    app.config.from_mapping(_config(settings))
    if test_config:
        app.config.update(test_config)
    _require_secret(app)

    models.ensure_connected(app.config["MONGODB_URI"])

    from webapp import errors, extensions

    api = extensions.init_app(app)
    errors.init_app(app, api)

    from webapp.auth import blp as auth
    from webapp.datasets import blp as datasets
    from webapp.health import blp as health
    from webapp.peers import blp as peers
    from webapp.sessions import blp as sessions

    for blueprint in (auth, peers, sessions, datasets, health):
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
        "BCRYPT_ROUNDS": settings.bcrypt_rounds,
        "MAX_CONTENT_LENGTH": settings.max_upload_mb * 1024 * 1024,
        # Form fields are small; the cap above is for the file.
        "MAX_FORM_MEMORY_SIZE": 1024 * 1024,
        "COORDINATOR_QUEUE": settings.coordinator_queue,
        "PEER_TIMEOUT_SECONDS": settings.peer_timeout_seconds,
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
    if app.config["JWT_SECRET_KEY"]:
        return
    if app.config["PEERTRAIN_ENV"] != "development":
        raise RuntimeError("JWT_SECRET_KEY is not set: the API refuses to start without it outside development")
    # A per-process secret: tokens die with the process, which is what a laptop run wants.
    app.config["JWT_SECRET_KEY"] = secrets.token_urlsafe(32)
    log.warning("JWT_SECRET_KEY is not set; using a random one for this development process")
