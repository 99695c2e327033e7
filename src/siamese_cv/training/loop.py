"""The training loop: fixed triplets or P x K batches, images or cached features, best epoch kept.

`fit` puts the parts together, each in its own module: the frozen-prefix cache
(feature_cache.py: when the first stages of the backbone are frozen, their outputs are computed
once and only the rest trains on them; with the whole backbone frozen that is the pooled
features, and training the head takes seconds on a CPU), the optimiser, its schedule and the
moving average (optimisation.py), one epoch's steps (epochs.py) and validation (validation.py).

With several processes (`settings.world`), each trains its share of every step through a
DDP-wrapped copy of the trainable part; every rank computes the same frozen-prefix cache and
validates identically, and only rank 0 calls `log`.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from siamese_cv.models.siamese import EmbeddingNet, Preprocessing
from siamese_cv.training import distributed
from siamese_cv.training.epochs import Trainer
from siamese_cv.training.feature_cache import PrefixCache, cache_frozen_prefix
from siamese_cv.training.losses import build_loss, build_miner
from siamese_cv.training.optimisation import build_optimizer, lr_schedule, moving_average
from siamese_cv.training.settings import FitData, FitSettings
from siamese_cv.training.validation import MONITOR, Validator

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    best: dict = field(default_factory=dict)
    seconds: float = 0.0
    cache: PrefixCache | None = None
    best_outputs: list[torch.Tensor] = field(default_factory=list)  # validation, per size
    ema_decay: float = 0.0  # the moving average's decay per step (`train.ema`, capped)

    @property
    def cached_features(self) -> bool:
        return self.cache is not None

    @property
    def cached_views(self) -> int:
        """Augmented views per training image in the cache (0: un-augmented, or no cache)."""
        return self.cache.views if self.cache is not None else 0


def fit(
    model: EmbeddingNet,
    prep: Preprocessing,
    data: FitData,
    settings: FitSettings,
    log_row: Callable[[dict], None] = lambda row: None,
    cache: PrefixCache | None = None,
) -> TrainResult:
    """Train `model` in place and leave it holding the best epoch's weights (by validation MAP@R).

    Without a validation split (`data.val_fraction: 0`, or no class large enough to lend two
    photos) there is nothing to choose by: the last epoch is kept.

    Args:
        model: backbone + head, already frozen as `train.freeze` asks.
        prep: preprocessing of the processed images; training runs at `image_size`,
            validation embeds at its `sizes` (the mean of the L2-normalised embeddings when
            there are several), as the exported model will.
        data: the splits, the sampled steps and the validation triplets.
        settings: how to train, validate and cache (`FitSettings`).
        log_row: called with each epoch's metrics (the stage sends them to DVCLive); rank 0 only.
        cache: frozen-prefix outputs an earlier member of the ensemble computed (with the
            same frozen weights); None computes them here when the prefix can be cut.

    Returns:
        Per-epoch history, the best epoch (1-based), its metrics and its validation
        embeddings, and the cache used.

    Raises:
        UserError: cross-rank negatives asked for with fixed triplets.
    """
    params, precision, world = settings.params, settings.precision, settings.world
    trainer, validator, cache = _prepare(model, prep, data, settings, cache)
    started = time.perf_counter()  # the cache's time is its own line
    result = TrainResult(cache=cache, ema_decay=trainer.ema.decay if trainer.ema else 0.0)
    best_state = None
    epochs = data.schedule.epochs[: params.epochs]
    for epoch, steps in enumerate(epochs, start=1):
        epoch_started = time.perf_counter()
        losses = trainer.epoch(epoch, steps, data.schedule, data.train, prep, settings)
        scores, outputs = validator() if validator is not None else ({}, [])
        train_loss = distributed.mean_over_ranks(float(np.mean(losses)), world, precision.device)
        row = {"epoch": epoch, "train_loss": train_loss, "lr": trainer.scheduler.get_last_lr()[0]}
        row.update(scores)
        row["seconds"] = round(time.perf_counter() - started, 2)
        result.history.append(row)
        if world.main:
            log_row(row)
            log.info(_epoch_line(settings, row, time.perf_counter() - epoch_started))
        better = validator is not None and (
            best_state is None or row[MONITOR] > result.best[MONITOR]
        )
        if better or (validator is None and epoch == len(epochs)):
            result.best_epoch, result.best = epoch, dict(row)
            result.best_outputs = [o.detach().float().cpu() for o in outputs]
            best_state = copy.deepcopy(trainer.scored.state_dict())

    model.load_state_dict(best_state)
    model.eval()
    result.seconds = time.perf_counter() - started
    if world.main:
        log.info(_kept_line(settings, result, validator is not None))
    return result


def _kept_line(settings: FitSettings, result: TrainResult, validated: bool) -> str:
    kept = f"{settings.name}: kept epoch {result.best_epoch} of {len(result.history)}"
    if not validated:
        return f"{kept} (the last: no validation split to choose by); {result.seconds:.1f} s"
    return f"{kept} (val MAP@R {result.best[MONITOR]:.4f}); {result.seconds:.1f} s"


def _prepare(
    model: EmbeddingNet,
    prep: Preprocessing,
    data: FitData,
    settings: FitSettings,
    cache: PrefixCache | None,
) -> tuple[Trainer, Validator | None, PrefixCache | None]:
    """The loss, the device copy, the cache, the optimiser, its schedule and the average.

    In this order: the loss's class vectors and the cache's augmented views draw from torch's
    generator, so reordering them would change the run.
    """
    params, precision, world = settings.params, settings.precision, settings.world
    device = precision.device
    num_classes = int(np.concatenate([data.train.labels, data.val.labels]).max()) + 1
    validated = len(data.val.labels) > 0
    base_loss = build_loss(
        params.loss, params.margin, num_classes, model.embedding_dim, params.proxy_alpha
    ).to(device)
    loss_fn, miner = base_loss, build_miner(params.miner, params.margin, params.loss)
    # with pk batches only: params' cross-section check says so in one line
    cross = world.distributed and params.cross_rank_negatives
    if cross:
        loss_fn, miner = distributed.cross_rank(loss_fn, miner)
    model.to(device, memory_format=precision.memory_format)
    views = params.augment_views if params.augment else 0
    parts = model.split_frozen()
    if (
        cache is None
        and settings.fill_cache
        and parts is not None
        and (not params.augment or views)
    ):
        cache = cache_frozen_prefix(
            parts[0],
            prep,
            dict.fromkeys([*prep.sizes, *settings.cache_sizes] if validated else []),
            settings.cache_precision or precision,
            data.train,
            data.val,
            settings.batch_size_eval,
            views,
            params.seed,
            settings.cache_engine if device.type == "cpu" else "torch",
            settings.name,
        )
    cached = cache is not None and parts is not None
    net = distributed.wrap(parts[1] if cached else model, world, device)
    if params.compile:
        log.info(
            "%s: torch.compile of the trained part: it compiles in the first steps", settings.name
        )
        net = torch.compile(net)

    steps_per_epoch = len(data.schedule.epochs[0])
    optimizer = build_optimizer(model, params, base_loss)
    scheduler = lr_schedule(optimizer, params, steps_per_epoch)
    scaler = torch.amp.GradScaler("cuda", enabled=precision.dtype == torch.float16)
    ema = moving_average(model, params.ema, steps_per_epoch)
    scored = model if ema is None else ema.module  # what is validated and kept
    # with a cache, validation runs only the trainable part (the average's own copy of it),
    # without the head: validation needs the pooled features as well as the head's output
    rest = None
    if cached:
        rest = (parts[1] if ema is None else scored.split_frozen()[1])[0]
    trainer = Trainer(
        model,
        net,
        cache.train if cached else None,
        loss_fn,
        miner,
        base_loss,
        optimizer,
        scheduler,
        scaler,
        ema,
        cross,
        scored,
    )
    features = [cache.validation[size] for size in prep.sizes] if cached and validated else None
    validator = Validator(scored, rest, features, data, prep, settings, base_loss)
    return trainer, validator if validated else None, cache if cached else None


def _epoch_line(settings: FitSettings, row: dict, seconds: float) -> str:
    """`train: epoch 3/10: loss 0.1234, val loss ..., val MAP@R ...; 12.3 s` for the log."""
    head = f"{settings.name}: epoch {row['epoch']}/{settings.params.epochs}: "
    if "val_loss" not in row:
        return f"{head}loss {row['train_loss']:.4f}; {seconds:.1f} s"
    return (
        f"{head}loss {row['train_loss']:.4f}, val loss {row['val_loss']:.4f}, "
        f"val triplet accuracy {row['val_triplet_accuracy']:.4f}, "
        f"val precision@1 {row['val_precision_at_1']:.4f}, val MAP@R {row['val_map_at_r']:.4f}; "
        f"{seconds:.1f} s"
    )
