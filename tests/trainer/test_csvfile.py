"""Splitting a CSV into per-peer files keeps every row exactly once, as the reader numbers them."""

from __future__ import annotations

import numpy as np

from trainer.csvfile import CsvFile
from trainer.split import shard, split_indices
from trainer.table import read_table


def test_split_writes_each_part_with_the_header_and_its_rows(digits_csv, tmp_path):
    table = read_table(digits_csv)
    train, val = split_indices(table.y, 0.2, seed=1)
    parts = [*shard(train, table.y, 3, "label_skew", alpha=0.5, seed=1), val]
    files = [tmp_path / f"part{i}.csv" for i in range(len(parts))]
    CsvFile(digits_csv).split(parts, files)
    for rows, path in zip(parts, files, strict=True):
        part = read_table(path, classes=table.classes)
        assert part.features == table.features
        np.testing.assert_array_equal(part.x, table.x[rows])
        np.testing.assert_array_equal(part.y, table.y[rows])
    # Verbatim values: the parts add up to the original's size but for their repeated header lines.
    header = digits_csv.read_text().splitlines()[0]
    total = sum(f.stat().st_size for f in files)
    assert total == digits_csv.stat().st_size + (len(files) - 1) * (len(header) + 1)


def test_split_counts_rows_as_the_reader_does_across_blank_lines_and_quotes(tmp_path):
    source = tmp_path / "odd.csv"
    source.write_text('a,"b",label\r\n1,2,x\r\n\r\n"3",4,y\r\n5,6,x\r\n')
    first, second = tmp_path / "1.csv", tmp_path / "2.csv"
    CsvFile(source).split([np.array([0, 2]), np.array([1])], [first, second])
    assert first.read_text() == "a,b,label\n1,2,x\n5,6,x\n"
    assert second.read_text() == "a,b,label\n3,4,y\n"
