"""A tiny embedding network and random-noise photos: inputs for tests that need any model."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from siamese_cv.models.siamese import EmbeddingNet, build_model


def tiny_net(seed: int = 0) -> EmbeddingNet:
    """The `tiny` backbone with a 16-d linear head, seeded, in eval mode."""
    torch.manual_seed(seed)
    return build_model("tiny", "linear", 16)[0].eval()


def noise_photos(n: int = 6, size: int = 32) -> list[bytes]:
    """`n` seeded random-noise PNGs of `size` x `size`."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buffer, "PNG")
        out.append(buffer.getvalue())
    return out
