"""Stage `train`: fine-tune backbone + head on the sampled triplets, keep the best validation epoch.

Writes models/model.safetensors and models/config.json (everything needed to rebuild the model
and its preprocessing), and per-epoch curves through DVCLive under metrics/train/.

With `train.devices` > 1 it relaunches itself as that many DistributedDataParallel processes;
started by torchrun (one per node when `train.nodes` > 1) it is one of them. docs/distributed.md.
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
from siamese_cv.training.launch import train

log = logging.getLogger(__name__)


def main(argv: Sequence[str] | None = None) -> int:
    params = stage_params(argv, __doc__)
    config = train(params)
    if config is None:  # a rank other than 0 under torchrun: rank 0 reports
        return 0
    best = config["best"]
    members = config.get("members", [config])
    kept = ", ".join(f"{m['best_epoch']}/{params.train.epochs}" for m in members)
    scores = (
        f"val triplet accuracy {best['val_triplet_accuracy']:.4f}, val MAP@R "
        f"{best['val_map_at_r']:.4f}"
        if "val_map_at_r" in best
        else "the last, no validation split"
    )
    log.info(
        f"train: best epoch {kept}: {scores} "
        f"({config['train_seconds']:.0f} s, {config['precision']}, cached features: "
        f"{config['cached_features']}) -> {paths.MODEL}/model.safetensors"
    )
    return 0


if __name__ == "__main__":
    run_stage(main)
