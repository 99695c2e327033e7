"""Losses and miners, composed from pytorch-metric-learning by injection.

Every loss takes `(embeddings, labels, indices_tuple)`: the original's fixed triplets are passed
as an `indices_tuple`, online miners produce one, so one training loop serves both. Proxy losses
(`proxy_anchor`, `normalized_softmax`) learn one vector per class instead of comparing samples:
they ignore the tuple and add their own parameters, which the optimizer must train too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pytorch_metric_learning import distances, losses, miners, reducers
from torch import nn

from siamese_cv.config.choices import LOSSES, MINERS, PROXY_LOSSES, check_registered
from siamese_cv.core.errors import UserError


@dataclass(frozen=True)
class _LossSettings:
    """What a loss may be built from; each factory reads the fields its loss has."""

    margin: float
    num_classes: int
    dim: int
    proxy_alpha: float


_LOSSES: dict[str, Callable[[_LossSettings], nn.Module]] = {}
_MINERS: dict[str, Callable[[float, str], nn.Module]] = {}


def _register(table: dict, name: str):
    def decorator(fn):
        if name in table:
            raise ValueError(f"{name!r} is registered twice")
        table[name] = fn
        return fn

    return decorator


@_register(_LOSSES, "triplet_l2sq")
def _triplet_l2sq(s: _LossSettings) -> nn.Module:
    """The original: mean(relu(||a-p||^2 - ||a-n||^2 + margin)) on un-normalised embeddings."""
    return losses.TripletMarginLoss(
        margin=s.margin,
        distance=distances.LpDistance(normalize_embeddings=False, p=2, power=2),
        reducer=reducers.MeanReducer(),
    )


@_register(_LOSSES, "triplet_cosine")
def _triplet_cosine(s: _LossSettings) -> nn.Module:
    """Triplet margin on cosine similarity of L2-normalised embeddings: the metric search uses."""
    return losses.TripletMarginLoss(margin=s.margin, distance=distances.CosineSimilarity())


@_register(_LOSSES, "multi_similarity")
def _multi_similarity(s: _LossSettings) -> nn.Module:
    return losses.MultiSimilarityLoss(alpha=2.0, beta=50.0, base=0.5)


@_register(_LOSSES, "proxy_anchor")
def _proxy_anchor(s: _LossSettings) -> nn.Module:
    """Proxy-Anchor (Kim et al. 2020): each class's proxy pulls its samples; alpha scales the
    similarities inside the log-sum-exp (the paper's 32): the lower, the further the loss keeps
    pulling positives that are already past the margin."""
    return _ProxyLoss(
        losses.ProxyAnchorLoss(s.num_classes, s.dim, margin=s.margin, alpha=s.proxy_alpha)
    )


@_register(_LOSSES, "normalized_softmax")
def _normalized_softmax(s: _LossSettings) -> nn.Module:
    """Cosine softmax over class proxies at temperature 0.05 (Zhai & Wu 2019); no margin."""
    return _ProxyLoss(losses.NormalizedSoftmaxLoss(s.num_classes, s.dim, temperature=0.05))


class _ProxyLoss(nn.Module):
    """A proxy loss that takes (and ignores) an indices tuple, like the sample-pair losses."""

    def __init__(self, loss: nn.Module):
        super().__init__()
        self.loss = loss

    def forward(self, embeddings, labels, indices_tuple=None):
        return self.loss(embeddings, labels)


def distance_of(loss_name: str) -> distances.BaseDistance:
    if loss_name == "triplet_l2sq":
        return distances.LpDistance(normalize_embeddings=False, p=2, power=2)
    return distances.CosineSimilarity()


@_register(_MINERS, "semihard")
def _semihard(margin: float, loss_name: str) -> nn.Module:
    return miners.TripletMarginMiner(
        margin=margin, type_of_triplets="semihard", distance=distance_of(loss_name)
    )


@_register(_MINERS, "batch_hard")
def _batch_hard(margin: float, loss_name: str) -> nn.Module:
    return miners.BatchHardMiner(distance=distance_of(loss_name))


@_register(_MINERS, "multi_similarity")
def _ms_miner(margin: float, loss_name: str) -> nn.Module:
    return miners.MultiSimilarityMiner(epsilon=0.1)


def list_losses() -> list[str]:
    return sorted(_LOSSES)


def list_miners() -> list[str]:
    return ["none", *sorted(_MINERS)]


check_registered("loss", _LOSSES, LOSSES)
check_registered("miner", list_miners(), MINERS)


def build_loss(
    name: str, margin: float, num_classes: int = 0, dim: int = 0, proxy_alpha: float = 32.0
) -> nn.Module:
    """The loss `name`; proxy losses need the number of classes and the embedding size, and
    `proxy_alpha` is Proxy-Anchor's scale (the other losses have none)."""
    if name not in _LOSSES:
        raise UserError(f"train.loss: {name!r} is not one of {', '.join(list_losses())}")
    if name in PROXY_LOSSES and (num_classes < 1 or dim < 1):
        raise ValueError(f"{name} needs num_classes and dim")
    return _LOSSES[name](_LossSettings(margin, num_classes, dim, proxy_alpha))


def build_miner(name: str, margin: float, loss_name: str) -> nn.Module | None:
    if name == "none":
        return None
    if name not in _MINERS:
        raise UserError(f"train.miner: {name!r} is not one of {', '.join(list_miners())}")
    return _MINERS[name](margin, loss_name)
