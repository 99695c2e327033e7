"""PCA whitening of the copy descriptor, learned from the gallery's own photos.

The frozen backbone's GeM descriptor spends most of its length on directions that every photo
of a collection shares (plates, lighting, the dish's colours), so two photos of one dish score
close even when neither is a copy of the other. Whitening (centre on the gallery's mean,
project on its principal directions, divide each by its spread) lets the photo-specific detail
count as much: on food10's validation photos it raised the copy µAP from 0.877 to 0.978
(docs/experiments.md). It is fitted without labels on the gallery's descriptors, never on the
validation or test photos, and it runs as the descriptor's head, so every engine, the stored
prefix maps and the ONNX export apply it alike.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

log = logging.getLogger(__name__)

MEAN_FILE = "whitening_mean.npy"
PROJECTION_FILE = "whitening_projection.npy"
PHOTOS_PER_DIM = 2  # a covariance fitted on fewer photos than this per kept direction is noise
SHRINKAGE = 0.1  # of the mean variance, added to each direction's: no near-empty one blows up


class Whitening(nn.Module):
    """unit rows -> (x - mean) @ projection: the whitened descriptor, normalised by the embedder."""

    def __init__(self, mean: torch.Tensor, projection: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean.float().reshape(1, -1))
        self.register_buffer("projection", projection.float().contiguous())

    @property
    def dims(self) -> int:
        return int(self.projection.shape[1])

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        # normalised first, as the gallery's stored descriptors it was fitted on are
        return (F.normalize(pooled.float(), dim=1) - self.mean) @ self.projection

    def apply(self, vectors: np.ndarray) -> np.ndarray:
        """Whiten unit descriptors already embedded without it; returns unit rows, float32."""
        with torch.inference_mode():
            out = F.normalize(self(torch.from_numpy(np.ascontiguousarray(vectors))), dim=1)
        return out.numpy().astype(np.float32, copy=False)

    def arrays(self) -> dict[str, np.ndarray]:
        """The files data/copies keeps it in."""
        return {MEAN_FILE: self.mean.numpy()[0], PROJECTION_FILE: self.projection.numpy()}


def fit_whitening(vectors: np.ndarray, dims: int, what: str) -> Whitening | None:
    """PCA whitening of unit descriptors `vectors` [n, d] to `dims` directions.

    None (saying why, in `what`'s words) when `dims` is 0 or there are fewer than
    PHOTOS_PER_DIM photos per direction to fit it on.
    """
    if dims == 0:
        return None
    dims = min(dims, vectors.shape[1])
    if len(vectors) < PHOTOS_PER_DIM * dims:
        log.info(
            f"{what}: {len(vectors)} photos are too few to whiten the copy descriptor to {dims} "
            f"dims ({PHOTOS_PER_DIM * dims} needed); it stays unwhitened (lower "
            "copies.whitening to whiten a small collection)"
        )
        return None
    x = np.asarray(vectors, np.float64)
    mean = x.mean(axis=0)
    centred = x - mean
    variances, directions = np.linalg.eigh(centred.T @ centred / len(x))
    keep = np.argsort(variances)[::-1][:dims]
    variances = np.clip(variances[keep], 0.0, None)
    variances += SHRINKAGE * variances.mean()
    projection = directions[:, keep] / np.sqrt(variances)
    return Whitening(torch.from_numpy(mean), torch.from_numpy(projection))


def load_whitening(directory: Path) -> Whitening | None:
    """The whitening stored in `directory` (data/copies), or None when it holds none."""
    if not (directory / PROJECTION_FILE).is_file():
        return None
    mean = np.load(directory / MEAN_FILE, allow_pickle=False)
    projection = np.load(directory / PROJECTION_FILE, allow_pickle=False)
    return Whitening(torch.from_numpy(mean), torch.from_numpy(projection))
