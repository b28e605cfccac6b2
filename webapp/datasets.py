"""Datasets: check a CSV as a start would read it, before starting anything (the dashboard's form uses it)."""

from __future__ import annotations

from typing import Any

from flask.views import MethodView
from flask_jwt_extended import jwt_required
from flask_smorest import abort

from trainer.table import DatasetError, Table, read_columns
from webapp import launch
from webapp.extensions import Blueprint
from webapp.schemas import PreviewRequestSchema, PreviewSchema

blp = Blueprint("datasets", __name__, url_prefix="/datasets", description="Datasets")

HEAD_ROWS = 5
DEFAULT_TARGET = "label"


@blp.route("/preview")
class Preview(MethodView):
    @jwt_required()
    @blp.arguments(PreviewRequestSchema, location="multipart")
    @blp.response(200, PreviewSchema)
    @blp.alt_response(413, description="the upload is over the size cap")
    @blp.doc(security=[{"bearerAuth": []}])
    def post(self, form: dict):
        """Read and validate a CSV exactly as `POST /sessions/start` would, and start nothing.

        Answers its columns, the first rows as the trainer reads them, the row count and the classes;
        or the 400 that a start with the same file and fields would get.
        """
        with launch.spooled(form["file"]) as upload:
            if form["target"] is None:
                form["target"] = _default_target(upload.path)
            # A start splits with a seed of its own (secret); any seed checks that the split and shards can be made.
            table = launch.inspect_upload(upload, form, form.get("seed") or 0)
            return {
                "filename": upload.filename,
                "bytes": upload.bytes,
                "rows": table.rows,
                "columns": table.columns,
                "target": table.target,
                "task": table.task,
                "features": table.features,
                "classes": table.classes,
                "class_counts": table.class_counts() if table.classes is not None else None,
                "head": _head(table),
            }


def _default_target(path: Any) -> str:
    try:
        columns = read_columns(path)
    except DatasetError as exc:
        abort(400, message=f"the dataset cannot be used: {exc}", errors={"file": [str(exc)]})
    return DEFAULT_TARGET if DEFAULT_TARGET in columns else columns[-1]


def _head(table: Table) -> dict[str, Any]:
    """The first rows as the trainer holds them: float32 features (7 significant digits) and the target."""
    rows = []
    for x, y in zip(table.x[:HEAD_ROWS].tolist(), table.y[:HEAD_ROWS].tolist(), strict=True):
        target = table.classes[y] if table.classes is not None else _float32(y)
        rows.append([*(_float32(v) for v in x), target])
    return {"columns": [*table.features, table.target], "rows": rows}


def _float32(value: float) -> float:
    # A float32 printed as a float64 shows noise (14.229999542); 7 digits are all it holds.
    return float(f"{value:.7g}")
