"""The train stage's body: load data and weights, fit, and save a self-describing checkpoint.

With several processes every rank runs this with its `World`; rank 0 alone logs to DVCLive and
writes the checkpoint, from the unwrapped model, so it is the same files as a one-process run.
"""

from __future__ import annotations

import contextlib
import functools
import platform
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from siamese_cv import __version__
from siamese_cv.config.params import Params, every_inference_size, member_sizes, parse_freeze
from siamese_cv.core import paths
from siamese_cv.core.allocator import keep_freed_memory
from siamese_cv.core.errors import UserError
from siamese_cv.data.triplet_tables import read_schedule, read_triplets
from siamese_cv.inference.embedder import decode_batch
from siamese_cv.inference.hardware import resolve_device, resolve_precision, seed_everything
from siamese_cv.models.ensemble import Ensemble, mean_of_normalised
from siamese_cv.models.pretrained import load_pretrained, preprocessing_of
from siamese_cv.models.siamese import EmbeddingNet, Preprocessing, save_checkpoint
from siamese_cv.training.depthwise import keep_depthwise_fp32
from siamese_cv.training.distributed import SINGLE, World
from siamese_cv.training.feature_cache import PrefixCache
from siamese_cv.training.feature_store import read_features
from siamese_cv.training.loop import fit
from siamese_cv.training.settings import FitData, FitSettings, Schedule, SplitImages
from siamese_cv.training.step_precision import choose_precision
from siamese_cv.training.validation import validation_scores


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


