"""The training loop: fixed triplets or P x K batches, images or cached features, best epoch kept.

When the first stages of the backbone are frozen and nothing is augmented, their output never
changes, so it is computed once (by the shared embedder) and only the rest trains on it. With the
whole backbone frozen that is the pooled features and only the head trains: seconds on a CPU.

With several processes (`world`), each trains its share of every step (sharding.py) through a
DDP-wrapped copy of the trainable part; every rank computes the same frozen-prefix cache and
validates identically, and only rank 0 calls `log`.
"""

from __future__ import annotations

import copy
import functools
import math
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader

from siamese_cv.config.params import TrainParams
from siamese_cv.core.errors import UserError
from siamese_cv.evaluation.metrics import (
    expected_triplet_accuracy,
    retrieval_metrics,
    triplet_accuracy,
)
from siamese_cv.inference.embedder import Embedder
from siamese_cv.inference.hardware import Precision
from siamese_cv.models.ensemble import mean_of_normalised
from siamese_cv.models.siamese import EmbeddingNet, Preprocessing
from siamese_cv.training import distributed
from siamese_cv.training.batches import StepDataset, augmented_batches
from siamese_cv.training.distributed import SINGLE, World
from siamese_cv.training.losses import build_loss, build_miner
from siamese_cv.training.sharding import share_of

MONITOR = "val_map_at_r"
CACHE_BUDGET_BYTES = 6 * 2**30  # above this, frozen-prefix outputs are recomputed from images
EMA_MAX_EPOCHS = 2  # the moving average spans (1 / (1 - decay) steps) at most this many epochs


@dataclass
class SplitImages:
    """A split's processed image bytes and integer labels, row-aligned."""

    encoded: list[bytes]
    labels: np.ndarray


@dataclass
class Schedule:
    """What each epoch trains on: rows per step, and whether rows are (a..., p..., n...) triplets."""

    epochs: list[list[np.ndarray]]
    triplets: bool


@dataclass
class PrefixCache:
    """The frozen prefix's outputs, computed once and shared by every member of an ensemble.

    `train`: [views or 1, n, ...] for the training images; `validation`: per input size, the
    un-augmented validation images; `views`: augmented views per image (0: un-augmented).
    """

    train: torch.Tensor
    validation: dict[int, torch.Tensor]
    views: int


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


