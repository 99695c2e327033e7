"""The train stage's body: load data and weights, fit, and save a self-describing checkpoint.

With several processes every rank runs this with its `World`; rank 0 alone logs to DVCLive and
writes the checkpoint, from the unwrapped model, so it is the same files as a one-process run.
"""

from __future__ import annotations

import contextlib
import platform
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from siamese_cv import __version__, paths
from siamese_cv.data.parquet import read_table
from siamese_cv.data.triplet_tables import read_schedule, read_triplets
from siamese_cv.hardware import resolve_device, resolve_precision, seed_everything
from siamese_cv.models.pretrained import load_pretrained
from siamese_cv.models.siamese import EmbeddingNet, Preprocessing, save_checkpoint
from siamese_cv.params import Params, parse_freeze
from siamese_cv.training.distributed import SINGLE, World
from siamese_cv.training.loop import Schedule, SplitImages, fit


def library_versions() -> dict[str, str]:
    import PIL
    import pytorch_metric_learning
    import timm
    import torch
    import torchvision

    return {
        "siamese_cv": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "numpy": np.__version__,
        "pillow": PIL.__version__,
        "pytorch_metric_learning": pytorch_metric_learning.__version__,
    }


def load_split(name: str) -> SplitImages:
    table = read_table(paths.PROCESSED / f"{name}.parquet", ["image", "label"])
    return SplitImages(
        table.column("image").to_pylist(), table.column("label").to_numpy().astype(np.int64)
    )


def preprocessing_of(params: Params, card: dict[str, Any]) -> Preprocessing:
    return Preprocessing(
        params.preprocess.image_size,
        params.preprocess.resize,
        tuple(card["mean"]),
        tuple(card["std"]),
    )


def train_and_save(
    params: Params, world: World = SINGLE, device: torch.device | None = None
) -> dict[str, Any]:
    """Train as `params` says and write models/model.safetensors + models/config.json.

    Args:
        params: all parameters.
        world: this process's place in a multi-process run (inside its process group).
        device: this rank's device; None resolves `train.device`.

    Returns:
        The config (written by rank 0), including the per-epoch history and the best epoch.
    """
    tp = params.train
    seed_everything(tp.seed)
    backbone, card = load_pretrained(paths.PRETRAINED)
    backbone.set_pooling(params.model.pooling)  # after the pretrained weights: GeM's p is new
    model = EmbeddingNet(backbone, params.model.head, params.model.embedding_dim)
    frozen = model.freeze(parse_freeze(tp.freeze))
    prep = replace(preprocessing_of(params, card), input_sizes=tuple(params.model.inference_sizes))
    steps, are_triplets = read_schedule(paths.TRIPLETS, tp.batch_size)
    val_triplets, _ = read_triplets(paths.TRIPLETS / "validation.parquet")
    precision = resolve_precision(tp.precision, device or resolve_device(tp.device))

    from dvclive import Live

    logger = (
        Live(str(paths.TRAIN_LOG), dvcyaml=None, save_dvc_exp=False, report=None)
        if world.main
        else contextlib.nullcontext()
    )
    with logger as live:

        def log(row: dict) -> None:
            for key, value in row.items():
                if key != "epoch":
                    live.log_metric(key, value)
            live.next_step()

        result = fit(
            model,
            prep,
            load_split("train"),
            load_split("validation"),
            Schedule(steps, are_triplets),
            val_triplets,
            tp,
            precision,
            log,
            batch_size_eval=params.evaluate.batch_size,
            world=world,
            cache_precision=resolve_precision(params.evaluate.precision, precision.device),
            cache_engine=params.evaluate.engine,
            embed_from=params.model.embed_from,
        )
    if params.model.embed_from == "pooled":
        model.drop_head()

    config = {
        "backbone": card["backbone"],
        "pretrained": {"weights": card["weights"], "fingerprint": card["fingerprint"]},
        "head": "identity" if params.model.embed_from == "pooled" else params.model.head,
        "trained_head": params.model.head,
        "embed_from": params.model.embed_from,
        "pooling": params.model.pooling,
        "feature_dim": model.feature_dim,
        "embedding_dim": model.embedding_dim,
        "preprocessing": prep.to_dict(),
        "frozen": frozen,
        "train": params.train.__dict__ | {"sampler": params.triplets.sampler},
        "precision": precision.name,
        "device": str(precision.device),
        "world_size": world.size,
        "cached_features": result.cached_features,
        "cached_views": result.cached_views,
        "best_epoch": result.best_epoch,
        "best": result.best,
        "history": result.history,
        "train_seconds": round(result.seconds, 1),
        "versions": library_versions(),
    }
    if world.main:
        save_checkpoint(model, config, paths.MODEL)
    return config
