"""Global pooling choices for `model.pooling`: how the last feature map becomes one vector.

`avg` is every backbone's own pooling (what ImageNet training used). The others are the field's
usual alternatives for retrieval: generalised-mean pooling (GeM, Radenović et al. 2018), a power
mean with a learned exponent that leans towards the strongest activations, and the mean of
average and max pooling that Proxy-Anchor's reference code puts on its backbone.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from siamese_cv.config.choices import POOLINGS, check_registered

# the poolings that replace a backbone's own, each built as `factory(flatten=...)`
_POOLINGS: dict[str, Callable[..., nn.Module]] = {}


def register_pooling(name: str):
    """Decorator: register a pooling module class or factory under `name`."""

    def decorator(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name == "avg":
            raise ValueError("pooling 'avg' is each backbone's own; register another name")
        if name in _POOLINGS:
            raise ValueError(f"pooling {name!r} is registered twice")
        _POOLINGS[name] = factory
        return factory

    return decorator


def list_poolings() -> list[str]:
    """`avg` (each backbone's own pooling) and the registered replacements."""
    return ["avg", *sorted(_POOLINGS)]


@register_pooling("gem")
class GeM(nn.Module):
    """Generalised mean over H x W: (mean x^p)^(1/p); p is learned, starting at `p` (1 = average)."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6, flatten: bool = True):
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)))
        self.eps = eps
        self.flatten = flatten

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.p.clamp(min=1.0)  # below 1 the power mean stops being a pooling
        pooled = x.float().clamp(min=self.eps).pow(p).mean(dim=(2, 3)).pow(1.0 / p).to(x.dtype)
        return pooled if self.flatten else pooled[:, :, None, None]


@register_pooling("avgmax")
class AvgMax(nn.Module):
    """The mean of global average and global max pooling."""

    def __init__(self, flatten: bool = True):
        super().__init__()
        self.flatten = flatten

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = 0.5 * (x.mean(dim=(2, 3)) + x.amax(dim=(2, 3)))
        return pooled if self.flatten else pooled[:, :, None, None]


def make_pooling(kind: str, flatten: bool) -> nn.Module:
    """A global pooling module for `kind` other than `avg` (which keeps the backbone's own).

    `flatten` False keeps the [B, C, 1, 1] shape that some nets flatten themselves.
    """
    if kind not in _POOLINGS:
        raise ValueError(
            f"pooling {kind!r}: only {', '.join(sorted(_POOLINGS))} replace a backbone's pooling"
        )
    return _POOLINGS[kind](flatten=flatten)


check_registered("pooling", list_poolings(), POOLINGS)
