"""Stage `preprocess`: decode every image safely, resize it, and cache each split as parquet.

Unreadable images are skipped, never fatal, and listed with their reasons in
metrics/data_report.json; a class left with one image or a split left empty stops the pipeline,
because no triplet could be drawn from it.
"""

from __future__ import annotations

from collections.abc import Sequence

from siamese_cv import paths
from siamese_cv.data.preprocessing import preprocess_splits
from siamese_cv.errors import UserError
from siamese_cv.io import write_json
from siamese_cv.stage import run_stage, stage_params


def main(argv: Sequence[str] | None = None) -> int:
    params = stage_params(argv, __doc__)
    report = preprocess_splits(paths.RAW, paths.PROCESSED, params.preprocess)
    write_json(paths.DATA_REPORT, report)
    if report["problems"]:
        more = len(report["problems"]) - 1
        raise UserError(
            report["problems"][0] + (f" ({more} more in {paths.DATA_REPORT})" if more else "")
        )
    kept, skipped = report["kept"]["total"], report["skipped"]["total"]
    print(
        f"preprocess: kept {kept} images, skipped {skipped}"
        + (f" (reasons in {paths.DATA_REPORT})" if skipped else "")
    )
    return 0


if __name__ == "__main__":
    run_stage(main)
