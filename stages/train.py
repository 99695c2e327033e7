"""Stage `train`: fine-tune backbone + head on the sampled triplets, keep the best validation epoch.

Writes models/model.safetensors and models/config.json (everything needed to rebuild the model
and its preprocessing), and per-epoch curves through DVCLive under metrics/train/.
"""

from __future__ import annotations

from collections.abc import Sequence

from siamese_cv import paths
from siamese_cv.training.run import train_and_save
from siamese_cv.stage import run_stage, stage_params


def main(argv: Sequence[str] | None = None) -> int:
    params = stage_params(argv, __doc__)
    config = train_and_save(params)
    best = config["best"]
    print(f"train: best epoch {config['best_epoch']}/{params.train.epochs}: val triplet accuracy "
          f"{best['val_triplet_accuracy']:.4f}, val MAP@R {best['val_map_at_r']:.4f} "
          f"({config['train_seconds']:.0f} s, {config['precision']}, cached features: "
          f"{config['cached_features']}) -> {paths.MODEL}/model.safetensors")
    return 0


if __name__ == "__main__":
    run_stage(main)