def _triplet_indices(n: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    base = torch.arange(n, device=device)
    return base, base + n, base + 2 * n


def _lr_lambda(params: TrainParams, steps_per_epoch: int) -> Callable[[int], float]:
    total = max(1, (params.schedule_epochs or params.epochs) * steps_per_epoch)
    warmup = int(params.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if params.scheduler == "cosine":
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return factor


def _optimizer(
    model: EmbeddingNet, params: TrainParams, loss: torch.nn.Module
) -> torch.optim.Optimizer:
    """Head at train.lr, backbone at train.backbone_lr, a proxy loss's class vectors at proxy_lr."""
    head = [p for p in model.head.parameters() if p.requires_grad]
    body = [p for p in model.backbone.parameters() if p.requires_grad]
    proxies = list(loss.parameters())
    groups = [{"params": head, "lr": params.lr}]
    if body:
        groups.append({"params": body, "lr": params.backbone_lr or params.lr})
    if proxies:
        groups.append({"params": proxies, "lr": params.proxy_lr or 100 * params.lr})
    if params.optimizer == "adam":
        return torch.optim.Adam(groups, lr=params.lr, weight_decay=params.weight_decay)
    if params.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=params.lr, weight_decay=params.weight_decay)
    return torch.optim.SGD(
        groups, lr=params.lr, momentum=0.9, weight_decay=params.weight_decay, nesterov=True
    )


def fit(
    model: EmbeddingNet,
    prep: Preprocessing,
    train: SplitImages,
    val: SplitImages,
    schedule: Schedule,
    val_triplets: np.ndarray,
    params: TrainParams,
    precision: Precision,
    log: Callable[[dict], None] = lambda row: None,
    batch_size_eval: int = 64,
    world: World = SINGLE,
    cache_precision: Precision | None = None,
    cache_engine: str = "torch",
    embed_from: str = "head",
    cache: PrefixCache | None = None,
    cache_sizes: Sequence[int] = (),
) -> TrainResult:
    """Train `model` in place and leave it holding the best epoch's weights (by validation MAP@R).

    Args:
        model: backbone + head, already frozen as `train.freeze` asks.
        prep: preprocessing of the processed images; training runs at `image_size`,
            validation embeds at its `sizes` (the mean of the L2-normalised embeddings when
            there are several), as the exported model will.
        train, val: the splits' images and labels.
        schedule: per-epoch steps from the sample_triplets stage.
        val_triplets: [n, 3] fixed validation triplets (rows of `val`).
        params: the `train` section.
        precision: device and autocast settings.
        log: called with each epoch's metrics (the stage sends them to DVCLive); rank 0 only.
        world: this process's place among several (inside an initialised process group), or
            the single-process default.
        cache_precision: the inference precision for filling the frozen-prefix cache (default:
            `precision`); bf16 inference can pay off where bf16 training steps do not.
        cache_engine: the embedding engine that fills the cache on a CPU (`evaluate.engine`);
            on a GPU the cache always runs in torch there.
        embed_from: `model.embed_from`: which output validation scores (and so which epoch is
            kept): the head's (`head`) or the pooled features under it (`pooled`); the
            validation loss is always the head's, at the first inference size.
        cache: frozen-prefix outputs an earlier member of the ensemble computed (with the
            same frozen weights); None computes them here when the prefix can be cut.
        cache_sizes: further validation sizes to put in a cache computed here (the later
            members' inference sizes).

    Returns:
        Per-epoch history, the best epoch (1-based), its metrics and its validation
        embeddings, and the cache used.
    """
    device = precision.device
    num_classes = int(max(train.labels.max(), val.labels.max())) + 1
    base_loss = build_loss(
        params.loss, params.margin, num_classes, model.embedding_dim, params.proxy_alpha
    ).to(device)
    loss_fn, miner = base_loss, build_miner(params.miner, params.margin, params.loss)
    cross = world.distributed and params.cross_rank_negatives
    if cross and schedule.triplets:
        raise UserError(
            "train.cross_rank_negatives: fixed triplets already name their negatives; "
            "set triplets.sampler: pk or train.cross_rank_negatives: false"
        )
    if cross:
        loss_fn, miner = distributed.cross_rank(loss_fn, miner)
    memory_format = torch.channels_last if precision.channels_last else torch.contiguous_format
    model.to(device, memory_format=memory_format)
    train_labels = torch.as_tensor(train.labels, device=device)
    views = params.augment_views if params.augment else 0
    parts = model.split_frozen()
    if cache is None and parts is not None and (not params.augment or views):
        cache = _cache_frozen_prefix(
            parts[0],
            prep,
            dict.fromkeys([*prep.sizes, *cache_sizes]),
            cache_precision or precision,
            train,
            val,
            batch_size_eval,
            views,
            params.seed,
            cache_engine if device.type == "cpu" else "torch",
        )
    cached = cache is not None and parts is not None
    if cached:
        # features: [views or 1, n, ...]; val_features: one tensor per inference size
        trainable, features = parts[1], cache.train
        val_features = [cache.validation[size] for size in prep.sizes]
    net = distributed.wrap(trainable if cached else model, world, device)

    steps_per_epoch = len(schedule.epochs[0])
    optimizer = _optimizer(model, params, base_loss)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(params, steps_per_epoch))
    scaler = torch.amp.GradScaler("cuda", enabled=precision.dtype == torch.float16)
    ema = _moving_average(model, params.ema, steps_per_epoch)
    scored = model if ema is None else ema.module  # what is validated and kept
    # with a cache, validation runs only the trainable part (the average's own copy of it),
    # without the head: validation needs the pooled features as well as the head's output
    scored_rest = None
    if cached:
        scored_rest = (trainable if ema is None else scored.split_frozen()[1])[0]
    result = TrainResult(cache=cache if cached else None, ema_decay=ema.decay if ema else 0.0)
    best_state = None
    started = time.perf_counter()

    for epoch, steps in enumerate(schedule.epochs[: params.epochs], start=1):
        model.train()
        losses = []
        shares = [
            share_of(rows, train.labels, schedule.triplets, world.rank, world.size, cross)
            for rows in steps
        ]
        source = _step_source([s.rows for s in shares], train, prep, params, epoch, cached)
        for step, (images, rows, inverse) in enumerate(source):
            with precision.autocast():
                if cached:
                    unique, inverse = torch.unique(rows, return_inverse=True)
                    view = _views_for(steps[step], unique, len(features), params.seed, epoch, step)
                    batch = features[view.to(device), unique.to(device)]
                    batch = _for(batch, precision)
                    emb = net(_as_input(batch, memory_format))[inverse.to(device)]
                else:
                    out = net(images.to(device).contiguous(memory_format=memory_format))
                    emb = out[inverse.to(device)]
            emb = emb.float()
            labels = train_labels[rows.to(device)]
            if schedule.triplets:
                indices = _triplet_indices(len(rows) // 3, device)
            else:
                indices = miner(emb, labels) if miner is not None else None
            loss = loss_fn(emb, labels, indices) * shares[step].weight
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            distributed.average_gradients(base_loss, world)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            if ema is not None:
                ema.update_parameters(model)
            # the cross-rank wrapper returns world x the whole step's loss; shares are weighted so
            # that the mean over ranks is the step's loss
            losses.append(float(loss.detach()) / (world.size if cross else 1))

        distributed.sync_buffers(net, world)

        scored.eval()
        val_head, outputs = _embed_validation(
            scored,
            scored_rest,
            val_features if cached else None,
            val,
            prep,
            precision,
            batch_size_eval,
            embed_from,
        )
        train_loss = distributed.mean_over_ranks(float(np.mean(losses)), world, device)
        row = {"epoch": epoch, "train_loss": train_loss, "lr": scheduler.get_last_lr()[0]}
        row["val_loss"] = _validation_loss(val_head, val.labels, val_triplets, base_loss)
        row.update(validation_scores(mean_of_normalised(outputs), val.labels, val_triplets))
        row["seconds"] = round(time.perf_counter() - started, 2)
        result.history.append(row)
        if world.main:
            log(row)
        if best_state is None or row[MONITOR] > result.best[MONITOR]:
            result.best_epoch, result.best = epoch, dict(row)
            result.best_outputs = [o.detach().float().cpu() for o in outputs]
            best_state = copy.deepcopy(scored.state_dict())

    model.load_state_dict(best_state)
    model.eval()
    result.seconds = time.perf_counter() - started
    return result


def _embed_validation(
    scored: EmbeddingNet,
    scored_rest: torch.nn.Module | None,
    val_features: list[torch.Tensor] | None,
    val: SplitImages,
    prep: Preprocessing,
    precision: Precision,
    batch_size: int,
    embed_from: str,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(the head's output at the first inference size, what would be exported at each size).

    With a cache, only the trainable rest runs, on each size's cached prefix outputs; without,
    the whole backbone embeds the images. The exported model combines the sizes as
    `mean_of_normalised` does.
    """
    memory_format = torch.channels_last if precision.channels_last else torch.contiguous_format
    heads, outputs = [], []
    for i, size in enumerate(prep.sizes):
        if val_features is not None:
            features = val_features[i]
            with torch.inference_mode(), precision.autocast():
                pooled = torch.cat(
                    [
                        scored_rest(
                            _as_input(_for(features[j : j + batch_size], precision), memory_format)
                        ).float()
                        for j in range(0, len(features), batch_size)
                    ]
                )
        else:
            at_size = replace(prep, input_sizes=(size,))
            embedder = Embedder(scored.backbone, at_size, precision, batch_size, normalize=False)
            pooled = torch.from_numpy(embedder.embed_encoded(val.encoded)).to(precision.device)
        with torch.inference_mode(), precision.autocast():
            head = scored.head(pooled).float()
        heads.append(head)
        outputs.append(pooled if embed_from == "pooled" else head)
    return heads[0], outputs


def _moving_average(
    model: EmbeddingNet, decay: float, steps_per_epoch: int
) -> AveragedModel | None:
    """An exponential moving average of the weights and BatchNorm statistics (`train.ema`).

    Averaging the last few hundred steps smooths out the noise of small batches; the averaged
    copy is what gets validated and kept. Its span, 1 / (1 - decay) steps, is capped at
    `EMA_MAX_EPOCHS` epochs: on a small collection, with few steps an epoch, a fixed decay
    would average over most of the run and keep the first epochs' weights in what is scored.
    """
    if not decay:
        return None
    decay = min(decay, 1.0 - 1.0 / (EMA_MAX_EPOCHS * steps_per_epoch))
    average = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
    average.decay = decay  # what was used, for the record
    return average


def _for(batch: torch.Tensor, precision: Precision) -> torch.Tensor:
    """Cached outputs (maybe bf16) as the trainable part's input dtype (fp32 without autocast)."""
    return batch.float() if precision.dtype is None else batch


def _as_input(batch: torch.Tensor, memory_format: torch.memory_format) -> torch.Tensor:
    return batch.contiguous(memory_format=memory_format) if batch.dim() == 4 else batch


def _views_for(
    step_rows: np.ndarray, unique: torch.Tensor, n_views: int, seed: int, epoch: int, step: int
) -> torch.Tensor:
    """Which cached augmented view each of the sorted `unique` rows uses in this step.

    Drawn (seeded) for every distinct row of the whole step, then picked for this process's rows,
    so the views do not depend on worker count or on how the step is split over processes.
    """
    if n_views == 1:
        return torch.zeros(len(unique), dtype=torch.long)
    every = np.unique(np.asarray(step_rows))
    generator = torch.Generator().manual_seed(hash((seed, epoch, step)) % 2**63)
    draws = torch.randint(n_views, (len(every),), generator=generator)
    return draws[torch.from_numpy(np.searchsorted(every, unique.numpy()))]


def _cache_frozen_prefix(
    prefix: torch.nn.Module,
    prep: Preprocessing,
    val_sizes: Iterable[int],
    precision: Precision,
    train: SplitImages,
    val: SplitImages,
    batch_size: int,
    views: int,
    seed: int,
    engine: str = "torch",
):
    """Run the frozen `prefix` once over the training images and, at `val_sizes`, validation's.

    With `views` > 0 the training images go through it as that many seeded augmented views, so
    augmentation survives caching; validation images always go through un-augmented.
    Returns None when not even one view would fit in `CACHE_BUDGET_BYTES` (then every step
    recomputes them from the images); when only some of the views fit, it caches as many as
    do and says so.
    """
    val_sizes = list(val_sizes)
    train_prep = replace(prep, input_sizes=())
    keep = torch.bfloat16 if precision.dtype is torch.bfloat16 else torch.float32

    @functools.cache  # the stored size is usually also an inference size
    def bytes_per_image(size: int) -> int:
        with torch.inference_mode():
            sample = prefix.eval()(torch.zeros(1, 3, size, size, device=precision.device))
        return sample.numel() * (2 if keep is torch.bfloat16 else 4)

    per_image = bytes_per_image(prep.image_size)
    val_bytes = len(val.encoded) * sum(bytes_per_image(size) for size in val_sizes)
    fitting = (CACHE_BUDGET_BYTES - val_bytes) // per_image // max(len(train.encoded), 1)
    if fitting < 1:
        return None
    if views > fitting:
        # fewer views keep most of augmentation's gain; no cache would make every epoch run
        # the frozen prefix again, several times slower
        print(
            f"train: {views} augmented views of {len(train.encoded)} images would need "
            f"{per_image * views * len(train.encoded) / 2**30:.1f} GiB, over the "
            f"{CACHE_BUDGET_BYTES / 2**30:.0f} GiB feature cache; caching {fitting}",
            file=sys.stderr,
        )
        views = fitting

    @functools.cache
    def extractor(size: int) -> Embedder:
        at = train_prep if size == prep.image_size else replace(prep, input_sizes=(size,))
        return Embedder(prefix, at, precision, batch_size, normalize=False, engine=engine)

    def run(split: SplitImages, size: int) -> torch.Tensor:
        embedded = extractor(size).embed_encoded(split.encoded)
        return torch.from_numpy(embedded).to(precision.device, keep)

    def run_view(view: int) -> torch.Tensor:
        makers = augmented_batches(train.encoded, train_prep, seed, view, batch_size)
        embedded = extractor(prep.image_size).embed_batches(makers)
        return torch.from_numpy(embedded).to(precision.device, keep)

    train_views = (
        torch.stack([run_view(v) for v in range(views)])
        if views
        else run(train, prep.image_size).unsqueeze(0)
    )
    validation = {size: run(val, size) for size in val_sizes}
    return PrefixCache(train_views, validation, len(train_views) if views else 0)


def _validation_loss(
    head_out: torch.Tensor, labels: np.ndarray, triplets: np.ndarray, loss_fn
) -> float:
    """The training loss on the head's output for the validation images."""
    with torch.no_grad():
        lab = torch.as_tensor(labels, device=head_out.device)
        idx = tuple(torch.as_tensor(triplets[:, i], device=head_out.device) for i in range(3))
        return float(loss_fn(head_out, lab, idx))


def validation_scores(exported: torch.Tensor, labels: np.ndarray, triplets: np.ndarray) -> dict:
    """The validation metrics of an embedding (what will be exported), by which epochs are kept."""
    emb = torch.nn.functional.normalize(exported.float(), dim=1).cpu().numpy()
    retrieval = retrieval_metrics(emb, labels, recall_at=(1,))
    return {
        "val_triplet_accuracy": triplet_accuracy(
            emb, triplets[:, 0], triplets[:, 1], triplets[:, 2]
        ),
        "val_expected_triplet_accuracy": expected_triplet_accuracy(emb, labels),
        "val_precision_at_1": retrieval["precision_at_1"],
        "val_map_at_r": retrieval["map_at_r"],
    }


def _step_source(
    steps: list[np.ndarray],
    train: SplitImages,
    prep: Preprocessing,
    params: TrainParams,
    epoch: int,
    cached: bool,
):
    """Yield (images or None, rows, inverse) per step; images are decoded in DataLoader workers."""
    if cached:
        for rows in steps:
            yield None, torch.from_numpy(np.asarray(rows, dtype=np.int64)), None
        return
    dataset = StepDataset(train.encoded, steps, prep, params.augment, params.seed, epoch)
    loader = DataLoader(
        dataset,
        batch_size=None,
        shuffle=False,
        num_workers=params.workers,
        persistent_workers=False,
        prefetch_factor=2 if params.workers else None,
    )
    for rows, (images, inverse) in zip(steps, loader, strict=True):
        yield images, torch.from_numpy(np.asarray(rows, dtype=np.int64)), inverse
