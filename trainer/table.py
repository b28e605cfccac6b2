"""Read a CSV into a validated table of float32 features and encoded targets (torch-free: the API uses it)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pandas as pd

from trainer.csvfile import CsvFile, Source, ragged_error
from trainer.errors import DatasetError
from trainer.normalization import Normalization, fit_normalization
from trainer.split import check_splittable, shard, split_indices

__all__ = [
    "TASKS",
    "DatasetError",
    "Normalization",
    "Source",
    "Table",
    "check_splittable",
    "fit_normalization",
    "read_columns",
    "read_features",
    "read_table",
    "shard",
    "split_indices",
]

TASKS = ("classification", "regression")
_SHOWN_COLUMNS = 30  # longer headers are abbreviated in messages
_PARALLEL_CELLS = 1 << 23  # smaller matrices are copied on one thread: a second costs more than it saves


@dataclass
class Table:
    """A validated dataset: features x [rows, n_features] float32 and targets y [rows]."""

    features: list[str]
    target: str
    task: str
    x: np.ndarray  # [rows, n_features] float32
    y: np.ndarray  # [rows] int64 class index (classification) or float32 (regression)
    classes: list[str] | None  # class labels, in index order; None for regression
    columns: list[str]  # every column of the file's header

    @property
    def rows(self) -> int:
        """Number of data rows."""
        return int(self.x.shape[0])

    @property
    def output_size(self) -> int:
        """Model outputs needed: one per class, or 1 for regression."""
        return len(self.classes) if self.classes is not None else 1

    def class_counts(self) -> dict[str, int]:
        """Rows per class label (every class of `classes`, zero included)."""
        if self.classes is None:
            raise DatasetError("class counts exist only for classification")
        counts = np.bincount(self.y, minlength=len(self.classes))
        return {label: int(n) for label, n in zip(self.classes, counts, strict=True)}


def read_table(
    source: Source,
    target: str = "label",
    features: Sequence[str] | None = None,
    task: str = "classification",
    classes: Sequence[str] | None = None,
) -> Table:
    """Read and validate a CSV; features default to every column but the target."""
    if task not in TASKS:
        raise DatasetError(f"task must be one of {', '.join(TASKS)}; got {task!r}")
    if classes is not None:
        classes = _check_classes(classes, task)
    target = target.strip()
    file = CsvFile(source)
    columns = _read_header(file)
    if target not in columns:
        raise DatasetError(f"target column {target!r} not found; the columns are: {_listing(columns)}")
    chosen = _choose_features(columns, target, features)
    frame = _read_rows(file, columns)
    x = _feature_matrix(file, frame, chosen)
    if task == "classification":
        y, found = _encode_classes(file, frame, target, classes)
    else:
        y, found = _numeric_target(file, frame, target), None
    return Table(features=chosen, target=target, task=task, x=x, y=y, classes=found, columns=columns)


def read_columns(source: Source) -> list[str]:
    """The column names of a CSV's header, checked as `read_table` checks them (to offer a target to pick)."""
    return _read_header(CsvFile(source))


def read_features(source: Source, features: Sequence[str]) -> np.ndarray:
    """Only the named feature columns of a CSV, validated, as float32 [rows, n_features] (e.g. to predict)."""
    file = CsvFile(source)
    columns = _read_header(file)
    missing = [name for name in features if name not in columns]
    if missing:
        raise DatasetError(
            f"feature column{'s' if len(missing) > 1 else ''} {_names(missing)} not found; "
            f"the columns are: {_listing(columns)}"
        )
    return _feature_matrix(file, _read_rows(file, columns), list(features))


def _listing(columns: Sequence[str]) -> str:
    shown = ", ".join(columns[:_SHOWN_COLUMNS])
    more = len(columns) - _SHOWN_COLUMNS
    return shown + (f", … ({more} more)" if more > 0 else "")


def _names(names: Sequence[str]) -> str:
    return ", ".join(repr(name) for name in names)


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _unquote(name: str) -> str:
    # `a, "b"`: the csv reader keeps the quotes of a field that starts with a space.
    name = name.strip()
    if len(name) >= 2 and name[0] == name[-1] == '"':
        name = name[1:-1].replace('""', '"').strip()
    return name


def _cell(series: pd.Series, row: int) -> str:
    """A cell as the user wrote it (near enough): text quoted, numbers plain."""
    value = series.iloc[row]
    return repr(value) if isinstance(value, str) else f"'{value}'"


