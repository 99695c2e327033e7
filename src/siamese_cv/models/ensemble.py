"""Test-time input sizes (`model.inference_sizes`) and ensembles (`train.members`).

Random resized crops make objects look larger in training than in a whole photo at test time;
embedding at a larger input size restores the apparent size the network learned (Touvron et al.
2019, "Fixing the train-test resolution discrepancy"). With several sizes the embedding is the
mean of the L2-normalised embeddings at each, the usual multi-scale descriptor of image
retrieval. Both wrappers resize inside the module, so the torch engine, the ONNX export and a
search query all run the same graph on the same stored-size input.

An ensemble of independently trained networks (`Ensemble`) is combined the same way: each
member embeds at its own sizes, and the embedding is the mean over every (member, size) pair.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """[B, 3, H, W] at size x size: bilinear, anti-aliased when it shrinks."""
    if images.shape[-2:] == (size, size):
        return images
    shrinks = size < min(images.shape[-2:])
    return F.interpolate(
        images, size=(size, size), mode="bilinear", align_corners=False, antialias=shrinks
    )


class Resized(nn.Module):
    """`model` applied to its input resized to `size` x `size`."""

    def __init__(self, model: nn.Module, size: int):
        super().__init__()
        self.model = model
        self.size = size

    def extra_repr(self) -> str:  # part of the ONNX export's cache key
        return f"size={self.size}"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(resize(images, self.size))


class Ensemble(nn.Module):
    """The mean of L2-normalised embeddings over `members`, each at its own input `sizes`.

    Args:
        members: the trained networks (same embedding width).
        sizes: per member, the input sizes it embeds at (empty: the input's own size).
    """

    def __init__(self, members: Sequence[nn.Module], sizes: Sequence[Sequence[int]]):
        super().__init__()
        if len(members) != len(sizes):
            raise ValueError(f"{len(members)} members but {len(sizes)} lists of sizes")
        self.members = nn.ModuleList(members)
        self.sizes = tuple(tuple(s) for s in sizes)

    def extra_repr(self) -> str:  # part of the ONNX export's cache key
        return f"sizes={self.sizes}"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return mean_of_normalised(
            [
                member(resize(images, size))
                for member, sizes in zip(self.members, self.sizes, strict=True)
                for size in sizes or (images.shape[-1],)
            ]
        )


class MultiScale(Ensemble):
    """The mean over `sizes` of `model`'s L2-normalised embeddings: a one-member `Ensemble`."""

    def __init__(self, model: nn.Module, sizes: Sequence[int]):
        super().__init__([model], [sizes])

    def extra_repr(self) -> str:  # part of the ONNX export's cache key
        return f"sizes={self.sizes[0]}"


def mean_of_normalised(embeddings: Sequence[torch.Tensor]) -> torch.Tensor:
    """The mean of [B, D] embeddings, each L2-normalised first (in float32)."""
    total = sum(F.normalize(e.float(), dim=1) for e in embeddings)
    return total / len(embeddings)


def at_sizes(model: nn.Module, sizes: Sequence[int], image_size: int) -> nn.Module:
    """`model` as it should run on `image_size` inputs to embed at `sizes` (itself if that is all)."""
    sizes = tuple(sizes)
    if not sizes or sizes == (image_size,):
        return model
    if len(sizes) == 1:
        return Resized(model, sizes[0])
    return MultiScale(model, sizes)
