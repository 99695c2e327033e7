"""What `fit` takes: the splits and sampled steps it trains on, and one frozen settings record."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from siamese_cv.config.params import TrainParams
from siamese_cv.data.parquet import read_table
from siamese_cv.inference.hardware import Precision
from siamese_cv.training.distributed import SINGLE, World


@dataclass
class SplitImages:
    """A split's processed image bytes and integer labels, row-aligned."""

    encoded: list[bytes]
    labels: np.ndarray

    @classmethod
    def from_parquet(cls, path: Path) -> SplitImages:
        """A processed split (data/processed/<split>.parquet)."""
        table = read_table(path, ["image", "label"])
        return cls(
            table.column("image").to_pylist(), table.column("label").to_numpy().astype(np.int64)
        )

    @classmethod
    def training_splits(cls, processed: Path) -> tuple[SplitImages, SplitImages]:
        """The train and validation splits of `processed` (data/processed), as `fit` takes them."""
        train, val = (cls.from_parquet(processed / f"{s}.parquet") for s in ("train", "validation"))
        return train, val


@dataclass
class Schedule:
    """What each epoch trains on: rows per step, and whether rows are (a..., p..., n...) triplets."""

    epochs: list[list[np.ndarray]]
    triplets: bool


@dataclass(frozen=True)
class FitData:
    """The training and validation splits, the sampled steps, and the fixed validation triplets.

    Attributes:
        train, val: the splits' images and labels.
        schedule: per-epoch steps from the sample_triplets stage.
        val_triplets: [n, 3] fixed validation triplets (rows of `val`).
    """

    train: SplitImages
    val: SplitImages
    schedule: Schedule
    val_triplets: np.ndarray


@dataclass(frozen=True)
class FitSettings:
    """How `fit` trains, validates and fills the frozen-prefix cache.

    Attributes:
        params: the `train` section.
        precision: device and autocast settings.
        batch_size_eval: images per forward pass when validating and filling the cache.
        world: this process's place among several (inside an initialised process group), or
            the single-process default.
        cache_precision: the inference precision for filling the frozen-prefix cache (default:
            `precision`); bf16 inference can pay off where bf16 training steps do not.
        cache_engine: the embedding engine that fills the cache on a CPU (`evaluate.engine`);
            on a GPU the cache always runs in torch there.
        embed_from: `model.embed_from`: which output validation scores (and so which epoch is
            kept): the head's (`head`) or the pooled features under it (`pooled`); the
            validation loss is always the head's, at the first inference size.
        cache_sizes: further validation sizes to put in a cache computed here (the later
            members' inference sizes).
        fill_cache: compute the frozen-prefix cache here when none is given; False when the
            features stage already decided (its stored features, or none: train on images).
        name: what the log lines call this run (`train`, or an ensemble member's name).
    """

    params: TrainParams
    precision: Precision
    batch_size_eval: int = 64
    world: World = SINGLE
    cache_precision: Precision | None = None
    cache_engine: str = "torch"
    embed_from: str = "head"
    cache_sizes: tuple[int, ...] = ()
    fill_cache: bool = True
    name: str = "train"
