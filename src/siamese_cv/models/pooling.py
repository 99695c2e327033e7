"""Global pooling choices for `model.pooling`: how the last feature map becomes one vector.

`avg` is every backbone's own pooling (what ImageNet training used). The others are the field's
usual alternatives for retrieval: generalised-mean pooling (GeM, Radenović et al. 2018), a power
mean with a learned exponent that leans towards the strongest activations, and the mean of
average and max pooling that Proxy-Anchor's reference code puts on its backbone.
"""

from __future__ import annotations

import torch
from torch import nn


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
    if kind == "gem":
        return GeM(flatten=flatten)
    if kind == "avgmax":
        return AvgMax(flatten=flatten)
    raise ValueError(f"pooling {kind!r}: only gem and avgmax replace a backbone's pooling")
