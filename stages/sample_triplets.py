"""Stage `sample_triplets`: seeded training steps for every epoch, fixed validation and test triplets.

Each of the `train.members` networks of an ensemble gets its own `train.epochs` epochs of steps.

Because the test triplets are drawn here once, from `triplets.seed` alone, every run and every
experiment is scored on the same triplets.
"""

from __future__ import annotations

try:  # `dvc repro` runs the `python` on PATH: without the venv, say what to do in one line
    import siamese_cv  # noqa: F401
except ModuleNotFoundError as missing:
    raise SystemExit(f"{missing}: run `source .venv/bin/activate` or `make repro`") from None

import logging
from collections.abc import Sequence

from siamese_cv.config.stage import run_stage, stage_params
from siamese_cv.core import paths
from siamese_cv.data.triplet_tables import write_triplet_tables

log = logging.getLogger(__name__)


def main(argv: Sequence[str] | None = None) -> int:
    params = stage_params(argv, __doc__)
    summary = write_triplet_tables(
        paths.PROCESSED, paths.TRIPLETS, params.triplets, params.train.sampled_epochs
    )
    log.info("sample_triplets: " + ", ".join(f"{k} {v}" for k, v in summary.items()))
    return 0


if __name__ == "__main__":
    run_stage(main)
