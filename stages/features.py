"""Stage `features`: the frozen backbone stages' outputs, computed once for every training run.

With `train.freeze` set, the first stages of the pretrained backbone never change, so their
outputs for the training photos (`train.augment_views` seeded augmented views of each) and for
the validation photos (at every inference size) are computed here and stored in data/features/;
`train` memory-maps them and runs only the trainable rest. An edit of what only changes training
(learning rate, loss, epochs, members, optimiser) then reruns train and skips this stage.

Nothing frozen, or no views to cache: it writes only data/features/card.json saying so.
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
from siamese_cv.training.feature_store import compute_features, write_features

log = logging.getLogger(__name__)


def main(argv: Sequence[str] | None = None) -> int:
    params = stage_params(argv, __doc__)
    cache, card = compute_features(params)
    written = write_features(paths.FEATURES, cache, card)
    if cache is None:
        log.info(f"features: nothing to cache ({card['why']}) -> {paths.FEATURES}/card.json")
        return 0
    log.info(
        f"features: {card['train_images']} training images x {card['views'] or 1} views, "
        f"{card['validation_images']} validation images at "
        f"{', '.join(map(str, card['validation_sizes'])) or 'no'} px: {written / 2**20:.0f} MiB "
        f"on disk, filled in {card['fill_seconds']:.1f} s ({card['precision']}) -> {paths.FEATURES}"
    )
    return 0


if __name__ == "__main__":
    run_stage(main)
