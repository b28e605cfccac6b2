"""Every peertrain setting, read from the environment in this one place.

Each setting has a default that works on a laptop with nothing else running (the embedded mode):
an in-memory broker and result backend, an in-process mock of MongoDB and a local storage directory.
Point the URLs at real services and the same code runs distributed.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass, field, fields
from pathlib import Path
from urllib.parse import unquote, urlsplit

ROOT = Path(__file__).resolve().parent

DEVELOPMENT = "development"
PRODUCTION = "production"

# .env.example's JWT_SECRET_KEY: a value everyone can read, so production refuses it like a short one.
PLACEHOLDER_SECRET = "change-me-to-a-long-random-string"
# HS256 signs with a SHA-256 HMAC: a key shorter than the hash's 32 bytes weakens it (RFC 7518, 3.2).
MIN_SECRET_BYTES = 32


# Development without JWT_SECRET_KEY: one random secret for this process (its API and coordinator share it).
_PROCESS_SECRET = secrets.token_urlsafe(32)

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


@dataclass(frozen=True)
class Option:
    """One environment variable: its name, default and meaning (docs/settings.md is built from these)."""

    env: str
    default: str | int | float | bool
    help: str

    def text(self) -> str:
        """The default as it would be written in the environment."""
        return str(self.default).lower() if isinstance(self.default, bool) else str(self.default)

    def parse(self, raw: str) -> str | int | float | bool:
        """Convert `raw` to the default's type, naming the variable when that fails."""
        kind = type(self.default)
        if kind is bool:  # bool("false") is True: spell the accepted words out
            word = raw.strip().lower()
            if word in _TRUE or word in _FALSE:
                return word in _TRUE
            raise ValueError(f"{self.env} must be true or false, got {raw!r}")
        try:
            return kind(raw.strip())
        except ValueError:
            raise ValueError(f"{self.env} must be {kind.__name__}, got {raw!r}") from None


def _opt(env: str, default, help: str):
    # The Option travels in the dataclass field's metadata; its default is also the field's.
    return field(default=default, metadata={"option": Option(env, default, help)})


