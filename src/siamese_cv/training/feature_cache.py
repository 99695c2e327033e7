"""The frozen prefix's outputs, computed once: what the trainable rest of the network trains on.

When the first stages of the backbone are frozen and nothing is augmented on the fly, their
output never changes, so the shared embedder computes it once and only the rest trains on it;
with augmentation, that many seeded augmented views of every image are cached instead.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace

import numpy as np
import torch

from siamese_cv.inference.embedder import Embedder
from siamese_cv.inference.hardware import Precision
from siamese_cv.inference.prefix_maps import map_bytes
from siamese_cv.models.siamese import Preprocessing
from siamese_cv.training.batches import VIEW_CHOICE, augmented_batches, stream_seed
from siamese_cv.training.settings import SplitImages

log = logging.getLogger(__name__)

CACHE_BUDGET_BYTES = 6 * 2**30  # above this, frozen-prefix outputs are recomputed from images


@dataclass
class PrefixCache:
    """The frozen prefix's outputs, computed once and shared by every member of an ensemble.

    `train`: [views or 1, n, ...] for the training images; `validation`: per input size, the
    un-augmented validation images; `views`: augmented views per image (0: un-augmented).
    """

    train: torch.Tensor
    validation: dict[int, torch.Tensor]
    views: int


def cache_frozen_prefix(
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
    name: str = "train",
) -> PrefixCache | None:
    """Run the frozen `prefix` once over the training images and, at `val_sizes`, validation's.

    With `views` > 0 the training images go through it as that many seeded augmented views, so
    augmentation survives caching; validation images always go through un-augmented.

    Returns:
        None when not even one view would fit in `CACHE_BUDGET_BYTES` (then every step
        recomputes them from the images); when only some of the views fit, it caches as many as
        do and says so.
    """
    val_sizes = list(val_sizes)
    train_prep = replace(prep, input_sizes=())
    keep = torch.bfloat16 if precision.dtype is torch.bfloat16 else torch.float32

    @functools.cache  # the stored size is usually also an inference size
    def bytes_per_image(size: int) -> int:
        return map_bytes(prefix, size, precision.device, 2 if keep is torch.bfloat16 else 4)

    per_image = bytes_per_image(prep.image_size)
    val_bytes = len(val.encoded) * sum(bytes_per_image(size) for size in val_sizes)
    fitting = (CACHE_BUDGET_BYTES - val_bytes) // per_image // max(len(train.encoded), 1)
    if fitting < 1:
        log.info(
            "%s: the frozen prefix's outputs would not fit in the %.0f GiB feature cache; "
            "every step recomputes them from the images",
            name,
            CACHE_BUDGET_BYTES / 2**30,
        )
        return None
    if views > fitting:
        # fewer views keep most of augmentation's gain; no cache would make every epoch run
        # the frozen prefix again, several times slower
        log.warning(
            "%s: %d augmented views of %d images would need %.1f GiB, over the %.0f GiB "
            "feature cache; caching %d",
            name,
            views,
            len(train.encoded),
            per_image * views * len(train.encoded) / 2**30,
            CACHE_BUDGET_BYTES / 2**30,
            fitting,
        )
        views = fitting
    started = time.perf_counter()

    @functools.cache
    def extractor(size: int) -> Embedder:
        at = train_prep if size == prep.image_size else replace(prep, input_sizes=(size,))
        return Embedder(prefix, at, precision, batch_size, normalize=False, engine=engine)

    def run(split: SplitImages, size: int, label: str) -> torch.Tensor:
        embedded = extractor(size).embed_encoded(split.encoded, progress=label)
        return torch.from_numpy(embedded).to(precision.device, keep)

    def run_view(view: int) -> torch.Tensor:
        makers = augmented_batches(train.encoded, train_prep, seed, view, batch_size)
        label = f"{name}: caching view {view + 1} of {views}"
        embedded = extractor(prep.image_size).embed_batches(
            makers, total=len(train.encoded), progress=label
        )
        return torch.from_numpy(embedded).to(precision.device, keep)

    train_views = (
        torch.stack([run_view(v) for v in range(views)])
        if views
        else run(train, prep.image_size, f"{name}: caching training images").unsqueeze(0)
    )
    validation = {
        size: run(val, size, f"{name}: caching validation at {size} px") for size in val_sizes
    }
    cache = PrefixCache(train_views, validation, len(train_views) if views else 0)
    stored = sum(t.numel() * t.element_size() for t in [train_views, *validation.values()])
    log.info(
        "%s: cached the frozen prefix's outputs: %d training images x %s, %d validation "
        "images at %s px (%.0f MiB) in %.1f s",
        name,
        len(train.encoded),
        f"{views} augmented views" if views else "1 view",
        len(val.encoded),
        ", ".join(map(str, val_sizes)),
        stored / 2**20,
        time.perf_counter() - started,
    )
    return cache


def views_for(
    step_rows: np.ndarray, unique: torch.Tensor, n_views: int, seed: int, epoch: int, step: int
) -> torch.Tensor:
    """Which cached augmented view each of the sorted `unique` rows uses in this step.

    Drawn (seeded) for every distinct row of the whole step, then picked for this process's rows,
    so the views do not depend on worker count or on how the step is split over processes.
    """
    if n_views == 1:
        return torch.zeros(len(unique), dtype=torch.long)
    every = np.unique(np.asarray(step_rows))
    generator = torch.Generator().manual_seed(stream_seed(seed, VIEW_CHOICE, epoch, step))
    draws = torch.randint(n_views, (len(every),), generator=generator)
    return draws[torch.from_numpy(np.searchsorted(every, unique.numpy()))]


def as_input(batch: torch.Tensor, precision: Precision) -> torch.Tensor:
    """Cached outputs (maybe bf16) as the trainable part's input: its dtype and memory format.

    fp32 without autocast; a 4-d feature map in channels_last where the precision asks for it.
    """
    if precision.dtype is None:
        batch = batch.float()
    if batch.dim() != 4:
        return batch
    return batch.contiguous(memory_format=precision.memory_format)
