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

from siamese_cv.config.stage import run_stage, stage_args
from siamese_cv.core import paths
from siamese_cv.core.shards import nodes_from_args
from siamese_cv.retrieval.gallery_export import export_as_worker, export_in_process, export_sharded

log = logging.getLogger(__name__)


def main(argv: Sequence[str] | None = None) -> int:
    params, args = stage_args(argv, __doc__, sharded=True)
    export = params.export
    nodes = nodes_from_args(args)
    nodes.require_shards("export", export.shards)
    if args.shard_key is not None:
        export_as_worker(export, args.shard_key, args.workers)
        return 0
    if export.shards == 1:
        written = export_in_process(export)
    else:

        def worker(threads: int) -> list[str]:
            return [os.path.relpath(__file__), "--params", args.params, "--workers", str(threads)]

        written = export_sharded(export, worker, nodes)
    if written is None:
        return 0  # node 0 merges and writes the gallery
    count, dim = written
    log.info(
        f"export_gallery: {count} vectors of dimension {dim} "
        f"({', '.join(export.splits)}) -> {paths.GALLERY}"
    )
    return 0


if __name__ == "__main__":
    run_stage(main)
