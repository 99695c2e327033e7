"""The export_gallery stage's work: embed `export.splits` with the trained model into data/gallery/.

One process embeds the splits in turn; with `export.shards` > 1 shard workers embed pieces that
`gallery_shards` merges. Both write the same card (meta.json), which search checks a query's model
against.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from siamese_cv.core import paths
from siamese_cv.core.shards import Nodes
from siamese_cv.data.parquet import read_table
from siamese_cv.data.preprocessing import available_cores
from siamese_cv.inference.embedder import Embedder, import_onnxruntime
from siamese_cv.inference.hardware import resolve_device, resolve_precision
from siamese_cv.inference.prefix_maps import ids_digest, tail_embedder
from siamese_cv.models.siamese import Preprocessing, load_checkpoint
from siamese_cv.retrieval.gallery import Gallery, gallery_table, write_gallery
from siamese_cv.retrieval.gallery_shards import export_worker, run_export_shards

log = logging.getLogger(__name__)

STAGE = "export_gallery"


def gallery_card(export: Any, config: dict[str, Any]) -> dict[str, Any]:
    """meta.json's fields that the run does not decide: the model, its preprocessing, the metric.

    The engine is named only when it is not torch, so torch galleries keep their bytes.
    """
    card = {
        "model_fingerprint": config["fingerprint"],
        "backbone": config["backbone"],
        "splits": list(export.splits),
        "metric": "cosine",
        "normalized": True,
        "preprocessing": Preprocessing.from_dict(config["preprocessing"]).to_dict(),
    }
    return card if export.engine == "torch" else {**card, "engine": export.engine}


def _embedder(
    export: Any, threads: int | None = None, checkpoint: tuple[Any, dict] | None = None
) -> tuple[Embedder, dict[str, Any]]:
    """The trained model's embedder under `export`'s settings, and the model's config.

    `checkpoint`: the (model, config) already loaded, else read from models/.
    """
    model, config = checkpoint or load_checkpoint(paths.MODEL)
    precision = resolve_precision(export.precision, resolve_device("auto"))
    if threads is not None and (precision.device.type == "cpu" or export.engine != "torch"):
        torch.set_num_threads(threads)  # the cores are shared by the running workers
    prep = Preprocessing.from_dict(config["preprocessing"])
    return Embedder(model, prep, precision, export.batch_size, engine=export.engine), config


def export_in_process(export: Any) -> tuple[int, int]:
    """Embed every split in this process and write the gallery; returns vector count and dim.

    Where data/prefix_maps holds the frozen prefix's maps of these photos, only the trained
    rest runs (`inference/prefix_maps.py`); else the images are embedded.
    """
    model, config = load_checkpoint(paths.MODEL)
    precision = resolve_precision(export.precision, resolve_device("auto"))
    tail = tail_embedder(
        paths.PREFIX_MAPS, model, config, precision, export.batch_size, export.engine, STAGE
    )
    rows = gallery_rows(export.splits)
    if tail is not None and tail.covers("gallery", {"ids": ids_digest(rows.ids)}, STAGE):
        matrix, precision_name = tail.embed("gallery", f"{STAGE}: gallery"), tail.precision_name
    else:
        embedder, config = _embedder(export, checkpoint=(model, config))
        rows, matrix = embed_splits_in_order(embedder, export.splits, STAGE)
        precision_name = embedder.precision.name
    count, dim = (int(n) for n in matrix.shape)
    meta = {
        **gallery_card(export, config),
        "count": count,
        "dim": dim,
        "precision": precision_name,
    }
    table = gallery_table(rows.ids, rows.splits, rows.labels, rows.label_names, matrix)
    write_gallery(paths.GALLERY, table, meta)
    return count, dim


def embed_splits_in_order(
    embedder: Embedder, splits: list[str], stage: str
) -> tuple[Gallery, np.ndarray]:
    """A gallery's rows (ids, splits, labels; no vectors) in its order, and `embedder`'s vectors.

    The order is the gallery's: the splits in turn, each in its parquet order.
    """
    vectors = [
        embedder.embed_parquet(paths.PROCESSED / f"{split}.parquet", progress=f"{stage}: {split}")
        for split in splits
    ]
    return gallery_rows(splits), np.concatenate(vectors)


def gallery_rows(splits: list[str]) -> Gallery:
    """A gallery's rows (ids, splits, labels; no vectors) in its order: the splits in turn."""
    ids, split_of, labels, names = [], [], [], []
    for split in splits:
        table = read_table(paths.PROCESSED / f"{split}.parquet", ["id", "label", "label_name"])
        ids += table.column("id").to_pylist()
        split_of += [split] * table.num_rows
        labels.append(table.column("label").to_numpy())
        names += table.column("label_name").to_pylist()
    return Gallery(ids, split_of, np.concatenate(labels), names, np.empty((0, 0)), {})


def export_as_worker(export: Any, key: str, threads: int) -> None:
    """Be one shard worker (`--shard-key`): embed the shards it takes, on `threads` threads."""
    embedder, _ = _embedder(export, threads)
    export_worker(embedder, export, key)


def export_sharded(
    export: Any, worker: Callable[[int], list[str]], nodes: Nodes
) -> tuple[int, int] | None:
    """Run the shard workers and merge their pieces; None on a node other than 0.

    What would fail in every worker (a bad precision, a missing package or model) fails here
    first, in one line.
    """
    device = resolve_device("auto")
    resolve_precision(export.precision, device)
    if export.engine == "onnxruntime":
        import_onnxruntime()
    _, config = load_checkpoint(paths.MODEL)
    # the onnxruntime engine runs on the CPU: its shards share the cores, not the GPUs
    gpus = torch.cuda.device_count() if device.type == "cuda" and export.engine == "torch" else 0
    card = gallery_card(export, config)
    return run_export_shards(export, card, worker, nodes, gpus, available_cores())