def _read_header(file: CsvFile) -> list[str]:
    """The stripped column names, after checking the header and the first row's length."""
    header, first_row, first_line = file.head()
    names = [_unquote(name) for name in header]
    if all(_looks_numeric(name) for name in names):
        raise DatasetError(
            "line 1 looks like data, not a header: the first line must name the columns, "
            f"e.g. {','.join(f'x{i + 1}' for i in range(max(len(names) - 1, 1)))},label"
        )
    if len(names) == 1:
        hint = next(
            (
                f" (it seems to use {sep!r} as the separator: use commas)"
                for sep in (";", "\t", "|")
                if sep in header[0]
            ),
            "",
        )
        raise DatasetError(
            f"the header names a single column {names[0]!r}{hint}: "
            "a dataset needs feature columns and a target column"
        )
    for position, name in enumerate(names, start=1):
        if not name:
            trailing = " (a trailing comma?)" if position == len(names) else ""
            raise DatasetError(
                f"column {position} of the header (line 1) has no name{trailing}: every column needs a name"
            )
    seen: dict[str, int] = {}
    for position, name in enumerate(names, start=1):
        if name in seen:
            raise DatasetError(
                f"column name {name!r} appears more than once in the header "
                f"(columns {seen[name]} and {position}): column names must be unique"
            )
        seen[name] = position
    if first_row is None:
        raise DatasetError("the file has a header but no data rows")
    if len(first_row) > len(names):
        # pandas would silently take the extra first field as a row index, so catch it here.
        raise ragged_error(first_line or 2, len(first_row), len(names))
    return names


def _choose_features(columns: list[str], target: str, features: Sequence[str] | None) -> list[str]:
    if features is None:
        return [name for name in columns if name != target]
    chosen = [name.strip() for name in features]
    if not chosen:
        raise DatasetError(
            "the feature list is empty: name at least one feature column, or leave it out "
            "to use every column but the target"
        )
    missing = [name for name in chosen if name not in columns]
    if missing:
        raise DatasetError(
            f"feature column{'s' if len(missing) > 1 else ''} {_names(missing)} not found; "
            f"the columns are: {_listing(columns)}"
        )
    if target in chosen:
        raise DatasetError(f"the target column {target!r} cannot also be a feature")
    repeated = sorted({name for name in chosen if chosen.count(name) > 1})
    if repeated:
        raise DatasetError(f"feature list names {_names(repeated)} more than once")
    return chosen


def _read_rows(file: CsvFile, columns: list[str]) -> pd.DataFrame:
    frame = file.frame(columns)
    if len(frame) == 0:
        raise DatasetError("the file has a header but no data rows")
    return frame


def _first_bad_row(mask: np.ndarray) -> int:
    return int(np.argmax(mask))


def _where(file: CsvFile, row: int, column: str) -> str:
    return f"line {file.line_of_row(row)}, column {column!r}"


def _missing(file: CsvFile, row: int, column: str, columns: int, what: str = "value") -> DatasetError:
    # pandas fills the missing fields of a short row with NaN: report that row as ragged instead.
    line = file.line_of_row(row)
    ragged = file.first_ragged(columns)
    if ragged is not None and ragged[0] <= line:
        return ragged_error(*ragged, columns)
    return DatasetError(
        f"line {line}, column {column!r}: missing {what} (empty, NA or NaN): fill it in or remove the row"
    )


