"""Marshmallow schemas: they validate requests, shape responses and write the OpenAPI document."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import marshmallow as ma
from flask_smorest.fields import Upload
from marshmallow import fields, validate
from werkzeug.datastructures import FileStorage

from models.pool import RESERVED
from models.session import (
    AGGREGATIONS,
    ALGORITHMS,
    ASYNC,
    FEDERATED,
    MODES,
    PARTITIONS,
    SCHEDULES,
    SKEWED_DEFAULT,
    SWEEP,
    SYNC,
)
from models.user import email_error
from settings import Settings
from tasks.protocol import NAME_PATTERN, task_queue
from trainer import search as search_space
from trainer.search import MAX_TRIALS, PRUNERS, SAMPLERS

# Read once, when the schemas are built (a setting, so that a 1,000-peer simulation can ask for more).
MAX_PEERS = Settings.from_env().max_peers


class UTCDateTime(fields.DateTime):
    """A timestamp stored as naive UTC (BSON's way), written with its +00:00 offset."""

    def _serialize(self, value: datetime | None, attr: str | None, obj: Any, **kwargs: Any) -> str | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return super()._serialize(value, attr, obj, **kwargs)


class StrictSchema(ma.Schema):
    """Refuses fields it does not know, naming the ones it does."""

    class Meta:
        unknown = ma.RAISE

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        known = ", ".join(name for name, field in self.fields.items() if not field.dump_only)
        self.error_messages = {**self.error_messages, "unknown": f"unknown field; the valid ones are {known}"}


# --- accounts ---------------------------------------------------------------------------------

class SignupSchema(StrictSchema):
    username = fields.String(
        required=True,
        validate=[
            validate.Length(min=3, max=40),
            validate.Regexp(r"^[A-Za-z0-9_.-]+$", error="use letters, digits, '_', '.' or '-'"),
        ],
    )
    email = fields.Email(required=True, validate=validate.Length(max=254))
    password = fields.String(required=True, load_only=True, validate=validate.Length(min=8, max=256))

    @ma.validates("email")
    def _storable(self, value: str, **kwargs: Any) -> None:
        # What marshmallow calls an email is wider than what the account store accepts.
        problem = email_error(value)
        if problem:
            raise ma.ValidationError(problem)


class SigninSchema(StrictSchema):
    email = fields.Email(required=True)
    password = fields.String(required=True, load_only=True, validate=validate.Length(max=256))


class UserSchema(ma.Schema):
    id = fields.String()
    username = fields.String()
    email = fields.String()
    created_at = UTCDateTime()


class TokenSchema(ma.Schema):
    access_token = fields.String()
    token_type = fields.String(metadata={"example": "bearer"})
    username = fields.String()
    expires_in = fields.Integer(metadata={"description": "seconds until the access token expires"})
    refresh_token = fields.String(metadata={
        "description": "sign-in only: gets new access tokens from POST /auth/refresh until it expires"})
    refresh_expires_in = fields.Integer(metadata={"description": "sign-in only: seconds until the refresh token "
                                                                 "expires (then the user signs in again)"})


# --- peers ------------------------------------------------------------------------------------

class PeerSchema(ma.Schema):
    name = fields.String()
    status = fields.String(metadata={"enum": ["ONLINE", "TRAINING", "OFFLINE", "QUARANTINED"]})
    hostname = fields.String(allow_none=True)
    queue = fields.Function(lambda peer: task_queue(peer.name))
    last_seen = UTCDateTime(allow_none=True)
    session_id = fields.String(allow_none=True)
    # Its record across sessions, as the coordinator counted it (never as the peer reported it).
    accepted = fields.Integer(metadata={"description": "tasks whose update (or model) was used"})
    rejected = fields.Integer(metadata={"description": "tasks whose update was refused (why: last_rejection)"})
    outliers = fields.Integer(metadata={"description": "tasks whose update was out of line with the others'"})
    timed_out = fields.Integer(metadata={"description": "tasks not finished by their deadline"})
    failed = fields.Integer(metadata={"description": "tasks that failed on the peer"})
    reputation = fields.Float(metadata={"description": "the share of its tasks that were used, a newcomer 0.5; "
                                                       "claims prefer higher"})
    last_rejection = fields.String(allow_none=True)
    quarantined_at = UTCDateTime(allow_none=True, metadata={
        "description": "when its updates had been refused in three sessions running; an operator restores it"})
    owner = fields.String(allow_none=True, metadata={
        "description": "the username of the user who enrolled it; null: the platform's (registered by an operator)"})
    mine = fields.Boolean(metadata={"description": "whether you own it (and so may share, pause or remove it)"})
    public = fields.Boolean(metadata={"description": "an owned peer its owner shared with everyone"})
    paused = fields.Boolean(metadata={"description": "its owner keeps it out of sessions; it stays connected"})
    pools = fields.List(fields.String(), metadata={"description": "your pools that share it (only for its owner)"})


class PeerSessionSchema(ma.Schema):
    session_id = fields.String(attribute="id")
    status = fields.String()
    mode = fields.String()
    created_at = UTCDateTime()
    finished_at = UTCDateTime(allow_none=True)
    outcome = fields.String(allow_none=True, metadata={"description": "how the peer's part ended"})


class PeerDetailSchema(PeerSchema):
    sessions = fields.List(fields.Nested(PeerSessionSchema), metadata={
        "description": "the sessions it worked in, newest first (only its owner sees them)"})


class StrictBoolean(fields.Boolean):
    """A JSON `true` or `false`, nothing else (not 0, 1 or "yes")."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> bool:
        if not isinstance(value, bool):
            raise self.make_error("invalid", input=value)
        return value


PEER_NAME = validate.Regexp(NAME_PATTERN, error="1-63 letters, digits, `_` or `-`, starting with a letter or digit")


class EnrolSchema(StrictSchema):
    name = fields.String(required=True, validate=PEER_NAME, metadata={
        "description": "the machine's peer name: 1-63 letters, digits, `-` and `_`; enrolling a name of yours "
                       "again gives a new token"})


class EnrolmentSchema(ma.Schema):
    name = fields.String()
    join_token = fields.String(metadata={"description": "one use, within the hour; shown only now"})
    expires_at = UTCDateTime()
    command = fields.String(metadata={"description": "what to run on the machine"})


class JoinSchema(StrictSchema):
    token = fields.String(required=True, validate=validate.Length(min=1, max=200))


class JoinedSchema(ma.Schema):
    name = fields.String()
    environment = fields.Dict(keys=fields.String(), values=fields.String(), metadata={
        "description": "the peer worker's environment: its own broker login and the exchanges it reports on"})
    command = fields.String()


class PeerPatchSchema(StrictSchema):
    public = StrictBoolean(metadata={"description": "share it with everyone's sessions (true) or only yours"})
    paused = StrictBoolean(metadata={"description": "keep it out of sessions (true) or let it take work again"})


class PoolSchema(StrictSchema):
    name = fields.String(required=True, validate=[validate.Length(min=1, max=64), validate.Regexp(
        r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", error="letters, digits, `_`, `.` and `-`, starting with a letter or digit"),
        validate.NoneOf(RESERVED, error="`public` and `mine` are what `pool` means without a pool")])
    members = fields.List(fields.String(validate=validate.Length(min=1, max=40)), load_default=list, metadata={
        "description": "usernames of the users who may train on its peers (you always may)"})
    peers = fields.List(fields.String(validate=PEER_NAME), load_default=list,
                        metadata={"description": "names of your peers it shares"})
    owner = fields.String(dump_only=True)
    created_at = UTCDateTime(dump_only=True)


class PoolPatchSchema(StrictSchema):
    members = fields.List(fields.String(validate=validate.Length(min=1, max=40)))
    peers = fields.List(fields.String(validate=PEER_NAME))


class PoolListSchema(ma.Schema):
    pools = fields.List(fields.Nested(PoolSchema))


class PeerListSchema(ma.Schema):
    peers = fields.List(fields.Nested(PeerSchema))
    online = fields.Integer(metadata={"description": "peers reachable now: ONLINE (idle) or TRAINING"})
    free = fields.Integer(metadata={"description": "peers idle and ready to take a session (ONLINE)"})
    total = fields.Integer()


# --- starting a session -----------------------------------------------------------------------

class HyperparametersSchema(StrictSchema):
    batch_size = fields.Integer(load_default=64, validate=validate.Range(min=1, max=65536))
    epochs = fields.Integer(load_default=10, validate=validate.Range(min=1, max=1000))
    learning_rate = fields.Float(
        load_default=0.001, validate=validate.Range(min=0, max=10, min_inclusive=False),
        metadata={"exclusiveMinimum": True},  # OpenAPI 3.0's spelling of min_inclusive=False
    )
    hidden = fields.List(
        fields.Integer(validate=validate.Range(min=1, max=4096)),
        load_default=lambda: [128, 64],
        validate=validate.Length(min=0, max=8),
    )
    optimizer = fields.String(load_default="adam", validate=validate.OneOf(["adam", "sgd"]))
    dropout = fields.Float(load_default=0.0, validate=validate.Range(min=0, max=0.9))
    weight_decay = fields.Float(load_default=0.0, validate=validate.Range(min=0, max=1.0),
                                metadata={"description": "L2 penalty the optimizer applies (0: none)"})


def _decode_json(text: str, example: str) -> Any:
    """Decode a form field's JSON text; what cannot be decoded is a ValidationError showing `example`."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ma.ValidationError(
            f"not valid JSON ({exc.msg} at character {exc.pos + 1}); write it like {example}") from None
    except RecursionError:
        raise ma.ValidationError(f"nested too deeply to read; write it like {example}") from None


