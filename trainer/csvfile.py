"""A CSV parsed once by pandas, re-read with the csv module only to say where a problem is (torch-free)."""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterator, Sequence
from typing import Any, BinaryIO, TextIO

import numpy as np
import pandas as pd

from trainer.errors import DatasetError

Source = str | os.PathLike[str] | bytes | bytearray | memoryview | BinaryIO | TextIO

# utf-8-sig reads plain UTF-8 and also drops the byte-order mark that spreadsheet exports put first.
ENCODING = "utf-8-sig"


def _is_blank(record: list[str]) -> bool:
    # pandas skips empty and whitespace-only lines; the csv module yields [] or ["   "] for them.
    return not record or (len(record) == 1 and not record[0].strip())


def _records(text: TextIO) -> Iterator[tuple[int, list[str]]]:
    """(first line number, fields) for every non-blank record, the header included."""
    reader = csv.reader(text)
    end = 0
    try:
        for record in reader:
            start, end = end + 1, reader.line_num  # a quoted field may span several lines
            if not _is_blank(record):
                yield start, record
    except csv.Error as error:
        raise DatasetError(f"line {end + 1}: the file cannot be read as CSV ({error})") from error
    except UnicodeDecodeError as error:
        raise DatasetError(_not_utf8(error)) from error


def _not_utf8(error: UnicodeDecodeError) -> str:
    return (
        f"the file is not UTF-8 text (undecodable byte 0x{error.object[error.start]:02x}): "
        "export or save it as 'CSV UTF-8'"
    )


class CsvFile:
    """The bytes (or path) of a CSV, kept so that a problem found by pandas can be located by line."""

    def __init__(self, source: Source) -> None:
        self.path: str | None = None
        self.data: bytes = b""
        if isinstance(source, bytes | bytearray | memoryview):
            self.data = bytes(source)
        elif isinstance(source, str | os.PathLike):
            self.path = os.fspath(source)
            if not os.path.isfile(self.path):
                raise DatasetError(f"no such file: {self.path}")
        elif hasattr(source, "read"):
            content = source.read()
            self.data = content.encode("utf-8") if isinstance(content, str) else bytes(content)
        else:
            raise TypeError(f"expected a path, bytes or a file object, got {type(source).__name__}")

    def _open(self) -> TextIO:
        # newline="" lets the csv module handle CRLF and newlines inside quoted fields itself.
        if self.path is not None:
            return open(self.path, encoding=ENCODING, newline="")  # closed by the callers' `with`
        return io.TextIOWrapper(io.BytesIO(self.data), encoding=ENCODING, newline="")

    def head(self) -> tuple[list[str], list[str] | None, int | None]:
        """The header's fields, the first data record's fields (None if none) and that record's line."""
        with self._open() as text:
            records = _records(text)
            first = next(records, None)
            if first is None:
                raise DatasetError(
                    "the file is empty: it needs a header line naming the columns, then data rows"
                )
            second = next(records, None)
        return first[1], (second[1] if second else None), (second[0] if second else None)

    def line_of_row(self, row: int) -> int:
        """The file line on which 0-based data row `row` starts (the header is line 1 when first)."""
        with self._open() as text:
            for index, (line, _) in enumerate(_records(text)):
                if index == row + 1:
                    return line
        raise IndexError(row)

    def first_ragged(self, columns: int) -> tuple[int, int] | None:
        """(line, number of fields) of the first data record whose length differs from the header's."""
        with self._open() as text:
            records = _records(text)
            next(records, None)
            for line, record in records:
                if len(record) != columns:
                    return line, len(record)
        return None

    def split(self, parts: Sequence[np.ndarray], destinations: Sequence[str | os.PathLike[str]]) -> None:
        """Write the header and the data rows of each part (0-based row numbers) to its own CSV, in one pass."""
        size = max((int(np.max(p)) + 1 for p in parts if len(p)), default=0)
        owner = np.full(size, -1, dtype=np.int64)
        for index, rows in enumerate(parts):
            owner[np.asarray(rows, dtype=np.int64)] = index
        files = [open(d, "w", encoding="utf-8", newline="") for d in destinations]  # noqa: SIM115
        try:
            writers = [csv.writer(f, lineterminator="\n") for f in files]
            with self._open() as text:
                records = _records(text)
                header = next(records)[1]
                for writer in writers:
                    writer.writerow(header)
                for row, (_, record) in enumerate(records):
                    if row < len(owner) and owner[row] >= 0:
                        writers[owner[row]].writerow(record)
        finally:
            for f in files:
                f.close()

    def frame(self, names: list[str]) -> pd.DataFrame:
        """All rows parsed by pandas' C reader under the (validated) header `names`, types inferred."""
        # Types are left to pandas: asking for float32 up front is slower (it then keeps one block per
        # column). A numeric column with text further down comes back as text; the caller finds the cell.
        try:
            return self._read(names)
        except pd.errors.DtypeWarning:
            # Raised only where warnings are errors (as in tests): pandas guessed a column's type chunk by
            # chunk and the guesses differ. Infer over whole columns instead, which never warns.
            return self._read(names, low_memory=False)

    def _read(self, names: list[str], **options: Any) -> pd.DataFrame:
        source = self.path if self.path is not None else io.BytesIO(self.data)
        try:
            return pd.read_csv(source, header=0, names=names, encoding=ENCODING, **options)
        except UnicodeDecodeError as error:
            raise DatasetError(_not_utf8(error)) from error
        except pd.errors.ParserError as error:
            ragged = self.first_ragged(len(names))
            if ragged is not None:
                raise ragged_error(*ragged, len(names)) from None
            detail = str(error).strip().replace("Error tokenizing data. C error: ", "")
            raise DatasetError(f"the file cannot be read as CSV: {detail} (an unclosed quote?)") from None


def ragged_error(line: int, fields: int, columns: int) -> DatasetError:
    """The error for a row whose number of fields differs from the header's."""
    return DatasetError(
        f"line {line} has {fields} field{'s' if fields != 1 else ''} but the header has "
        f"{columns} columns: every row needs one value per column (a stray or missing comma?)"
    )