def train_and_save(
    params: Params,
    world: World = SINGLE,
    device: torch.device | None = None,
    stored_features: bool = True,
) -> dict[str, Any]:
    """Train as `params` says and write models/model.safetensors + models/config.json.

    With `train.members` > 1 the members train one after another, each from the pretrained
    weights with its own seed and its own epochs of the sampled steps, sharing the frozen-prefix
    cache; the saved model is their `Ensemble`, scored on validation as it will embed.

    Args:
        params: all parameters.
        world: this process's place in a multi-process run (inside its process group).
        device: this rank's device; None resolves `train.device`.
        stored_features: read the frozen prefix's outputs from data/features (the features
            stage); False computes them here, in memory, as `fit` can.

    Returns:
        The config (written by rank 0), including the per-epoch history and the best epoch.
    """
    tp = params.train
    keep_freed_memory()  # each step reuses the last step's activation memory (core/allocator.py)
    sizes = member_sizes(params)
    steps, are_triplets = read_schedule(paths.TRIPLETS, tp.batch_size)
    if len(steps) < tp.sampled_epochs:
        raise UserError(
            f"{paths.TRIPLETS}: {len(steps)} epochs of steps, but train.members x train.epochs "
            f"= {tp.sampled_epochs}; rerun `dvc repro sample_triplets`"
        )
    val_triplets, _ = read_triplets(paths.TRIPLETS / "validation.parquet")
    train_images, val_images = SplitImages.training_splits(paths.PROCESSED)
    device = device or resolve_device(tp.device)

    from dvclive import Live

    logger = (
        Live(str(paths.TRAIN_LOG), dvcyaml=None, save_dvc_exp=False, report=None)
        if world.main
        else contextlib.nullcontext()
    )
    members, cache = [], None
    with logger as live:
        # an ensemble's members train one after another, and their epochs follow one another on
        # the curves' step axis, so dvc.yaml's plots show every member

        def log(row: dict) -> None:
            for key, value in row.items():
                if key != "epoch":
                    live.log_metric(key, value)
            live.next_step()

        for k, own_sizes in enumerate(sizes):
            member_params = tp.model_copy(update={"seed": tp.seed + k})
            seed_everything(member_params.seed)
            model, card, frozen = _pretrained_model(params)
            prep = replace(preprocessing_of(params.preprocess, card), input_sizes=own_sizes)
            if k == 0 and stored_features:
                views = tp.augment_views if tp.augment else 0
                cache = read_features(
                    paths.FEATURES,
                    model.frozen_stages,
                    views,
                    tp.seed,
                    train_images,
                    val_images,
                    every_inference_size(params) if len(val_images.labels) else [],
                    device,
                )
            if k == 0:
                probe = functools.partial(
                    _first_step, model, cache, steps[0][0], train_images, prep
                )
                precision = choose_precision(tp.precision, device, probe, "train")
            filling = (
                {}
                if stored_features
                else {
                    "cache_precision": resolve_precision(
                        params.evaluate.precision, precision.device
                    ),
                    "cache_engine": params.evaluate.engine,
                }
            )
            settings = FitSettings(
                member_params,
                precision,
                batch_size_eval=params.evaluate.batch_size,
                world=world,
                embed_from=params.model.embed_from,
                cache_sizes=tuple(every_inference_size(params)),
                fill_cache=not stored_features,
                name=f"train: member {k + 1} of {len(sizes)}" if len(sizes) > 1 else "train",
                **filling,
            )
            schedule = Schedule(steps[k * tp.epochs : (k + 1) * tp.epochs], are_triplets)
            data = FitData(train_images, val_images, schedule, val_triplets)
            result = fit(model, prep, data, settings, log, cache)
            cache = result.cache
            if params.model.embed_from == "pooled":
                model.drop_head()
            members.append((model, prep, result))
        ensemble_best: dict = {}
        if len(members) > 1 and len(val_images.labels):
            outputs = [o for _, _, result in members for o in result.best_outputs]
            ensemble_best = validation_scores(
                mean_of_normalised(outputs), val_images.labels, val_triplets
            )
            if world.main:
                live.summary.update(ensemble_best)  # metrics.json: the ensemble's figures

    records = [
        {
            "seed": tp.seed + k,
            "input_sizes": list(prep.input_sizes),
            "best_epoch": result.best_epoch,
            "best": result.best,
            "history": result.history,
            "train_seconds": round(result.seconds, 1),
        }
        for k, (_, prep, result) in enumerate(members)
    ]
    model, prep, result = members[0]
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
        "ema_decay": result.ema_decay,
        "train_seconds": round(sum(r.seconds for _, _, r in members), 1),
        "versions": library_versions(),
    }
    if len(members) == 1:
        config |= {key: records[0][key] for key in ("best_epoch", "best", "history")}
    else:
        # the ensemble resizes inside itself, so the embedder feeds it the stored size
        config |= {
            "preprocessing": replace(prep, input_sizes=()).to_dict(),
            "best": ensemble_best,
            "members": records,
        }
        model = Ensemble([m for m, _, _ in members], [p.input_sizes for _, p, _ in members])
    if world.main:
        save_checkpoint(model, config, paths.MODEL)
    return config


def _first_step(
    model: EmbeddingNet,
    cache: PrefixCache | None,
    rows: np.ndarray,
    train: SplitImages,
    prep: Preprocessing,
) -> tuple[torch.nn.Module, torch.Tensor]:
    """What the first step runs forward and its input: the trainable rest on cached features,
    or the whole network on the images."""
    unique = np.unique(np.asarray(rows))
    parts = model.split_frozen()
    if cache is not None and parts is not None:
        return parts[1], cache.train[0, torch.from_numpy(unique)].float()
    return model, decode_batch([train.encoded[r] for r in unique], prep)


def _pretrained_model(params: Params) -> tuple[EmbeddingNet, dict[str, Any], list[str]]:
    """A fresh network from the pretrained weights, frozen as `train.freeze` says, its trained
    depthwise convolutions in fp32 when steps run under CPU bf16 autocast."""
    backbone, card = load_pretrained(paths.PRETRAINED)
    backbone.set_pooling(params.model.pooling)  # after the pretrained weights: GeM's p is new
    model = EmbeddingNet(backbone, params.model.head, params.model.embedding_dim)
    frozen = model.freeze(parse_freeze(params.train.freeze))
    keep_depthwise_fp32(model)  # bf16 steps: their weight gradients are slow in bf16 on CPUs
    return model, card, frozen
