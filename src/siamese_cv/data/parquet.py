"""Parquet layouts of the pipeline's image tables, written in row groups and atomically.

`data/raw/<split>.parquet` keeps each source image's original bytes (or why it could not be
read); `data/processed/<split>.parquet` keeps the resized, re-encoded images. Row groups let
readers stream a split instead of loading it whole.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from siamese_cv.core.atomic import atomic_path
from siamese_cv.core.errors import UserError

RAW_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("split", pa.string()),
        ("label", pa.int32()),
        ("label_name", pa.string()),
        ("source", pa.string()),
        ("image", pa.binary()),
        ("error", pa.string()),
    ]
)

PROCESSED_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("label", pa.int32()),
        ("label_name", pa.string()),
        ("image", pa.binary()),
        ("width", pa.int32()),
        ("height", pa.int32()),
    ]
)


def write_rows(path: Path, schema: pa.Schema, rows: Iterable[dict], row_group_size: int) -> int:
    """Stream dict rows into a parquet file, `row_group_size` rows per group; returns the count."""
    count = 0
    with atomic_path(path) as tmp, pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
        batch: list[dict] = []
        for row in rows:
            batch.append(row)
            if len(batch) >= row_group_size:
                writer.write_table(pa.Table.from_pylist(batch, schema=schema))
                count += len(batch)
                batch = []
        if batch or count == 0:
            writer.write_table(pa.Table.from_pylist(batch, schema=schema))
            count += len(batch)
    return count


def iter_batches(path: Path, columns: list[str], batch_size: int = 256) -> Iterator[pa.RecordBatch]:
    """Stream a parquet file in record batches (one row group in memory at a time)."""
    yield from _open(path).iter_batches(batch_size=batch_size, columns=columns)


def count_rows(path: Path) -> int:
    """Rows of a parquet file, from its footer."""
    return _open(path).metadata.num_rows


def iter_row_range(
    path: Path, columns: list[str], start: int, stop: int, batch_size: int = 256
) -> Iterator[pa.RecordBatch]:
    """Stream rows `[start, stop)` of a parquet file, reading only the row groups they span."""
    file = _open(path)
    groups, offset, first = [], 0, None
    for index in range(file.metadata.num_row_groups):
        rows = file.metadata.row_group(index).num_rows
        if offset < stop and offset + rows > start:
            groups.append(index)
            first = offset if first is None else first
        offset += rows
    if not groups or start >= stop:
        return
    position = first
    for batch in file.iter_batches(batch_size=batch_size, columns=columns, row_groups=groups):
        lo, hi = max(start - position, 0), min(stop - position, batch.num_rows)
        position += batch.num_rows
        if hi > lo:
            yield batch.slice(lo, hi - lo)
        if position >= stop:
            break


def _open(path: Path) -> pq.ParquetFile:
    if not path.is_file():
        raise UserError(f"{path}: missing; run the stage that writes it (`dvc repro`)")
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as error:
        raise UserError(
            f"{path}: not a readable parquet file ({error}); rerun `dvc repro -f` on its stage"
        ) from None


def read_table(path: Path, columns: list[str] | None = None) -> pa.Table:
    return _open(path).read(columns=columns)


def read_labels(path: Path) -> tuple[list[str], np.ndarray]:
    """The ids and integer labels of a processed split, without touching the image bytes."""
    table = read_table(path, ["id", "label"])
    return table.column("id").to_pylist(), table.column("label").to_numpy().astype(np.int64)


def write_splits(
    directory: Path,
    schema: pa.Schema,
    rows: Iterable[dict],
    row_group_size: int,
    splits: Iterable[str],
) -> dict[str, int]:
    """Stream rows of mixed splits into `<directory>/<split>.parquet`; returns rows per split.

    Every listed split gets a file, even if empty, so downstream stages can name it as a dep.
    """
    writers: dict[str, pq.ParquetWriter] = {}
    buffers: dict[str, list[dict]] = {}
    counts: dict[str, int] = {}
    for split in splits:
        writers[split] = pq.ParquetWriter(
            directory / f"{split}.parquet", schema, compression="zstd"
        )
        buffers[split], counts[split] = [], 0
    try:
        for row in rows:
            split = row["split"]
            if split not in writers:
                raise ValueError(f"row {row.get('id')!r} has unknown split {split!r}")
            buffers[split].append(row)
            counts[split] += 1
            if len(buffers[split]) >= row_group_size:
                writers[split].write_table(pa.Table.from_pylist(buffers[split], schema=schema))
                buffers[split] = []
        for split, buffer in buffers.items():
            if buffer or counts[split] == 0:
                writers[split].write_table(pa.Table.from_pylist(buffer, schema=schema))
    finally:
        for writer in writers.values():
            writer.close()
    return counts
