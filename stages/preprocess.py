"""Stage `preprocess`: decode every image safely, resize it, and cache each split as parquet.

Unreadable images are skipped, never fatal, and listed with their reasons in
metrics/data_report.json; a class left with one image or a split left empty stops the pipeline,
because no triplet could be drawn from it. With `preprocess.shards` > 1 the stage runs itself
once per shard (`--shard I`) and merges the pieces into the same files.
"""

from __future__ import annotations

try:  # `dvc repro` runs the `python` on PATH: without the venv, say what to do in one line
    import siamese_cv  # noqa: F401
except ModuleNotFoundError as missing:
    raise SystemExit(f"{missing}: run `source .venv/bin/activate` or `make repro`") from None

import logging
import os
import sys
from collections.abc import Sequence

from siamese_cv.config.stage import run_stage, stage_args
from siamese_cv.core import paths
from siamese_cv.core.atomic import write_json
from siamese_cv.core.errors import UserError
from siamese_cv.data.preprocessing import preprocess_shard, preprocess_splits

log = logging.getLogger(__name__)


def main(argv: Sequence[str] | None = None) -> int:
    params, args = stage_args(argv, __doc__, sharded=True)
    count = params.preprocess.shards
    if args.shard is not None:
        manifest = preprocess_shard(
            paths.RAW, params.preprocess, args.shard, args.key, args.workers
        )
        kept = sum(sum(c.values()) for c in manifest["kept"].values())
        skipped = sum(map(len, manifest["skipped"].values()))
        log.info(f"preprocess: shard {args.shard} of {count}: kept {kept}, skipped {skipped}")
        return 0

    def shard_command(index: int, key: str, workers: int) -> list[str]:
        return [
            sys.executable, os.path.relpath(__file__), "--params", args.params,
            "--shard", str(index), "--key", key, "--workers", str(workers),
        ]  # fmt: skip

    report = preprocess_splits(paths.RAW, paths.PROCESSED, params.preprocess, shard_command)
    write_json(paths.DATA_REPORT, report)
    if report["problems"]:
        more = len(report["problems"]) - 1
        raise UserError(
            report["problems"][0] + (f" ({more} more in {paths.DATA_REPORT})" if more else "")
        )
    kept, skipped = report["kept"]["total"], report["skipped"]["total"]
    log.info(
        f"preprocess: kept {kept} images, skipped {skipped}"
        + (f" (reasons in {paths.DATA_REPORT})" if skipped else "")
    )
    return 0


if __name__ == "__main__":
    run_stage(main)
