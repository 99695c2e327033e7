"""The frozen prefix's outputs as a stage's output: computed once by `features`, read by `train`.

They depend on the pretrained weights, the frozen stages, the augmented views and their seed,
the sizes and the inference engine, but not on anything that only changes training (learning
rate, loss, epochs, members), so an edit of those reruns train alone and reads them back.

On disk: one `.npy` per tensor (`data/arrays.py`), memory-mapped when read, and `card.json`,
which says what made them, so train can refuse features made for other settings.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from siamese_cv.config.params import Params, every_inference_size, parse_freeze
from siamese_cv.core import paths
from siamese_cv.core.atomic import atomic_path, read_json, write_json
from siamese_cv.core.errors import UserError
from siamese_cv.data.arrays import load_tensor, save_tensor
from siamese_cv.inference.hardware import resolve_device, resolve_precision, seed_everything
from siamese_cv.models.pretrained import load_pretrained, preprocessing_of
from siamese_cv.models.siamese import EmbeddingNet
from siamese_cv.training.feature_cache import PrefixCache, cache_frozen_prefix
from siamese_cv.training.settings import SplitImages

log = logging.getLogger(__name__)

CARD = "card.json"
TRAIN_FILE = "train.npy"


def compute_features(params: Params) -> tuple[PrefixCache | None, dict[str, Any]]:
    """The frozen prefix's outputs exactly as the train stage would compute them in memory.

    The first member's seed draws the augmented views; validation is cached at every member's
    inference sizes. Returns (None, card saying why) when nothing is frozen, the prefix cannot
    be cut, augmentation has no views to cache, or not one view fits the budget.
    """
    tp = params.train
    n_frozen = parse_freeze(tp.freeze)
    views = tp.augment_views if tp.augment else 0
    if not n_frozen:
        return None, {"cached": False, "why": f"train.freeze: {tp.freeze}: nothing is frozen"}
    if tp.augment and not views:
        return None, {"cached": False, "why": "train.augment_views: 0: augmented every step"}
    seed_everything(tp.seed)
    backbone, card = load_pretrained(paths.PRETRAINED)
    backbone.set_pooling(params.model.pooling)  # part of the prefix when everything is frozen
    model = EmbeddingNet(backbone, "identity", 1)
    model.freeze(n_frozen)
    parts = model.split_frozen()
    if parts is None:
        why = f"{card['backbone']} cannot be cut after its frozen stages"
        return None, {"cached": False, "why": why}
    device = resolve_device(tp.device)
    precision = resolve_precision(params.evaluate.precision, device)
    model.to(device, memory_format=torch.channels_last)
    train, val = SplitImages.training_splits(paths.PROCESSED)
    prep = replace(preprocessing_of(params.preprocess, card), input_sizes=())
    sizes = every_inference_size(params) if len(val.labels) else []
    started = time.perf_counter()
    cache = cache_frozen_prefix(
        parts[0],
        prep,
        sizes,
        precision,
        train,
        val,
        params.evaluate.batch_size,
        views,
        tp.seed,
        params.evaluate.engine if device.type == "cpu" else "torch",
        "features",
    )
    about = {
        "frozen_stages": model.frozen_stages,
        "pretrained_fingerprint": card["fingerprint"],
        "seed": tp.seed,
        "train_images": len(train.labels),
        "validation_images": len(val.labels),
    }
    if cache is None:
        return None, {"cached": False, "why": "over the feature cache's budget", **about}
    return cache, {
        "cached": True,
        "views": cache.views,
        "asked_views": views,
        "validation_sizes": list(cache.validation),
        "dtype": str(cache.train.dtype).removeprefix("torch."),
        "precision": precision.name,
        "fill_seconds": round(time.perf_counter() - started, 1),
        **about,
    }


def write_features(folder: Path, cache: PrefixCache | None, card: dict[str, Any]) -> int:
    """Write `cache` and its card into `folder` atomically; returns the bytes written."""
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        if cache is not None:
            save_tensor(tmp / TRAIN_FILE, cache.train)
            for size, tensor in cache.validation.items():
                save_tensor(tmp / f"validation_{size}.npy", tensor)
        written = sum(f.stat().st_size for f in tmp.iterdir())
        write_json(tmp / CARD, {**card, "bytes": written})
    return written


def read_features(
    folder: Path,
    frozen_stages: int,
    views: int,
    seed: int,
    train: SplitImages,
    val: SplitImages,
    sizes: list[int],
    device: torch.device,
) -> PrefixCache | None:
    """The stored features, memory-mapped, checked against what this training run needs.

    Returns None when the features stage cached nothing (train then runs the whole network).

    Raises:
        UserError: no features, or features made for other settings (one line: rerun the stage).
    """
    if not (folder / CARD).is_file():
        raise UserError(f"{folder}: no stored features; run `dvc repro features`")
    card = read_json(folder / CARD)
    if not card["cached"]:
        log.info("train: no frozen-prefix features (%s): training on the images", card["why"])
        return None
    wanted = {
        "frozen_stages": frozen_stages,
        "asked_views": views,
        "seed": seed,
        "train_images": len(train.labels),
        "validation_images": len(val.labels),
    }
    stale = [f"{k} {card.get(k)} (needed {v})" for k, v in wanted.items() if card.get(k) != v]
    stale += [f"no validation at {s} px" for s in sizes if s not in card["validation_sizes"]]
    if stale:
        raise UserError(
            f"{folder}: made for other settings: {', '.join(stale)}; run `dvc repro features`"
        )
    dtype = getattr(torch, card["dtype"])
    train_views = load_tensor(folder / TRAIN_FILE, dtype, device)
    validation = {s: load_tensor(folder / f"validation_{s}.npy", dtype, device) for s in sizes}
    log.info(
        "train: read the frozen prefix's outputs from %s: %d training images x %d views "
        "(%.0f MiB, memory-mapped)",
        folder,
        train_views.shape[1],
        card["views"] or 1,
        card["bytes"] / 2**20,
    )
    return PrefixCache(train_views, validation, card["views"])