@dataclass(frozen=True)
class Settings:
    """Typed view of the environment; build with `Settings.from_env()`."""

    env: str = _opt(
        "PEERTRAIN_ENV", DEVELOPMENT, "`development` or `production`; production needs a strong JWT secret"
        " (see JWT_SECRET_KEY)"
    )
    host: str = _opt("HOST", "127.0.0.1", "address the API listens on")
    port: int = _opt("PORT", 8000, "port the API listens on")
    broker_url: str = _opt("BROKER_URL", "memory://localhost/", "Celery broker, e.g. `amqp://guest:guest@127.0.0.1:5672//`")
    result_backend: str = _opt(
        "RESULT_BACKEND", "cache+memory://", "Celery result backend; must support chords, e.g. `redis://127.0.0.1:6379/0`"
    )
    broker_admin_url: str = _opt(
        "BROKER_ADMIN_URL", "",
        "RabbitMQ management API with administrator credentials, for registering peers "
        "(empty: BROKER_URL's user on port 15672)",
    )
    peer_broker_url: str = _opt(
        "PEER_BROKER_URL", "",
        "the broker's address as peer machines reach it (empty: BROKER_URL's); credentials are each peer's own",
    )
    broker_ca_file: str = _opt(
        "BROKER_CA_FILE", "",
        "CA certificate that signed the broker's (`amqps://`) and Redis's (`rediss://`) TLS certificates",
    )
    broker_cert_file: str = _opt(
        "BROKER_CERT_FILE", "", "client certificate for TLS to the broker, when it asks for one"
    )
    broker_key_file: str = _opt("BROKER_KEY_FILE", "", "private key of `BROKER_CERT_FILE`")
    mongodb_uri: str = _opt(
        "MONGODB_URI", "mongomock://localhost/peertrain", "MongoDB URI; `mongomock://` keeps it inside one process"
    )
    storage_url: str = _opt(
        "STORAGE_URL", str(ROOT / "var" / "storage"), "where datasets and weights go: a directory or `s3://bucket/prefix`"
    )
    s3_endpoint_url: str = _opt("S3_ENDPOINT_URL", "", "S3-compatible endpoint (MinIO, moto); empty means AWS")
    s3_region: str = _opt("S3_REGION", "us-east-1", "S3 region (credentials come from the usual `AWS_*` variables)")
    jwt_secret_key: str = _opt(
        "JWT_SECRET_KEY", "", f"secret that signs access tokens; production requires one of at least"
        f" {MIN_SECRET_BYTES} bytes that is not .env.example's placeholder"
        " (`python3 -c 'import secrets; print(secrets.token_urlsafe(48))'`)"
    )
    jwt_expires_seconds: int = _opt("JWT_EXPIRES_SECONDS", 3600, "lifetime of an access token")
    jwt_refresh_expires_seconds: int = _opt(
        "JWT_REFRESH_EXPIRES_SECONDS", 30 * 86400,
        "lifetime of a refresh token, which gets new access tokens (POST /auth/refresh) until the user signs in again"
    )
    join_token_seconds: int = _opt(
        "JOIN_TOKEN_SECONDS", 3600, "how long a machine's join token (POST /peers) may be used, once"
    )
    bcrypt_rounds: int = _opt("BCRYPT_ROUNDS", 12, "bcrypt cost factor for password hashes")
    password_hashing_slots: int = _opt(
        "PASSWORD_HASHING_SLOTS", 1, "bcrypt hashes one API process computes at once; a sign-in or sign-up finding"
        " them all busy gets 503 with Retry-After at once (keep it below the server's app threads per process)"
    )
    auth_limit_per_address: str = _opt(
        "AUTH_LIMIT_PER_ADDRESS", "20/minute", "sign-ins one client address may send (sign-ups counted apart);"
        " more get 429 with Retry-After"
    )
    auth_limit_per_account: str = _opt(
        "AUTH_LIMIT_PER_ACCOUNT", "5/minute;20/hour", "failed sign-ins for one email (taken sign-ups counted apart);"
        " more get 429 with Retry-After, whichever address they come from"
    )
    rate_limit_storage_url: str = _opt(
        "RATE_LIMIT_STORAGE_URL", "memory://", "where the sign-in counters live: `memory://` (each API process its"
        " own) or `redis://host:6379/1` (shared by every API process)"
    )
    trusted_proxies: int = _opt(
        "TRUSTED_PROXIES", 0, "proxies in front of the API whose X-Forwarded-For names the client (compose's nginx:"
        " 1); 0 takes the connection's own address"
    )
    max_upload_mb: int = _opt("MAX_UPLOAD_MB", 200, "largest accepted dataset upload, in MiB (bigger: 413)")
    coordinator_queue: str = _opt("COORDINATOR_QUEUE", "coordinator", "queue the coordinator worker consumes")
    results_queue: str = _opt(
        "RESULTS_QUEUE", "peertrain.results",
        "exchange and queue peers report their tasks' results to (the coordinator reads it)",
    )
    public_url: str = _opt(
        "PUBLIC_URL", "", "the API's address as peers reach it, for grants on local storage (empty: http://HOST:PORT)"
    )
    event_exchange: str = _opt(
        "EVENT_EXCHANGE", "celeryev", "exchange Celery events travel on; deployments sharing a broker need their own"
    )
    monitor_queue: str = _opt(
        "MONITOR_QUEUE", "peertrain.monitor",
        "prefix of the durable queues the monitor reads peers' events from (one per peer, <MONITOR_QUEUE>.peer.<name>)"
    )
    peer_threads: int = _opt(
        "PEER_THREADS", 1, "torch CPU threads per training; keep peers × threads ≤ cores (oversubscription costs 20×)"
    )
    peer_keep_memory: bool = _opt(
        "PEER_KEEP_MEMORY", True, "peers keep freed memory for the next read/shuffle instead of faulting it in again"
    )
    peer_event_rate: float = _opt(
        "PEER_EVENT_RATE", 200.0, "events per second one peer may send (bursts of 10 s worth); more are dropped"
        " unread (its result still carries every epoch)"
    )
    peer_timeout_seconds: float = _opt(
        "PEER_TIMEOUT_SECONDS", 10.0, "a peer silent this long is OFFLINE (workers beat every 2 s)"
    )
    train_time_limit: int = _opt("TRAIN_TIME_LIMIT", 3600, "seconds a training task may run before it is killed")
    deadline_floor: float = _opt(
        "DEADLINE_FLOOR_SECONDS", 60.0, "a task without a user-given `round_timeout` is overdue once it has taken 3x"
        " as long per epoch as the slowest of its fellows that finished, but never before this many seconds"
    )
    session_start_timeout: int = _opt(
        "SESSION_START_TIMEOUT", 600, "a session no coordinator has started after this many seconds fails"
    )
    data_dir: str = _opt(
        "DATA_DIR", str(ROOT / "var" / "db"),
        "where `make run` keeps its database between runs (mongomock's, written as it changes) and its "
        "development token secret; empty: nothing kept",
    )
    snapshot_seconds: float = _opt(
        "SNAPSHOT_SECONDS", 1.0, "`make run` with mongomock: how often what changed in the database is written to"
        " DATA_DIR, so a hard kill loses at most this much (0: only at a clean stop)"
    )
    resume: str = _opt(
        "RESUME", "off", "`auto`: `make run` resumes the sessions its last stop or crash interrupted when it starts"
    )
    checkpoint_epochs: int = _opt(
        "CHECKPOINT_EPOCHS", 5, "sweep peers upload their training state every this many epochs, which a resumed"
        " session goes on from (0: never; it restarts those peers from the first epoch)"
    )
    local_peers: int = _opt("LOCAL_PEERS", 3, "in-process peers started by `make run`")
    flower_port: int = _opt(
        "FLOWER_PORT", 5555, "`make run` serves Flower (the Celery monitoring UI) on HOST at this port, showing the"
        " peers and their tasks (0: not at all); `make flower` also listens here"
    )
    flower_basic_auth: str = _opt(
        "FLOWER_BASIC_AUTH", "", "user:password Flower asks for under `make run` (empty: none, as it listens on HOST,"
        " 127.0.0.1 by default)"
    )
    max_peers: int = _opt(
        "MAX_PEERS_PER_SESSION", 64, "most peers one session may ask for (the API answers 422 beyond); raise it for"
        " large simulations (bench/scale.py runs 1,000)"
    )
    log_level: str = _opt(
        "LOG_LEVEL", "INFO", "logging level of every process; Celery's line per task (and its whole result) shows"
        " only at DEBUG"
    )

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Settings:
        """Read every option from `environ` (default: the process environment)."""
        environ = os.environ if environ is None else environ
        values = {}
        for f in fields(cls):
            option: Option = f.metadata["option"]
            raw = environ.get(option.env)
            values[f.name] = option.default if raw is None else option.parse(raw)
        return cls(**values)

    @property
    def development(self) -> bool:
        return self.env == DEVELOPMENT

    @property
    def grant_key(self) -> bytes:
        """The key that signs storage grants on local storage (derived from the JWT secret, never the same)."""
        problem = secret_problem(self.jwt_secret_key)
        if problem and not self.development:
            # Grants signed with a key anyone can derive would open every stored object to every peer.
            raise RuntimeError(f"{problem}: outside development storage grants cannot be signed with it")
        secret = (self.jwt_secret_key or _PROCESS_SECRET).encode()
        return hmac.new(secret, b"peertrain storage grants", hashlib.sha256).digest()

    @property
    def public_base_url(self) -> str:
        """Where peers reach the API."""
        return (self.public_url or f"http://{self.host}:{self.port}").rstrip("/")

    @property
    def embedded_broker(self) -> bool:
        """True when the broker lives inside this process, so every worker must too."""
        return self.broker_url.startswith("memory://")

    @property
    def broker_scope(self) -> str:
        """What peers' broker logins carry of this deployment: its virtual host, unless it is the default one
        (RabbitMQ's users are the node's, shared by all its virtual hosts; two deployments on one node must
        not share a login name)."""
        vhost = urlsplit(self.broker_url).path[1:]
        return "" if self.embedded_broker or vhost in ("", "/") else unquote(vhost)


def secret_problem(secret: str) -> str | None:
    """Why `secret` must not sign tokens in production, or None when it may."""
    if not secret:
        return "JWT_SECRET_KEY is not set"
    if secret == PLACEHOLDER_SECRET:
        return "JWT_SECRET_KEY is .env.example's placeholder, which anyone can read"
    if len(secret.encode()) < MIN_SECRET_BYTES:
        return f"JWT_SECRET_KEY is {len(secret.encode())} bytes long; it needs at least {MIN_SECRET_BYTES}"
    return None


def options() -> list[Option]:
    """Every option, in declaration order."""
    return [f.metadata["option"] for f in fields(Settings)]


def markdown_table() -> str:
    """The settings table of docs/settings.md."""
    lines = ["| variable | default | meaning |", "|---|---|---|"]
    for option in options():
        default = option.text().replace(str(ROOT), ".") if option.default != "" else "(empty)"
        lines.append(f"| `{option.env}` | `{default}` | {option.help} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table())
