"""`export.shards` > 1: the gallery embedded by shard workers, piece by piece, then merged.

Shard i embeds rows `shard_range(n, i, N, align=export.batch_size)` of each split in
`export.splits`: its boundaries fall on batch boundaries, so every forward pass holds the same
images as in a single-shard run, and the merged gallery's vectors are those of a single run.
The workers are launched, and their pieces kept resumable, by `siamese_cv.core.shards`: on a
machine with GPUs one worker per GPU, each seeing only its own; on a CPU the workers share the
cores, each with its share of threads.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from siamese_cv.core import paths
from siamese_cv.core.atomic import read_json
from siamese_cv.core.shards import (
    SHARDS_ROOT,
    Nodes,
    ShardStore,
    code_digest,
    fingerprint_files,
    make_key,
    run_shards,
    shard_range,
    work_shards,
)
from siamese_cv.data.parquet import count_rows, iter_row_range
from siamese_cv.retrieval.gallery import (
    EMBEDDINGS,
    GALLERY_ROW_GROUP,
    gallery_table,
    write_gallery_rows,
)

log = logging.getLogger(__name__)

STORE = SHARDS_ROOT / "export_gallery"


def export_key(export: Any, processed: Path = paths.PROCESSED, model: Path = paths.MODEL) -> str:
    """The pieces' key: model fingerprint, processed images, parameters, code, torch version."""
    import torch

    from siamese_cv.inference import embedder as embedding
    from siamese_cv.retrieval import gallery

    config = read_json(model / "config.json")
    return make_key(
        {
            "stage": "export_gallery",
            "model": config.get("fingerprint"),
            "processed": fingerprint_files([processed / f"{s}.parquet" for s in export.splits]),
            "params": dict(export.__dict__),
            "code": code_digest(sys.modules[__name__], embedding, gallery),
            "torch": torch.__version__,
        }
    )


def export_worker(embedder: Any, export: Any, key: str) -> list[int]:
    """Be one shard worker (`stages/export_gallery.py --shard-key`): embed the shards it takes
    into pieces under `key`; returns those shards."""
    store = ShardStore(STORE, export.shards)
    return work_shards(
        "export_gallery",
        store,
        key,
        lambda i: f"{embed_shard(embedder, export, store, i, key)} vectors",
    )


def embed_shard(embedder: Any, export: Any, store: ShardStore, index: int, key: str) -> int:
    """Embed shard `index`'s rows of every split into its piece; returns its rows."""
    manifest: dict[str, Any] = {"precision": embedder.precision.name}
    with store.write(index, key, manifest) as tmp:
        tables = []
        for split in export.splits:
            path = paths.PROCESSED / f"{split}.parquet"
            start, stop = shard_range(count_rows(path), index, export.shards, export.batch_size)
            if start == stop:
                continue
            meta = pa.Table.from_batches(
                list(iter_row_range(path, ["id", "label", "label_name"], start, stop))
            )
            images = (
                image
                for batch in iter_row_range(path, ["image"], start, stop, export.batch_size)
                for image in batch.column(0).to_pylist()
            )
            vectors = embedder.embed_encoded(images)
            tables.append(
                gallery_table(
                    meta.column("id").to_pylist(),
                    [split] * meta.num_rows,
                    meta.column("label").to_numpy(),
                    meta.column("label_name").to_pylist(),
                    vectors,
                )
            )
        rows = sum(t.num_rows for t in tables)
        manifest["rows"] = rows
        if tables:
            pq.write_table(pa.concat_tables(tables), tmp / EMBEDDINGS, compression="zstd")
    return rows


def run_export_shards(
    export: Any,
    meta: dict[str, Any],
    worker: Callable[[int], list[str]],
    nodes: Nodes,
    gpus: int,
    cores: int,
) -> tuple[int, int] | None:
    """Embed the missing pieces, merge them into data/gallery; returns vector count and dim.

    Args:
        worker: the argv after `python` of a shard worker with n threads (see `run_shards`).
        nodes: the machines that share the shards; only node 0 merges them.

    Returns:
        The gallery's vector count and dimension; None on a node other than 0.

    Raises:
        UserError: a shard worker failed; the finished pieces are kept for the next run.
    """
    count = export.shards
    store = ShardStore(STORE, count)
    key = export_key(export)
    if not run_shards("export_gallery", store, key, worker, nodes, cores, gpus):
        return None  # another machine merges
    precisions = {store.manifest(i)["precision"] for i in range(count)}
    meta = {**meta, "precision": "/".join(sorted(precisions))}
    pieces = [store.piece(i) / EMBEDDINGS for i in range(count)]
    count, dim = write_gallery_rows(paths.GALLERY, _merged(pieces, export.splits), meta)
    store.remove()
    return count, dim


def _merged(pieces: list[Path], splits: list[str]) -> Iterator[pa.Table]:
    """The pieces' rows in single-run order: split by split, each in shard order."""
    for split in splits:
        for piece in pieces:
            if not piece.is_file():
                continue  # a shard with no rows
            for batch in pq.ParquetFile(piece).iter_batches(GALLERY_ROW_GROUP):
                table = pa.Table.from_batches([batch])
                mask = pc.equal(table.column("split"), split)
                if np.asarray(mask).any():
                    yield table.filter(mask)
