"""Stage `preprocess`: decode every image safely, resize it, and cache each split as parquet.

Unreadable images are skipped, never fatal, and listed with their reasons in
metrics/data_report.json. A class left with one image in a split is a warning (it is no anchor
or query there); a train or test split left empty, or with no class of two images, stops the
pipeline, because no triplet could be drawn from it. With `preprocess.shards` > 1 torch's elastic launcher
runs this script as shard workers (`--shard-key`), here or on `--nnodes` machines, and the stage
merges their pieces into the same files.
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
from siamese_cv.core.atomic import write_json
from siamese_cv.core.errors import UserError
from siamese_cv.core.shards import nodes_from_args
from siamese_cv.data.preprocessing import preprocess_splits, preprocess_worker

log = logging.getLogger(__name__)


def main(argv: Sequence[str] | None = None) -> int:
    params, args = stage_args(argv, __doc__, sharded=True)
    if args.shard_key:
        preprocess_worker(paths.RAW, params.preprocess, args.shard_key, args.workers)
        return 0

    def worker(workers: int) -> list[str]:
        return [os.path.relpath(__file__), "--params", args.params, "--workers", str(workers)]

    nodes = nodes_from_args(args)
    report = preprocess_splits(paths.RAW, paths.PROCESSED, params.preprocess, worker, nodes)
    if report is None:
        return 0  # node 0 merges and writes the report
    write_json(paths.DATA_REPORT, report)
    if report["problems"]:
        more = len(report["problems"]) - 1
        raise UserError(
            report["problems"][0] + (f" ({more} more in {paths.DATA_REPORT})" if more else "")
        )
    kept, skipped = report["kept"]["total"], report["skipped"]["total"]
    warnings, validation = report["warnings"], report["validation"]
    log.info(
        f"preprocess: kept {kept} images, skipped {skipped}"
        + (f" (reasons in {paths.DATA_REPORT})" if skipped else "")
        + f"; validation {report['kept']['validation']} images"
        + (
            f", none from {len(validation['classes_without'])} classes"
            if validation["classes_without"]
            else ""
        )
        + (f"; {len(warnings)} warnings, first: {warnings[0]}" if warnings else "")
    )
    return 0


if __name__ == "__main__":
    run_stage(main)