def _is_number_column(series: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(series)  # bool included: True/False read as 1/0


def _to_numbers(series: pd.Series) -> tuple[np.ndarray, int | None]:
    """A text column as float64 [rows] (blanks become NaN), and the row of its first non-number, if any."""
    text = series.astype("string").str.strip().replace("", pd.NA)
    numbers = pd.to_numeric(text, errors="coerce")
    bad = (numbers.isna() & text.notna()).to_numpy(dtype=bool)
    row = _first_bad_row(bad) if bad.any() else None
    return numbers.to_numpy(dtype=np.float64, na_value=np.nan), row


def _copy_finite(source: np.ndarray, x: np.ndarray) -> bool:
    """x[...] = source, and whether x's sum is finite: true when every cell is, and cheaper than checking each.

    pandas stores columns apart (a column-major block), so this casts and transposes in one copy. On large
    tables two threads take half the rows each (numpy copies without the GIL): the copy is bound by memory
    latency, not bandwidth, and this halves it. A false answer (a NaN or inf, or finite cells whose float32
    sum overflows) sends the caller cell by cell.
    """

    def copy(rows: slice) -> bool:
        with np.errstate(over="ignore", invalid="ignore"):  # beyond float32's range becomes inf, reported later
            x[rows] = source[rows]
            return bool(np.isfinite(x[rows].sum()))

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if x.size < _PARALLEL_CELLS or cores < 2:
        return copy(slice(None))
    half = len(x) // 2
    with ThreadPoolExecutor(2) as pool:
        return all(pool.map(copy, (slice(0, half), slice(half, None))))


def _feature_matrix(file: CsvFile, frame: pd.DataFrame, features: list[str]) -> np.ndarray:
    """x [rows, n_features] float32, after checking every cell is a finite number."""
    part = frame[features]
    text_columns = [
        column
        for column, dtype in zip(features, part.dtypes, strict=True)
        if not pd.api.types.is_numeric_dtype(dtype)  # bool included: True/False read as 1/0
    ]
    if text_columns:
        converted, problems = {}, []
        for column in text_columns:
            converted[column], row = _to_numbers(part[column])
            if row is not None:
                problems.append((row, features.index(column), column))
        if problems:
            row, _, column = min(problems)  # the first bad cell in reading order
            raise DatasetError(
                f"{_where(file, row, column)}: {_cell(part[column], row)} is not a number (if "
                "this column holds categories, leave it out of the features or encode it as numbers)"
            )
        part = part.assign(**converted)
    x = np.empty((len(part), len(features)), dtype=np.float32)
    suspect = not _copy_finite(part.to_numpy(), x)
    bad = ~np.isfinite(x) if suspect else None
    if bad is not None and bad.any():
        row = _first_bad_row(bad.any(axis=1))
        col = _first_bad_row(bad[row])
        if np.isnan(x[row, col]):
            raise _missing(file, row, features[col], len(frame.columns))
        raise DatasetError(
            f"{_where(file, row, features[col])}: {_cell(frame[features[col]], row)} is infinite "
            "or too large for a 32-bit float"
        )
    return x


def _check_classes(classes: Sequence[str], task: str) -> list[str]:
    if task != "classification":
        raise DatasetError("a class list applies only to classification")
    names = [str(name).strip() for name in classes]
    if len(names) < 2 or len(set(names)) != len(names) or not all(names):
        raise DatasetError(f"the class list must hold at least two distinct, non-blank labels; got {names}")
    return names


def _label(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _encode_classes(
    file: CsvFile, frame: pd.DataFrame, column: str, classes: list[str] | None
) -> tuple[np.ndarray, list[str]]:
    """y [rows] int64 indices into the sorted labels (numbers sort numerically), or into `classes`."""
    series = frame[column]
    if pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series):
        numbers: np.ndarray | None = series.to_numpy(dtype=np.float64, na_value=np.nan)
        absent = np.isnan(numbers)
    else:
        text = series.astype("string").str.strip().replace("", pd.NA)
        numbers, bad_row = _to_numbers(text)
        absent = text.isna().to_numpy(dtype=bool)
        if bad_row is not None:
            numbers = None  # names, not numbers ("cat", "dog")
    if absent.any():
        raise _missing(file, _first_bad_row(absent), column, len(frame.columns), "label")
    if numbers is not None:
        odd = ~np.isfinite(numbers) | (numbers != np.floor(numbers))
        if odd.any():
            row = _first_bad_row(odd)
            raise DatasetError(
                f"{_where(file, row, column)}: label {_cell(series, row)} is not a whole number: "
                "class labels must be names or integers (for a numeric target, use the "
                "'regression' task)"
            )
        codes, uniques = pd.factorize(numbers, sort=True)
        found = [_label(value) for value in uniques]
    else:
        codes, uniques = pd.factorize(text.to_numpy(dtype=object), sort=True)
        found = [str(value) for value in uniques]
    if classes is None:
        if len(found) < 2:
            raise DatasetError(
                f"column {column!r} has a single class ({found[0]!r}): classification needs "
                "rows of at least two classes"
            )
        return codes.astype(np.int64), found
    index = {label: i for i, label in enumerate(classes)}
    unknown = [i for i, label in enumerate(found) if label not in index]
    if unknown:
        row = _first_bad_row(codes == unknown[0])
        raise DatasetError(
            f"{_where(file, row, column)}: label {found[unknown[0]]!r} is not one of the "
            f"classes: {_listing(classes)}"
        )
    lookup = np.array([index[label] for label in found], dtype=np.int64)
    return lookup[codes], list(classes)


def _numeric_target(file: CsvFile, frame: pd.DataFrame, column: str) -> np.ndarray:
    """y [rows] float32 for regression."""
    series = frame[column]
    if _is_number_column(series):
        numbers = series.to_numpy(dtype=np.float64, na_value=np.nan)
    else:
        numbers, row = _to_numbers(series)
        if row is not None:
            raise DatasetError(
                f"{_where(file, row, column)}: {_cell(series, row)} is not a number (regression "
                "needs a numeric target; for categories, use the 'classification' task)"
            )
    if np.isnan(numbers).any():
        raise _missing(file, _first_bad_row(np.isnan(numbers)), column, len(frame.columns), "target value")
    with np.errstate(over="ignore"):  # beyond float32's range becomes inf, reported below
        y = numbers.astype(np.float32)
    if not np.isfinite(y).all():
        row = _first_bad_row(~np.isfinite(y))
        raise DatasetError(
            f"{_where(file, row, column)}: target {_cell(series, row)} is infinite or too large "
            "for a 32-bit float"
        )
    if y.size > 1 and float(np.ptp(numbers)) == 0.0:
        raise DatasetError(f"column {column!r} has the same value in every row: there is nothing to learn")
    return y
