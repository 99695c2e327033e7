"""One training epoch: its steps, on images or on cached prefix outputs, with a progress bar.

With several processes each trains its share of every step (sharding.py) through a DDP-wrapped
copy of the trainable part; only rank 0 draws the bar.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.optim.lr_scheduler import LRScheduler
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader

from siamese_cv.core.logs import progress
from siamese_cv.models.siamese import EmbeddingNet, Preprocessing
from siamese_cv.training import distributed
from siamese_cv.training.batches import StepDataset
from siamese_cv.training.feature_cache import as_input, views_for
from siamese_cv.training.settings import FitSettings, Schedule, SplitImages
from siamese_cv.training.sharding import share_of


@dataclass
class Trainer:
    """What every step uses, built once by `fit`.

    Attributes:
        model: the whole network (what the moving average follows).
        net: what runs forward: the model, or on cached features its trainable rest;
            DDP-wrapped with several processes.
        features: the cached training prefix outputs [views or 1, n, ...]; None: images.
        loss_fn, miner: the loss (and miner) on the step's embeddings, cross-rank when asked.
        base_loss: the loss module itself (its parameters are a proxy loss's class vectors).
        cross: negatives are drawn across ranks (the loss is world x the step's loss).
        scored: the network whose weights are kept: the model, or its moving average.
    """

    model: EmbeddingNet
    net: torch.nn.Module
    features: torch.Tensor | None
    loss_fn: torch.nn.Module
    miner: torch.nn.Module | None
    base_loss: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: LRScheduler
    scaler: torch.amp.GradScaler
    ema: AveragedModel | None
    cross: bool
    scored: torch.nn.Module

    def epoch(
        self,
        epoch: int,
        steps: list[np.ndarray],
        schedule: Schedule,
        train: SplitImages,
        prep: Preprocessing,
        settings: FitSettings,
    ) -> list[float]:
        """Train one epoch of `steps`; returns each step's loss (this process's share of it)."""
        params, precision, world = settings.params, settings.precision, settings.world
        device = precision.device
        train_labels = torch.as_tensor(train.labels, device=device)
        cached = self.features is not None
        self.model.train()
        losses: list[float] = []
        shares = [
            share_of(rows, train.labels, schedule.triplets, world.rank, world.size, self.cross)
            for rows in steps
        ]
        source = _step_source([s.rows for s in shares], train, prep, settings, epoch, cached)
        bar = progress(
            total=len(steps),
            desc=f"{settings.name}: epoch {epoch}/{params.epochs}",
            unit="step",
            enabled=world.main,
        )
        for step, (images, rows, inverse) in enumerate(source):
            with precision.autocast():
                if cached:
                    unique, inverse = torch.unique(rows, return_inverse=True)
                    n_views = len(self.features)
                    view = views_for(steps[step], unique, n_views, params.seed, epoch, step)
                    batch = self.features[view.to(device), unique.to(device)]
                    emb = self.net(as_input(batch, precision))[inverse.to(device)]
                else:
                    out = self.net(
                        images.to(device).contiguous(memory_format=precision.memory_format)
                    )
                    emb = out[inverse.to(device)]
            emb = emb.float()
            labels = train_labels[rows.to(device)]
            if schedule.triplets:
                indices = _triplet_indices(len(rows) // 3, device)
            else:
                indices = self.miner(emb, labels) if self.miner is not None else None
            loss = self.loss_fn(emb, labels, indices) * shares[step].weight
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            distributed.average_gradients(self.base_loss, world)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            if self.ema is not None:
                self.ema.update_parameters(self.model)
            # the cross-rank wrapper returns world x the whole step's loss; shares are weighted so
            # that the mean over ranks is the step's loss
            losses.append(float(loss.detach()) / (world.size if self.cross else 1))
            bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
            bar.update()
        bar.close()
        distributed.sync_buffers(self.net, world)
        return losses


def _triplet_indices(n: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    base = torch.arange(n, device=device)
    return base, base + n, base + 2 * n


def _step_source(
    steps: list[np.ndarray],
    train: SplitImages,
    prep: Preprocessing,
    settings: FitSettings,
    epoch: int,
    cached: bool,
) -> Iterator[tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]]:
    """Yield (images or None, rows, inverse) per step; images are decoded in DataLoader workers."""
    if cached:
        for rows in steps:
            yield None, torch.from_numpy(np.asarray(rows, dtype=np.int64)), None
        return
    params = settings.params
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
