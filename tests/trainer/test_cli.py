"""The command lines, run as a user runs them: `python -m trainer` and `python -m trainer.predict`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.__main__ import main

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, check=False, timeout=120
    )


def test_train_json_save_then_predict(digits_csv, tmp_path):
    out = tmp_path / "digits.safetensors"
    trained = _run(
        "trainer",
        str(digits_csv),
        "--epochs",
        "3",
        "--batch-size",
        "32",
        "--hidden",
        "64",
        "--threads",
        "1",
        "--json",
        "--out",
        str(out),
    )
    assert trained.returncode == 0, trained.stderr
    report = json.loads(trained.stdout)  # the whole of stdout is one JSON object
    assert [m["epoch"] for m in report["history"]] == [1, 2, 3]
    assert report["final"]["split"] == "validation" and report["final"]["accuracy"] > 0.8
    assert report["final"]["accuracy"] == report["history"][-1]["val_accuracy"]
    predicted = _run("trainer.predict", str(out), str(digits_csv), "--threads", "1")
    assert predicted.returncode == 0, predicted.stderr
    lines = predicted.stdout.splitlines()
    labels = [line.rsplit(",", 1)[1] for line in digits_csv.read_text().splitlines()[1:]]
    assert len(lines) == len(labels) == 1797
    assert sum(p == t for p, t in zip(lines, labels, strict=True)) / len(labels) > 0.8


def test_bad_dataset_exits_2_with_the_message_and_no_traceback(write):
    result = _run("trainer", str(write("a,b,label\n1,2,0\n3,x,1\n")))
    assert result.returncode == 2 and result.stdout == ""
    assert (
        result.stderr == "error: line 3, column 'b': 'x' is not a number (if this column holds categories, "
        "leave it out of the features or encode it as numbers)\n"
    )


def test_one_line_per_epoch(blobs, capsys):
    assert main([str(blobs), "--epochs", "4", "--hidden", "8", "--threads", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in lines if line.startswith("epoch")] == ["1/4", "2/4", "3/4", "4/4"]
    assert "val_acc" in lines[0] and "samples/s" in lines[0] and lines[-1].startswith("validation: loss")


def test_regression_json_reports_r2_and_rmse(diabetes_csv, capsys):
    assert (
        main(
            [
                str(diabetes_csv),
                "--task",
                "regression",
                "--epochs",
                "2",
                "--hidden",
                "8",
                "--json",
                "--threads",
                "1",
                "--val-fraction",
                "0",
            ]
        )
        == 0
    )
    final = json.loads(capsys.readouterr().out)["final"]
    assert final["split"] == "training" and set(final) == {"split", "loss", "r2", "samples", "rmse"}


@pytest.mark.parametrize(
    "args", [["--hidden", "a,b"], ["--epochs", "0"], ["--task", "ranking"], ["--lr", "-1"]]
)
def test_bad_options_exit_2(blobs, args, capsys):
    with pytest.raises(SystemExit) as stop:
        main([str(blobs), *args])
    assert stop.value.code == 2 and "error:" in capsys.readouterr().err


def test_missing_target_lists_columns(blobs, capsys):
    assert main([str(blobs), "--target", "species"]) == 2
    assert capsys.readouterr().err == (
        "error: target column 'species' not found; the columns are: f0, f1, f2, f3, label\n"
    )


def test_predict_refuses_a_file_that_is_not_a_model(blobs, tmp_path):
    fake = tmp_path / "model.safetensors"
    fake.write_bytes(b"not a model")
    result = _run("trainer.predict", str(fake), str(blobs))
    assert result.returncode == 2 and result.stderr.startswith("error: not a safetensors file")
    assert "Traceback" not in result.stderr
