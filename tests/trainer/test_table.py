"""Reading CSVs into tables: what real files carry is accepted, every bad file gets a message to act on."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from trainer.table import DatasetError, read_features, read_table

ROOT = Path(__file__).resolve().parents[2]
GOOD = "a,b,label\n1,2,0\n3,4,1\n5,6,0\n"


def test_reads_a_numeric_dataset(blobs):
    table = read_table(blobs)
    assert table.features == ["f0", "f1", "f2", "f3"]
    assert table.columns == ["f0", "f1", "f2", "f3", "label"]
    assert table.x.dtype == np.float32 and table.x.shape == (200, 4) and table.x.flags.c_contiguous
    assert table.y.dtype == np.int64 and table.rows == 200
    assert table.classes == ["0", "1"] and table.output_size == 2
    assert table.class_counts() == {"0": 100, "1": 100}


def test_numeric_labels_sort_as_numbers_and_become_strings():
    table = read_table(b"a,label\n1,10\n2,2\n3,1\n4,2.0\n")
    assert table.classes == ["1", "2", "10"]
    assert table.y.tolist() == [2, 1, 0, 1]


def test_string_labels_are_encoded_with_the_class_list():
    table = read_table(b"x,species\n1,virginica\n2, setosa\n3,versicolor\n4,setosa\n", target="species")
    assert table.classes == ["setosa", "versicolor", "virginica"]
    assert table.y.tolist() == [2, 0, 1, 0]


def test_given_classes_encode_a_shard_that_lacks_some():
    table = read_table(b"a,label\n1,dog\n2,dog\n", classes=["cat", "dog", "emu"])
    assert table.classes == ["cat", "dog", "emu"] and table.y.tolist() == [1, 1]


def test_a_label_outside_the_given_classes_names_its_line():
    with pytest.raises(
        DatasetError, match=r"line 3, column 'label': label 'owl' is not one of the classes: cat, dog"
    ):
        read_table(b"a,label\n1,dog\n2,owl\n", classes=["cat", "dog"])


def test_features_can_be_chosen_by_name_in_any_order():
    table = read_table(b"id,b,label,a\nx,2,0,1\ny,4,1,3\n", features=["a", "b"])
    assert table.features == ["a", "b"]
    assert table.x.tolist() == [[1, 2], [3, 4]]


def test_regression_target_is_float():
    table = read_table(b"a,price\n1,1.5\n2,2.5\n", target="price", task="regression")
    assert table.y.dtype == np.float32 and table.y.tolist() == [1.5, 2.5]
    assert table.classes is None and table.output_size == 1


@pytest.mark.parametrize(
    "content",
    [
        "\ufeffa,b,label\n1,2,0\n3,4,1\n5,6,0\n",  # byte-order mark from spreadsheet exports
        "a,b,label\r\n1,2,0\r\n3,4,1\r\n5,6,0\r\n",  # Windows line ends
        " a , b ,label \n1,2,0\n3,4,1\n5,6,0\n",  # spaces around names
        '"a","b","label"\n"1","2","0"\n3,"4",1\n5,6,"0"\n',  # quoted fields
        'a, "b" ,label\n1, 2 ,0\n3,4,1\n\n5,6,0\n\n',  # spaces around values, blank lines
    ],
)
def test_tolerates_what_real_files_carry(write, content):
    table = read_table(write(content))
    assert table.features == ["a", "b"]
    assert table.x.tolist() == [[1, 2], [3, 4], [5, 6]] and table.y.tolist() == [0, 1, 0]


@pytest.mark.parametrize("source", [GOOD.encode(), io.BytesIO(GOOD.encode()), io.StringIO(GOOD)])
def test_reads_bytes_and_file_objects(source):
    assert read_table(source).rows == 3


def test_line_numbers_count_blank_lines_and_quoted_newlines():
    data = b'a,b,note,label\n1,2,"two\nlines",0\n\n3,oops,z,1\n'
    with pytest.raises(DatasetError, match=r"^line 5, column 'b': 'oops' is not a number"):
        read_table(data, features=["a", "b"])


def test_read_features_needs_no_target():
    x = read_features(b"b,a\n2,1\n4,3\n", ["a", "b"])
    assert x.tolist() == [[1, 2], [3, 4]]


def test_importing_table_does_not_load_torch():
    code = (
        "import sys, trainer.table, trainer.dataset, trainer.split, trainer.normalization; "
        "sys.exit(1 if 'torch' in sys.modules else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=False).returncode == 0


BAD = {
    "empty file": (b"", r"^the file is empty"),
    "only blank lines": (b"\n  \n", r"^the file is empty"),
    "no header": (b"1,2,0\n3,4,1\n", r"^line 1 looks like data, not a header"),
    "header only": (b"a,b,label\n", r"^the file has a header but no data rows"),
    "duplicate column": (
        b"a,a,label\n1,2,0\n",
        r"^column name 'a' appears more than once in the header \(columns 1 and 2\)",
    ),
    "blank column name": (b"a,,label\n1,2,0\n", r"^column 2 of the header \(line 1\) has no name"),
    "trailing comma": (b"a,b,label,\n1,2,0,\n", r"has no name \(a trailing comma\?\)"),
    "missing target": (b"a,b,y\n1,2,0\n", r"^target column 'label' not found; the columns are: a, b, y$"),
    "non-numeric value": (b"a,b,label\n1,2,0\n3,x,1\n", r"^line 3, column 'b': 'x' is not a number"),
    "missing value": (b"a,b,label\n1,2,0\n\n3,,1\n", r"^line 4, column 'b': missing value"),
    "NaN value": (b"a,b,label\n1,2,0\n3,NaN,1\n", r"^line 3, column 'b': missing value"),
    "infinite value": (b"a,b,label\n1,2,0\n3,-inf,1\n", r"^line 3, column 'b': '-inf' is infinite"),
    "too large for float32": (
        b"a,b,label\n1,2,0\n3,1e39,1\n",
        r"^line 3, column 'b': '1e\+39' is infinite or too large",
    ),
    "single class": (b"a,b,label\n1,2,0\n3,4,0\n", r"^column 'label' has a single class \('0'\)"),
    "long row": (b"a,b,label\n1,2,0\n3,4,1,5\n", r"^line 3 has 4 fields but the header has 3 columns"),
    "long first row": (b"a,b,label\n1,2,0,9\n3,4,1\n", r"^line 2 has 4 fields but the header has 3 columns"),
    "short row": (b"a,b,label\n1,2,0\n3,4\n", r"^line 3 has 2 fields but the header has 3 columns"),
    "not UTF-8": ("a,b,label\n1,2,café\n".encode("latin-1"), r"^the file is not UTF-8 text"),
    "semicolons": (b"a;b;label\n1;2;0\n", r"it seems to use ';' as the separator"),
    "missing label": (b"a,b,label\n1,2,0\n3,4,\n5,6,1\n", r"^line 3, column 'label': missing label"),
    "fractional label": (
        b"a,b,label\n1,2,0.5\n3,4,1\n",
        r"label '0.5' is not a whole number.*'regression' task",
    ),
    "unclosed quote": (b'a,b,label\n1,2,"0\n3,4,1\n', r"cannot be read as CSV.*unclosed quote"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_dataset_gets_a_message_naming_the_problem(case):
    content, message = BAD[case]
    with pytest.raises(DatasetError, match=message):
        read_table(content)


def test_missing_feature_column_lists_the_columns():
    with pytest.raises(
        DatasetError, match=r"^feature columns 'c', 'd' not found; the columns are: a, b, label$"
    ):
        read_table(GOOD.encode(), features=["a", "c", "d"])


def test_target_cannot_be_a_feature():
    with pytest.raises(DatasetError, match="cannot also be a feature"):
        read_table(GOOD.encode(), features=["a", "label"])


def test_missing_file_is_a_dataset_error(tmp_path):
    with pytest.raises(DatasetError, match="no such file"):
        read_table(tmp_path / "nope.csv")


def test_text_deep_in_a_numeric_column_is_found(write):
    # pandas guesses types in chunks: the bad cell sits far below the first chunk.
    rows = 200_000
    path = write("a,label\n" + "1,0\n2,1\n" * (rows // 2) + "oops,1\n")
    with pytest.raises(DatasetError, match=rf"^line {rows + 2}, column 'a': 'oops' is not a number"):
        read_table(path)


def test_regression_target_must_be_numeric():
    with pytest.raises(DatasetError, match=r"^line 3, column 'label': 'abc' is not a number \(regression"):
        read_table(b"a,label\n1,1.5\n2,abc\n", task="regression")


def test_unknown_task_is_refused():
    with pytest.raises(DatasetError, match="task must be one of classification, regression"):
        read_table(GOOD.encode(), task="clustering")


def test_huge_but_finite_values_are_accepted():
    # their float32 sum overflows, which must not be mistaken for an infinite cell
    x = read_table(b"a,b,label\n3e38,3e38,0\n3e38,3e38,1\n").x
    assert np.array_equal(x, np.full((2, 2), 3e38, dtype=np.float32))


@pytest.mark.parametrize("threshold", [1, 1 << 30])  # every table split across two threads, and none
def test_large_tables_copied_in_parallel_read_the_same(monkeypatch, threshold):
    import trainer.table

    monkeypatch.setattr(trainer.table, "_PARALLEL_CELLS", threshold)
    rng = np.random.default_rng(0)
    x = rng.integers(-999, 999, size=(301, 5)) / 8  # exact in float32 and in the CSV
    lines = ["a,b,c,d,e,label"] + [",".join(map(str, row)) + f",{i % 3}" for i, row in enumerate(x)]
    table = read_table("\n".join(lines).encode())
    assert table.x.flags.c_contiguous
    assert np.array_equal(table.x, x.astype(np.float32))
    cells = lines[250].split(",")
    lines[250] = ",".join([cells[0], "inf", *cells[2:]])  # in the second half of the rows
    with pytest.raises(DatasetError, match=r"line 251, column 'b': 'inf' is infinite"):
        read_table("\n".join(lines).encode())
