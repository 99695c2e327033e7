"""Stage `export_gallery`: embed `export.splits` with the trained model into data/gallery/.

embeddings.parquet holds id, split, label, label_name and the L2-normalised float32 vector;
meta.json holds the model fingerprint, dimension and preprocessing that search checks against.
With `export.shards` > 1 torch's elastic launcher runs this script as shard workers
(`--shard-key`), one per GPU or sharing the cores, here or on `--nnodes` machines.
"""

from __future__ import annotations

try:  # `dvc repro` runs the `python` on PATH: without the venv, say what to do in one line
    import siamese_cv  # noqa: F401
except ModuleNotFoundError as missing:
    raise SystemExit(f"{missing}: run `source .venv/bin/activate` or `make repro`") from None

import logging
import os
from collections.abc import Sequence

import numpy as np
import torch

from siamese_cv.config.params import Params
from siamese_cv.config.stage import run_stage, stage_args
from siamese_cv.core import paths
from siamese_cv.core.shards import Nodes, nodes_from_args
from siamese_cv.data.parquet import read_table
from siamese_cv.data.preprocessing import available_cores
from siamese_cv.inference.embedder import Embedder, import_onnxruntime
from siamese_cv.inference.hardware import resolve_device, resolve_precision
from siamese_cv.models.siamese import Preprocessing, load_checkpoint
from siamese_cv.retrieval.gallery import gallery_table, write_gallery
from siamese_cv.retrieval.gallery_shards import export_worker, run_export_shards

log = logging.getLogger(__name__)


def main(argv: Sequence[str] | None = None) -> int:
    params, args = stage_args(argv, __doc__, sharded=True)
    export = params.export
    nodes = nodes_from_args(args)
    nodes.require_shards("export", export.shards)
    if export.shards > 1 and args.shard_key is None:
        return _sharded(params, args.params, nodes)
    model, config = load_checkpoint(paths.MODEL)
    prep = Preprocessing.from_dict(config["preprocessing"])
    precision = resolve_precision(params.export.precision, resolve_device("auto"))
    if args.shard_key is not None:
        if precision.device.type == "cpu" or export.engine != "torch":
            torch.set_num_threads(args.workers)  # the cores are shared by the running workers
        embedder = Embedder(model, prep, precision, export.batch_size, engine=export.engine)
        export_worker(embedder, export, args.shard_key)
        return 0
    embedder = Embedder(model, prep, precision, export.batch_size, engine=export.engine)
    ids, splits, labels, names, vectors = [], [], [], [], []
    for split in params.export.splits:
        path = paths.PROCESSED / f"{split}.parquet"
        table = read_table(path, ["id", "label", "label_name"])
        vectors.append(embedder.embed_parquet(path, progress=f"export_gallery: {split}"))
        ids += table.column("id").to_pylist()
        splits += [split] * table.num_rows
        labels.append(table.column("label").to_numpy())
        names += table.column("label_name").to_pylist()
    matrix = np.concatenate(vectors)
    meta = {
        "model_fingerprint": config["fingerprint"],
        "backbone": config["backbone"],
        "dim": int(matrix.shape[1]),
        "count": int(matrix.shape[0]),
        "splits": list(params.export.splits),
        "metric": "cosine",
        "normalized": True,
        "preprocessing": prep.to_dict(),
        "precision": embedder.precision.name,
        **_engine_meta(export.engine),
    }
    write_gallery(
        paths.GALLERY, gallery_table(ids, splits, np.concatenate(labels), names, matrix), meta
    )
    log.info(
        f"export_gallery: {matrix.shape[0]} vectors of dimension {matrix.shape[1]} "
        f"({', '.join(params.export.splits)}) -> {paths.GALLERY}"
    )
    return 0


def _sharded(params: Params, params_file: str, nodes: Nodes) -> int:
    export = params.export
    device = resolve_device("auto")
    resolve_precision(export.precision, device)  # a bad choice is one line here, not N shards'
    if export.engine == "onnxruntime":
        import_onnxruntime()  # a missing package too
    _, config = load_checkpoint(paths.MODEL)  # a missing model too

    def worker(threads: int) -> list[str]:
        return [os.path.relpath(__file__), "--params", params_file, "--workers", str(threads)]

    meta = {
        "model_fingerprint": config["fingerprint"],
        "backbone": config["backbone"],
        "splits": list(export.splits),
        "metric": "cosine",
        "normalized": True,
        "preprocessing": Preprocessing.from_dict(config["preprocessing"]).to_dict(),
        **_engine_meta(export.engine),
    }
    # the onnxruntime engine runs on the CPU: its shards share the cores, not the GPUs
    gpus = torch.cuda.device_count() if device.type == "cuda" and export.engine == "torch" else 0
    merged = run_export_shards(export, meta, worker, nodes, gpus, available_cores())
    if merged is None:
        return 0  # node 0 merges and writes the gallery
    count, dim = merged
    log.info(
        f"export_gallery: {count} vectors of dimension {dim} "
        f"({', '.join(export.splits)}) -> {paths.GALLERY}"
    )
    return 0


def _engine_meta(engine: str) -> dict[str, str]:
    """meta.json names the engine only when it is not torch, so torch galleries keep their bytes."""
    return {} if engine == "torch" else {"engine": engine}


if __name__ == "__main__":
    run_stage(main)
