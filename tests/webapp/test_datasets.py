"""Previewing an upload: the columns and first rows as a start would read them, and nothing started."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from models import Peer, TrainingSession
from models.peer import ONLINE
from settings import ROOT

WINE = ROOT / "samples" / "wine.csv"


def post(client, headers, path: Path | bytes, route: str = "/datasets/preview", **form):
    data = {k: str(v) for k, v in form.items()}
    content = path.read_bytes() if isinstance(path, Path) else path
    data["file"] = (io.BytesIO(content), "data.csv")
    return client.post(route, headers=headers, data=data, content_type="multipart/form-data")


def test_preview_shows_the_columns_first_rows_and_classes_as_the_trainer_reads_them(client, auth):
    response = post(client, auth, WINE)
    assert response.status_code == 200, response.json
    body = response.json
    header = WINE.read_text().splitlines()[0].split(",")
    assert body["columns"] == header
    assert body["target"] == "label" and body["features"] == header[:-1]
    assert body["rows"] == 178 and body["bytes"] == WINE.stat().st_size
    assert body["classes"] == ["0", "1", "2"]
    assert body["class_counts"] == {"0": 59, "1": 71, "2": 48}
    assert body["head"]["columns"] == header
    # The first data line, 14.23,1.71,...,1065,0, as floats with the class label last.
    first = WINE.read_text().splitlines()[1].split(",")
    assert body["head"]["rows"][0] == [float(v) for v in first[:-1]] + ["0"]
    assert len(body["head"]["rows"]) == 5


def test_preview_defaults_the_target_to_the_last_column_when_none_is_called_label(client, auth):
    csv = b"a,b,kind\n1,2,x\n3,4,y\n5,6,x\n7,8,y\n9,10,x\n"
    body = post(client, auth, csv).json
    assert body["target"] == "kind" and body["features"] == ["a", "b"] and body["classes"] == ["x", "y"]
    chosen = post(client, auth, csv, target="b", features="a", task="regression").json
    assert chosen["target"] == "b" and chosen["features"] == ["a"] and chosen["classes"] is None
    assert chosen["head"]["rows"][0] == [1.0, 2.0]


@pytest.mark.parametrize(
    ("content", "form", "says"),
    [
        (b"a;b;label\n1;2;0\n", {}, "separator"),
        (b"a,b,label\n1,2,0\n3,oops,1\n", {}, "oops"),
        (b"a,b,label\n1,2,0\n3,4,1\n", {"target": "kind"}, "the columns are: a, b, label"),
        (b"a,b,label\n" + b"1,2,0\n" * 3 + b"3,4,1\n" * 3, {"mode": "federated", "num_peers": 8}, "shard"),
    ],
)
def test_preview_refuses_what_a_start_would_refuse_with_the_same_message(client, auth, online_peers, content, form,
                                                                        says):
    online_peers(8)
    preview = post(client, auth, content, **form)
    assert preview.status_code == 400
    assert says in preview.json["message"]
    start = post(client, auth, content, route="/sessions/start", **{"num_peers": 1, **form})
    assert start.status_code == 400
    assert start.json["message"] == preview.json["message"]
    assert Peer.objects(status=ONLINE).count() == 8


def test_preview_starts_nothing_and_stores_nothing(client, auth, online_peers, storage_dir):
    online_peers(2)
    assert post(client, auth, WINE).status_code == 200
    assert TrainingSession.objects.count() == 0
    assert Peer.objects(status=ONLINE).count() == 2
    assert not any(storage_dir.iterdir())


def test_preview_needs_a_token(client):
    response = post(client, {}, WINE)
    assert response.status_code == 401
    assert response.json["code"] == 401