# The component create_app registers HyperparametersSchema as, for the form field that carries it as JSON.
HYPERPARAMETERS_REF = "#/components/schemas/Hyperparameters"


class JSONString(fields.Field):
    """A form field holding JSON text, decoded before validation."""

    def __init__(self, example: str, **kwargs: Any) -> None:
        self.example = example
        super().__init__(**kwargs)

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        if not isinstance(value, str):
            return value
        return _decode_json(value, self.example)


class NameList(fields.Field):
    """Column names as JSON list text or comma-separated text."""

    EXAMPLE = '["f0", "f1"] or f0,f1'

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> list[str]:
        if isinstance(value, str):
            text = value.strip()
            value = _decode_json(text, self.EXAMPLE) if text.startswith("[") else text.split(",")
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ma.ValidationError(f"give column names as a JSON list or comma-separated text: {self.EXAMPLE}")
        names = [v.strip() for v in value if v.strip()]
        if not names:
            raise ma.ValidationError("name at least one feature column, or leave the field out")
        if len(set(names)) != len(names):
            raise ma.ValidationError("a column is named twice")
        return names


class CSVUpload(Upload):
    """The dataset file part; a plain text field in its place is the `curl -F file=path` slip (no @)."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> FileStorage:
        if not isinstance(value, FileStorage):
            shown = value if isinstance(value, str) and len(value) <= 200 else "path/to/data.csv"
            raise ma.ValidationError(
                f"send the CSV as a file part, not as text: with curl, -F file=@{shown} (note the @)")
        return value


class StartSessionSchema(StrictSchema):
    """The multipart form of `POST /sessions/start`: the CSV as the `file` part, and settings."""

    file = CSVUpload(required=True, metadata={"description": "the dataset, a CSV with a header row"})
    num_peers = fields.Integer(required=True, validate=validate.Range(min=1, max=MAX_PEERS))
    # Optional form fields have no load_default of None: a form cannot send null, so the document must not
    # call them nullable; consumers read them with .get().
    hyperparameters = JSONString(
        '{"learning_rate": 0.01} or [{"epochs": 5}, {"epochs": 20}]',
        metadata={
            "description": "JSON: one object for every peer, or a list of exactly num_peers objects",
            # A multipart part holding an object or array is JSON text (OpenAPI 3.0, "Encoding Object").
            "oneOf": [{"$ref": HYPERPARAMETERS_REF},
                      {"type": "array", "items": {"$ref": HYPERPARAMETERS_REF}, "minItems": 1, "maxItems": MAX_PEERS}],
        },
    )
    target = fields.String(load_default="label", validate=validate.Length(min=1, max=200))
    features = NameList(metadata={"type": "string", "minLength": 1, "description": "comma-separated or JSON list"})
    task = fields.String(load_default="classification", validate=validate.OneOf(["classification", "regression"]))
    mode = fields.String(load_default=SWEEP, validate=validate.OneOf(MODES))
    seed = fields.Integer(load_default=0, validate=validate.Range(min=0, max=2**31 - 1))
    # Federated mode only.
    rounds = fields.Integer(load_default=5, validate=validate.Range(min=1, max=1000))
    local_epochs = fields.Integer(load_default=1, validate=validate.Range(min=1, max=1000))
    partition = fields.String(load_default="iid", validate=validate.OneOf(PARTITIONS))
    alpha = fields.Float(load_default=0.5, validate=validate.Range(min=0.01, max=1000))
    aggregation = fields.String(load_default="fedavg", validate=validate.OneOf(AGGREGATIONS))
    algorithm = fields.String(validate=validate.OneOf(ALGORITHMS), metadata={
        "description": "federated: how the peers' work becomes the global model — `fedavg` (default; `scaffold` "
                       "with `partition=label_skew`), `fedavgm` "
                       "(server momentum), `fedadam`, `fedyogi` (server-side adaptive), `fedprox` (a proximal term "
                       "on the peers, weight `mu`), `scaffold` (control variates correcting each peer's drift); "
                       "after `aggregation` and screening"})
    mu = fields.Float(validate=validate.Range(min=0, max=10, min_inclusive=False), metadata={
        "description": "fedprox: the proximal term's weight (default 0.01)"})
    server_lr = fields.Float(validate=validate.Range(min=0, max=10, min_inclusive=False), metadata={
        "description": "fedavgm, fedadam, fedyogi: the server optimizer's step (default 1.0, 0.01, 0.01)"})
    pool = fields.String(load_default="public", validate=validate.Length(min=1, max=64), metadata={
        "description": "whose peers train it: `public` (default: the platform's and those shared with everyone), "
                       "`mine` (only your own) or the name of a pool you own or belong to"})
    elastic = fields.Boolean(metadata={
        "description": "whether peers that come online while it runs join it (up to `max_peers`): an asynchronous "
                       "federated session hands a newcomer its next task at once, a searching sweep its next trial, "
                       "a synchronous federated session adds it at the next round (its shard re-split from the "
                       "training rows). Default: true for asynchronous sessions and searches, false for synchronous "
                       "ones; a sweep of fixed settings cannot grow"})
    max_peers = fields.Integer(validate=validate.Range(min=1, max=MAX_PEERS), metadata={
        "description": "elastic: the most peers it may have (default: the platform's limit per session)"})
    # Either mode: how many peers must finish each round for the session to go on (default: all), and
    # how long a round may take before the peers still training are left out.
    min_peers = fields.Integer(validate=validate.Range(min=1, max=MAX_PEERS))
    round_timeout = fields.Integer(validate=validate.Range(min=1, max=7 * 24 * 3600),
                                   metadata={"description": "seconds (default: the peers' training time limit)"})
    # Federated, asynchronous (tasks/buffered.py): no round waits for the slowest peer.
    schedule = fields.String(load_default=SYNC, validate=validate.OneOf(SCHEDULES), metadata={
        "description": "federated: `sync` rounds, or `async` (each update folded in as soon as `buffer_size` wait)"})
    buffer_size = fields.Integer(validate=validate.Range(min=1, max=MAX_PEERS), metadata={
        "description": "async: updates folded into the global model at once (default: half the peers, rounded up)"})
    max_updates = fields.Integer(validate=validate.Range(min=1, max=1_000_000), metadata={
        "description": "async: tasks handed out in all (default: rounds x num_peers, the same peer-epochs)"})
    time_budget = fields.Integer(validate=validate.Range(min=1, max=7 * 24 * 3600), metadata={
        "description": "async: seconds after which no task is handed out; a sweep that searches: no trial is "
                       "begun or continued (default: none)"})
    # Sweeps that search (trainer/search.py, tasks/search.py).
    search = JSONString(
        '{"learning_rate": {"low": 1e-4, "high": 1e-1, "log": true}, "batch_size": [32, 64, 128], "epochs": 30}',
        metadata={"type": "object", "description": "sweep: the space to search, setting -> a list of values, a range "
                  '{"low", "high", "log"}, or one value; settings it leaves out are those of `hyperparameters` '
                  "(one object). `{}`, or no settings at all: the default space (learning rate, batch size, layers, "
                  "weight decay, dropout) with `hyperparameters`' settings held fixed"})
    trials = fields.Integer(validate=validate.Range(min=1, max=MAX_TRIALS), metadata={
        "description": "sweep that searches: configurations to try in all (default: 4 x num_peers)"})
    sampler = fields.String(validate=validate.OneOf(SAMPLERS), metadata={
        "description": "sweep that searches: `tpe` (default) or `random`"})
    pruner = fields.String(validate=validate.OneOf(PRUNERS), metadata={
        "description": "sweep that searches: `asha` (successive halving, default), `median` or `none`"})

    @ma.validates_schema
    def _peer_settings(self, data: dict[str, Any], **kwargs: Any) -> None:
        num_peers = data.get("num_peers")
        raw = data.get("hyperparameters")
        data["hyperparameters_given"] = raw is not None
        if raw is None:
            raw = {}
        schema = HyperparametersSchema()
        if isinstance(raw, dict):
            try:
                per_peer = [schema.load(raw)] * (num_peers or 1)
            except ma.ValidationError as exc:
                raise ma.ValidationError(exc.messages, "hyperparameters") from None
        elif isinstance(raw, list):
            if num_peers is not None and len(raw) != num_peers:
                raise ma.ValidationError(
                    f"give one object for every peer, or a list of exactly num_peers ({num_peers}) objects;"
                    f" got a list of {len(raw)}",
                    "hyperparameters",
                )
            per_peer = []
            for i, item in enumerate(raw):
                if not isinstance(item, dict):
                    raise ma.ValidationError({str(i): ["must be an object"]}, "hyperparameters")
                try:
                    per_peer.append(schema.load(item))
                except ma.ValidationError as exc:
                    raise ma.ValidationError({str(i): exc.messages}, "hyperparameters") from None
        else:
            raise ma.ValidationError("must be a JSON object or a list of objects", "hyperparameters")
        data["hyperparameters"] = per_peer
        self._search(data, raw if isinstance(raw, dict) and data.get("hyperparameters_given") else None)
        if data.get("min_peers") is not None and num_peers is not None and data["min_peers"] > num_peers:
            raise ma.ValidationError("cannot exceed num_peers", "min_peers")
        if data.get("mode") == FEDERATED:
            self._federated(data)
        self._algorithm(data)
        self._schedule(data)
        self._elastic(data)

    @staticmethod
    def _elastic(data: dict[str, Any]) -> None:
        """Which sessions take peers that come online while they run, and how many they may have."""
        growing = data.get("search") is not None or (data.get("mode") == FEDERATED and data.get("schedule") == ASYNC)
        if data.get("mode") == SWEEP and data.get("search") is None:
            if data.get("elastic"):
                raise ma.ValidationError("a sweep of fixed settings (one per peer) cannot take more peers; a sweep "
                                         "that searches (`search`) and federated sessions can", "elastic")
        data["elastic"] = data.get("elastic", growing)
        if "max_peers" in data:
            if not data["elastic"]:
                raise ma.ValidationError("only for elastic sessions (elastic=true)", "max_peers")
            if data.get("num_peers") is not None and data["max_peers"] < data["num_peers"]:
                raise ma.ValidationError(f"at least num_peers ({data['num_peers']})", "max_peers")

    @staticmethod
    def _search(data: dict[str, Any], fixed: dict[str, Any] | None) -> None:
        """A sweep searches when it is given a space, or no settings at all (the default space); what it searches
        is stored with the session (`search`), its peers' settings are then each trial's."""
        given = data.pop("hyperparameters_given")
        rules = [key for key in ("trials", "sampler", "pruner") if key in data]
        if data.get("mode") != SWEEP:
            if "search" in data:
                raise ma.ValidationError("a search is a sweep's: set mode=sweep", "search")
            if rules:
                raise ma.ValidationError("only for sweeps that search (mode=sweep)", rules[0])
            return
        if "search" not in data and given:
            for key in (*rules, *(["time_budget"] if "time_budget" in data else [])):
                raise ma.ValidationError("only for sweeps that search: give `search` (or leave hyperparameters "
                                         "out to search the default space)", key)
            return
        if "search" in data and given and fixed is None:
            raise ma.ValidationError("give a search space or one settings object per peer, not both", "search")
        try:
            if data.get("search", {}) == {}:  # none, or an empty one: the default space, holding `fixed` fixed
                space = search_space.default_space(fixed)
            else:
                space = search_space.parse(data["search"], fixed)
        except search_space.SpaceError as exc:
            raise ma.ValidationError(str(exc), "search") from None
        num_peers = data.get("num_peers") or 1
        trials = data.get("trials", 4 * num_peers)
        if trials < num_peers:
            raise ma.ValidationError(f"every peer gets a trial: at least num_peers ({num_peers})", "trials")
        data["search"] = {"space": space, "trials": trials, "sampler": data.get("sampler", "tpe"),
                          "pruner": data.get("pruner", "asha"), "time_budget": data.get("time_budget")}
        # Until a peer's first trial begins, its run shows the settings every trial shares.
        shared = {name: dimension["value"] for name, dimension in space.items() if "value" in dimension}
        data["hyperparameters"] = [{**shared, "epochs": search_space.max_epochs(space)}] * num_peers

    @staticmethod
    def _schedule(data: dict[str, Any]) -> None:
        asynchronous = ("buffer_size", "max_updates", *(() if data.get("search") else ("time_budget",)))
        if data.get("schedule") != ASYNC:
            for key in asynchronous:
                if key in data:
                    raise ma.ValidationError("only for asynchronous sessions (schedule=async)", key)
            return
        if data.get("mode") != FEDERATED:
            raise ma.ValidationError("async rounds are federated rounds: set mode=federated", "schedule")
        num_peers = data.get("num_peers")
        if num_peers is None:
            return
        if data.get("buffer_size", 0) > num_peers:
            raise ma.ValidationError(f"cannot exceed num_peers ({num_peers})", "buffer_size")
        if data.get("max_updates", num_peers) < num_peers:
            raise ma.ValidationError(f"every peer gets at least one task: at least num_peers ({num_peers})",
                                     "max_updates")
        # Half the peers, rounded up: the other half may be slow without holding anyone up, and a fold of
        # one update at a time (FedAsync) swung the held-out accuracy by up to 6 points (bench/async_rounds.py).
        data.setdefault("buffer_size", (num_peers + 1) // 2)
        data.setdefault("max_updates", data["rounds"] * num_peers)

    @staticmethod
    def _algorithm(data: dict[str, Any]) -> None:
        """`algorithm` and its settings: federated only, each setting only with the algorithm it belongs to."""
        if data.get("mode") != FEDERATED:
            for key in ("algorithm", "mu", "server_lr"):
                if key in data:
                    raise ma.ValidationError("only for federated sessions (mode=federated)", key)
            return
        # Label-skewed shards drift apart under plain FedAvg: they get the algorithm measured best on them.
        algorithm = data.setdefault("algorithm", SKEWED_DEFAULT if data.get("partition") == "label_skew" else "fedavg")
        if "mu" in data and algorithm != "fedprox":
            raise ma.ValidationError("only with algorithm=fedprox", "mu")
        if "server_lr" in data and algorithm not in ("fedavgm", "fedadam", "fedyogi"):
            raise ma.ValidationError("only with a server optimizer: algorithm=fedavgm, fedadam or fedyogi",
                                     "server_lr")
        if algorithm == "fedprox":
            data.setdefault("mu", 0.01)

    @staticmethod
    def _federated(data: dict[str, Any]) -> None:
        if data["task"] != "classification" and data["partition"] == "label_skew":
            raise ma.ValidationError("label_skew partitions need class labels (task=classification)", "partition")
        shapes = {(tuple(h["hidden"]), h["dropout"]) for h in data["hyperparameters"]}
        if len(shapes) > 1:
            raise ma.ValidationError(
                "federated peers train one model together: give them the same hidden layers and dropout",
                "hyperparameters",
            )


class StartedSchema(ma.Schema):
    session_id = fields.String()
    status = fields.String()
    assigned_peers = fields.List(fields.String())


# --- previewing a dataset ---------------------------------------------------------------------

class PreviewRequestSchema(StrictSchema):
    """The multipart form of `POST /datasets/preview`: the fields of a start that decide how the CSV is read."""

    file = Upload(required=True, metadata={"description": "the dataset, a CSV with a header row"})
    target = fields.String(
        load_default=None, validate=validate.Length(min=1, max=200),
        metadata={"description": "default: `label` when the file has such a column, else the last column"},
    )
    features = NameList(load_default=None, metadata={"type": "string", "description": "comma-separated or JSON list"})
    task = fields.String(load_default="classification", validate=validate.OneOf(["classification", "regression"]))
    mode = fields.String(load_default=SWEEP, validate=validate.OneOf(MODES))
    num_peers = fields.Integer(load_default=1, validate=validate.Range(min=1, max=MAX_PEERS))
    seed = fields.Integer(load_default=0, validate=validate.Range(min=0, max=2**31 - 1))
    partition = fields.String(load_default="iid", validate=validate.OneOf(PARTITIONS))
    alpha = fields.Float(load_default=0.5, validate=validate.Range(min=0.01, max=1000))


class PreviewHeadSchema(ma.Schema):
    columns = fields.List(fields.String(), metadata={"description": "the features, then the target"})
    rows = fields.List(fields.List(fields.Raw()), metadata={"description": "values as the trainer reads them"})


class PreviewSchema(ma.Schema):
    filename = fields.String()
    bytes = fields.Integer()
    rows = fields.Integer()
    columns = fields.List(fields.String(), metadata={"description": "every column of the header"})
    target = fields.String()
    task = fields.String()
    features = fields.List(fields.String())
    classes = fields.List(fields.String(), allow_none=True)
    class_counts = fields.Dict(keys=fields.String(), values=fields.Integer(), allow_none=True)
    head = fields.Nested(PreviewHeadSchema)


# --- reading sessions -------------------------------------------------------------------------

class DatasetSchema(ma.Schema):
    filename = fields.String()
    rows = fields.Integer()
    columns = fields.Integer()
    bytes = fields.Integer()
    sha256 = fields.String()
    classes = fields.List(fields.String(), allow_none=True, dump_default=None)


class PeerRunSchema(ma.Schema):
    name = fields.String()
    status = fields.String()
    hyperparameters = fields.Dict()
    round = fields.Integer()
    epoch = fields.Integer()
    epochs = fields.Integer(allow_none=True, dump_default=None)
    loss = fields.Float(allow_none=True, dump_default=None)
    accuracy = fields.Float(allow_none=True, dump_default=None)
    val_loss = fields.Float(allow_none=True, dump_default=None)
    val_accuracy = fields.Float(allow_none=True, dump_default=None)
    val_r2 = fields.Float(allow_none=True, dump_default=None)
    samples_per_sec = fields.Float(allow_none=True, dump_default=None)
    updated_at = UTCDateTime(allow_none=True, dump_default=None)
    final = fields.Dict()
    samples = fields.Integer(allow_none=True, dump_default=None)
    bytes_fetched = fields.Integer()
    error = fields.String(allow_none=True, dump_default=None)


class RoundSchema(ma.Schema):
    round = fields.Integer()
    metrics = fields.Dict()
    peers = fields.List(fields.String())
    updates = fields.List(fields.Dict(), metadata={
        "description": "async: the updates folded into this version, {seq, peer, staleness, weight} each"})
    rejected = fields.Dict(metadata={"description": "peer → why its weights were left out"})
    outliers = fields.Dict(
        metadata={"description": "peer → how many times farther from the aggregate than the typical peer"})
    finished_at = UTCDateTime()


class SessionSummarySchema(ma.Schema):
    id = fields.String()
    status = fields.String()
    mode = fields.String()
    filename = fields.String(attribute="dataset.filename")
    num_peers = fields.Function(lambda s: len(s.peers))
    reason = fields.String(allow_none=True)
    created_at = UTCDateTime()
    started_at = UTCDateTime(allow_none=True)
    finished_at = UTCDateTime(allow_none=True)
    metric = fields.Function(lambda s: (s.results or {}).get("metric"), allow_none=True,
                             metadata={"description": "what its result is measured by (val_accuracy, val_r2)"})
    best_value = fields.Function(lambda s: (s.results or {}).get("best_value"), allow_none=True,
                                 metadata={"description": "its result on the held-out rows, once it has one"})


class SessionListSchema(ma.Schema):
    items = fields.List(fields.Nested(SessionSummarySchema))
    total = fields.Integer()


class SessionSchema(ma.Schema):
    """A session as read from the database as a plain dict (see models.session.view)."""

    id = fields.Function(lambda s: str(s["_id"]))
    status = fields.String(metadata={"enum": ["PENDING", "RUNNING", "COMPLETED", "FAILED", "CANCELLED",
                                              "INTERRUPTED"]})
    mode = fields.String()
    pool = fields.String(dump_default="public", metadata={"description": "whose peers it was started on"})
    elastic = fields.Boolean(dump_default=False, metadata={
        "description": "whether peers that come online while it runs join it"})
    max_peers = fields.Integer(allow_none=True, dump_default=None)
    task = fields.String()
    target = fields.String()
    features = fields.List(fields.String())
    seed = fields.Integer()
    dataset = fields.Nested(DatasetSchema)
    peers = fields.List(fields.Nested(PeerRunSchema))
    federated = fields.Dict(dump_default=dict)
    min_peers = fields.Integer(allow_none=True, dump_default=None,
                               metadata={"description": "peers that must finish each round (null: all)"})
    round_timeout = fields.Integer(allow_none=True, dump_default=None)
    rounds = fields.List(fields.Nested(RoundSchema), dump_default=list)
    results = fields.Dict(dump_default=dict)
    model_available = fields.Function(lambda s: bool(s.get("model_url")))
    reason = fields.String(allow_none=True, dump_default=None)
    created_at = UTCDateTime()
    started_at = UTCDateTime(allow_none=True, dump_default=None)
    finished_at = UTCDateTime(allow_none=True, dump_default=None)
    search = fields.Dict(allow_none=True, dump_default=None, metadata={
        "description": "a sweep that searches: its space, trials, sampler, pruner, time_budget, and trials begun"})
    resumes = fields.Integer(dump_default=0, metadata={"description": "times it was resumed after an interruption"})
    resumed_at = UTCDateTime(allow_none=True, dump_default=None)


class TrialSchema(ma.Schema):
    number = fields.Integer()
    peer = fields.String()
    params = fields.Dict(metadata={"description": "the values the sampler chose (the space's fixed ones are not here)"})
    hyperparameters = fields.Dict(metadata={"description": "every setting the trial trained with"})
    status = fields.String(metadata={"description": "WAITING, RUNNING, COMPLETED, PRUNED or FAILED"})
    value = fields.Float(allow_none=True, metadata={
        "description": "its best score so far on the held-out rows (accuracy; regression: R²), by the platform"})
    val_loss = fields.Float(allow_none=True, metadata={"description": "held-out loss at that score: the tie-breaker"})
    best_epoch = fields.Integer(allow_none=True)
    epochs_done = fields.Integer()
    epochs = fields.Integer()
    scores = fields.List(fields.Dict(), metadata={"description": "{epoch, value, val_loss} at each rung"})
    curve = fields.List(fields.Dict(), metadata={
        "description": "{epoch, loss, val_loss, metric} as its peer reported them (its own validation rows)"})
    seconds = fields.Float(allow_none=True, metadata={"description": "its peer's training time"})
    reason = fields.String(allow_none=True)
    started_at = UTCDateTime(allow_none=True)
    finished_at = UTCDateTime(allow_none=True)


class TrialListSchema(ma.Schema):
    items = fields.List(fields.Nested(TrialSchema))
    best = fields.Nested(TrialSchema, allow_none=True, metadata={
        "description": "the best trial: highest value, ties to the lower val_loss, then fewer epochs, then the first"})
    metric = fields.String(metadata={"description": "what `value` measures (val_accuracy or val_r2)"})
    tie_breaker = fields.String()


class TrainingStatusSchema(ma.Schema):
    session_id = fields.String()
    status = fields.String()
    reason = fields.String(allow_none=True)


class HeartbeatQuerySchema(StrictSchema):
    peer = fields.String()
    round = fields.Integer(validate=validate.Range(min=0))
    page = fields.Integer(load_default=1, validate=validate.Range(min=1))
    page_size = fields.Integer(load_default=100, validate=validate.Range(min=1, max=1000))


class ModelQuerySchema(StrictSchema):
    round = fields.Integer(validate=validate.Range(min=0), metadata={
        "description": "a federated session's round (asynchronous: fold) whose global model to download; "
                       "default: the final model, or the last round's if the session ended without one"})


class HeartbeatSchema(ma.Schema):
    peer = fields.String()
    round = fields.Integer()
    epoch = fields.Integer()
    epochs = fields.Integer(allow_none=True)
    loss = fields.Float(allow_none=True)
    accuracy = fields.Float(allow_none=True)
    val_loss = fields.Float(allow_none=True)
    val_accuracy = fields.Float(allow_none=True)
    val_r2 = fields.Float(allow_none=True)
    samples_per_sec = fields.Float(allow_none=True)
    seconds = fields.Float(allow_none=True)
    sent_at = UTCDateTime(allow_none=True)


class HeartbeatPageSchema(ma.Schema):
    items = fields.List(fields.Nested(HeartbeatSchema))
    total = fields.Integer()
    page = fields.Integer()
    page_size = fields.Integer()


class RoundListSchema(ma.Schema):
    items = fields.List(fields.Nested(RoundSchema))


class UpdateSchema(ma.Schema):
    seq = fields.Integer(metadata={"description": "the session's n-th task; its heartbeats' `round`"})
    peer = fields.String()
    status = fields.String(metadata={"enum": ["TRAINING", "BUFFERED", "FOLDED", "REJECTED", "LOST"]})
    base_version = fields.Integer(metadata={"description": "the global version it trained from"})
    version = fields.Integer(allow_none=True, dump_default=None,
                             metadata={"description": "the global version it was folded into"})
    staleness = fields.Integer(allow_none=True, dump_default=None)
    weight = fields.Float(allow_none=True, dump_default=None)
    samples = fields.Integer(allow_none=True, dump_default=None)
    metrics = fields.Dict(metadata={"description": "the peer's last local epoch"})
    seconds = fields.Float(allow_none=True, dump_default=None)
    reason = fields.String(allow_none=True, dump_default=None)
    dispatched_at = UTCDateTime()
    received_at = UTCDateTime(allow_none=True, dump_default=None)


class UpdateListSchema(ma.Schema):
    items = fields.List(fields.Nested(UpdateSchema))


class HealthSchema(ma.Schema):
    ok = fields.Boolean()
    checks = fields.Dict(
        keys=fields.String(), values=fields.String(metadata={"enum": ["ok", "unavailable"]}),
        metadata={"description": "database, broker, storage → `ok` or `unavailable` (the API log says why)"},
    )
