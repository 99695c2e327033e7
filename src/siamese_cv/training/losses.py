"""Losses and miners, composed from pytorch-metric-learning by injection.

Every loss takes `(embeddings, labels, indices_tuple)`: the original's fixed triplets are passed
as an `indices_tuple`, online miners produce one, so one training loop serves both.
"""

from __future__ import annotations

from collections.abc import Callable

from pytorch_metric_learning import distances, losses, miners, reducers
from torch import nn

from siamese_cv.errors import UserError

_LOSSES: dict[str, Callable[[float], nn.Module]] = {}
_MINERS: dict[str, Callable[[float, str], nn.Module]] = {}


def _register(table: dict, name: str):
    def decorator(fn):
        if name in table:
            raise ValueError(f"{name!r} is registered twice")
        table[name] = fn
        return fn

    return decorator


@_register(_LOSSES, "triplet_l2sq")
def _triplet_l2sq(margin: float) -> nn.Module:
    """The original: mean(relu(||a-p||^2 - ||a-n||^2 + margin)) on un-normalised embeddings."""
    return losses.TripletMarginLoss(
        margin=margin,
        distance=distances.LpDistance(normalize_embeddings=False, p=2, power=2),
        reducer=reducers.MeanReducer(),
    )


@_register(_LOSSES, "triplet_cosine")
def _triplet_cosine(margin: float) -> nn.Module:
    """Triplet margin on cosine similarity of L2-normalised embeddings: the metric search uses."""
    return losses.TripletMarginLoss(margin=margin, distance=distances.CosineSimilarity())


@_register(_LOSSES, "multi_similarity")
def _multi_similarity(margin: float) -> nn.Module:
    return losses.MultiSimilarityLoss(alpha=2.0, beta=50.0, base=0.5)


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


def build_loss(name: str, margin: float) -> nn.Module:
    if name not in _LOSSES:
        raise UserError(f"train.loss: {name!r} is not one of {', '.join(list_losses())}")
    return _LOSSES[name](margin)


def build_miner(name: str, margin: float, loss_name: str) -> nn.Module | None:
    if name == "none":
        return None
    if name not in _MINERS:
        raise UserError(f"train.miner: {name!r} is not one of {', '.join(list_miners())}")
    return _MINERS[name](margin, loss_name)
