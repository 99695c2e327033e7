"""`export.shards` > 1: the gallery embedded by several processes, piece by piece, then merged.

Shard i embeds rows `shard_range(n, i, N, align=export.batch_size)` of each split in
`export.splits`: its boundaries fall on batch boundaries, so every forward pass holds the same
images as in a single-shard run, and the merged gallery's vectors are those of a single run.
Pieces are resumable as in `siamese_cv.core.shards`: a killed shard is the only one run again.
On a machine with several GPUs each running shard gets its own (`CUDA_VISIBLE_DEVICES`); on a
CPU the shards share the cores, one thread each per running shard's share.
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
from siamese_cv.core.errors import UserError
from siamese_cv.core.shards import (
    SHARDS_ROOT,
    ShardStore,
    code_digest,
    describe_exit,
    fingerprint_files,
    make_key,
    run_shards,
    shard_range,
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


def embed_shard(embedder: Any, export: Any, index: int, key: str) -> int:
    """Shard `index`'s process: embed its rows of every split into a piece; returns its rows."""
    store = ShardStore(STORE, export.shards)
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
    shard_command: Callable[[int, str, int], list[str]],
    gpus: int,
    cores: int,
) -> tuple[int, int]:
    """Embed the missing pieces, merge them into data/gallery; returns vector count and dim.

    Raises:
        UserError: a shard's process failed; the finished pieces are kept for the next run.
    """
    count = export.shards
    store = ShardStore(STORE, count)
    key = export_key(export)
    store.prune(key)
    todo = [i for i in range(count) if not store.done(i, key)]
    kept = [i for i in range(count) if i not in todo]
    parallel = max(1, min(len(todo), gpus or cores))
    threads = 1 if gpus else max(1, cores // parallel)
    log.info(
        f"export_gallery: {count} shards"
        + (f"; {_names(kept)} already done, kept" if kept else "")
        + (f"; running {_names(todo)} ({parallel} at a time)" if todo else "")
    )
    env = (lambda i, slot: {"CUDA_VISIBLE_DEVICES": str(slot)}) if gpus else None
    failed = run_shards(lambda i: shard_command(i, key, threads), todo, parallel, env)
    if failed:
        why = ", ".join(f"{i} ({describe_exit(code)})" for i, code in sorted(failed.items()))
        raise UserError(
            f"export_gallery: shard {why} of {count} failed; the other shards are kept, and "
            "`dvc repro` redoes only the failed ones"
        )
    precisions = {store.manifest(i)["precision"] for i in range(count)}
    meta = {**meta, "precision": "/".join(sorted(precisions))}
    pieces = [store.piece(i) / EMBEDDINGS for i in range(count)]
    count, dim = write_gallery_rows(paths.GALLERY, _merged(pieces, export.splits), meta)
    store.remove()
    return count, dim


def _names(shards: list[int]) -> str:
    return ("shard " if len(shards) == 1 else "shards ") + ", ".join(map(str, shards))


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
