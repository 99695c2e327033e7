"""The optimiser, its learning-rate schedule, and the moving average of the weights.

The schedule is torch's own: a linear warm-up (`LinearLR`) for `train.warmup_epochs`, then a
cosine decay (`CosineAnnealingLR`) that reaches zero at the end of `train.schedule_epochs`, joined
by `SequentialLR`; with `train.scheduler: none` the rate stays at `train.lr` after the warm-up.
"""

from __future__ import annotations

import torch
from torch.optim.lr_scheduler import (
    ConstantLR,
    CosineAnnealingLR,
    LinearLR,
    LRScheduler,
    SequentialLR,
)
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from siamese_cv.config.params import TrainParams
from siamese_cv.models.siamese import EmbeddingNet

EMA_MAX_EPOCHS = 2  # the moving average spans (1 / (1 - decay) steps) at most this many epochs


def build_optimizer(
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


def lr_schedule(
    optimizer: torch.optim.Optimizer, params: TrainParams, steps_per_epoch: int
) -> LRScheduler:
    """The per-step learning-rate schedule, stepped once after every optimiser step.

    Step s of a warm-up of w steps runs at (s + 1) / w of each group's rate; the cosine then
    decays from the full rate at step w to zero at step `schedule_epochs x steps_per_epoch`.
    """
    total = max(1, (params.schedule_epochs or params.epochs) * steps_per_epoch)
    warmup = int(params.warmup_epochs * steps_per_epoch)
    ramp = None
    if warmup:
        ramp = LinearLR(optimizer, start_factor=1 / warmup, end_factor=1.0, total_iters=warmup - 1)
    if params.scheduler == "cosine":
        after: LRScheduler = CosineAnnealingLR(optimizer, T_max=max(1, total - warmup))
    else:
        after = ConstantLR(optimizer, factor=1.0, total_iters=0)
    if ramp is None:
        return after
    return SequentialLR(optimizer, [ramp, after], milestones=[warmup])


def moving_average(model: EmbeddingNet, decay: float, steps_per_epoch: int) -> AveragedModel | None:
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
