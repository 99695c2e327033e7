"""The exported gallery: L2-normalised vectors in parquet plus a card that ties them to one model.

Search refuses a gallery whose model fingerprint differs from the model embedding the query, so a
retrained model can never be searched against stale vectors.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from siamese_cv.core.atomic import atomic_path
from siamese_cv.core.errors import UserError

EMBEDDINGS = "embeddings.parquet"
META = "meta.json"
GALLERY_ROW_GROUP = 65536


@dataclass
class Gallery:
    ids: list[str]
    splits: list[str]
    labels: np.ndarray
    label_names: list[str]
    vectors: np.ndarray  # float32 [n, dim], rows L2-normalised
    meta: dict[str, Any]


def gallery_table(ids, splits, labels, label_names, vectors: np.ndarray) -> pa.Table:
    dim = vectors.shape[1]
    flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).ravel())
    return pa.table(
        {
            "id": pa.array(ids, pa.string()),
            "split": pa.array(splits, pa.string()),
            "label": pa.array(np.asarray(labels, dtype=np.int32)),
            "label_name": pa.array(label_names, pa.string()),
            "vector": pa.FixedSizeListArray.from_arrays(flat, dim),
        }
    )


def write_gallery(
    directory: Path,
    table: pa.Table,
    meta: dict[str, Any],
    arrays: dict[str, np.ndarray] | None = None,
) -> None:
    """Write embeddings.parquet and meta.json (and `arrays`, as .npy files by name) into
    `directory`, replacing it atomically."""
    with atomic_path(directory) as tmp:
        tmp.mkdir()
        for name, array in (arrays or {}).items():
            np.save(tmp / name, np.ascontiguousarray(array, dtype=np.float32), allow_pickle=False)
        pq.write_table(
            table, tmp / EMBEDDINGS, compression="zstd", row_group_size=GALLERY_ROW_GROUP
        )
        (tmp / META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def write_gallery_rows(
    directory: Path, tables: Iterable[pa.Table], meta: dict[str, Any]
) -> tuple[int, int]:
    """`write_gallery` from a stream of `gallery_table` pieces, one row group in memory at a time.

    The row groups are those `write_gallery` makes of the concatenated table, so the file's
    bytes are the same. `meta` gets `count` and `dim` filled in; returns them.
    """
    count, buffer, writer = 0, [], None
    with atomic_path(directory) as tmp:
        tmp.mkdir()
        try:
            for table in tables:
                if writer is None:
                    dim = table.schema.field("vector").type.list_size
                    empty = np.zeros((0, dim), np.float32)
                    schema = gallery_table([], [], [], [], empty).schema  # names as written
                    writer = pq.ParquetWriter(tmp / EMBEDDINGS, schema, compression="zstd")
                buffer.append(table.cast(schema))
                while sum(t.num_rows for t in buffer) >= GALLERY_ROW_GROUP:
                    whole = pa.concat_tables(buffer).combine_chunks()
                    writer.write_table(whole.slice(0, GALLERY_ROW_GROUP))
                    count += GALLERY_ROW_GROUP
                    buffer = [whole.slice(GALLERY_ROW_GROUP)]
            if writer is None:
                raise UserError("export.splits: no images to embed; check data/processed")
            rest = pa.concat_tables(buffer).combine_chunks()
            if rest.num_rows:
                writer.write_table(rest)
                count += rest.num_rows
        finally:
            if writer is not None:
                writer.close()
        meta = {**meta, "count": count, "dim": schema.field("vector").type.list_size}
        (tmp / META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return meta["count"], meta["dim"]


def load_gallery(directory: str | Path) -> Gallery:
    """Read a gallery written by the export_gallery stage.

    Raises:
        UserError: the gallery is missing or unreadable, naming the fix.
    """
    directory = Path(directory)
    path, meta_path = directory / EMBEDDINGS, directory / META
    if not path.is_file() or not meta_path.is_file():
        raise UserError(
            f"{directory}: no gallery there; run `dvc repro export_gallery` (or `dvc pull`)"
        )
    table = pq.read_table(path)
    vectors = table.column("vector").combine_chunks()
    dim = vectors.type.list_size
    matrix = np.array(vectors.flatten().to_numpy(zero_copy_only=False), dtype=np.float32).reshape(
        -1, dim
    )
    return Gallery(
        ids=table.column("id").to_pylist(),
        splits=table.column("split").to_pylist(),
        labels=table.column("label").to_numpy().astype(np.int64),
        label_names=table.column("label_name").to_pylist(),
        vectors=matrix,
        meta=json.loads(meta_path.read_text(encoding="utf-8")),
    )
