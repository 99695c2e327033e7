"""Seeded augmentation: each image's view depends on its own stream key, never on batching."""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import torch
from PIL import Image

from siamese_cv.models.siamese import Preprocessing
from siamese_cv.training.batches import (
    CACHED_VIEW,
    STEP_AUGMENT,
    StepDataset,
    augmented_batches,
    stream_seed,
)

PREP = Preprocessing(32, "stretch", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def photos(n: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    encoded = []
    for _ in range(n):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(buffer, "PNG")
        encoded.append(buffer.getvalue())
    return encoded


def test_stream_seeds_are_seed_sequence_states_apart_for_every_stream():
    keys = [(42, s, e, i) for s in (CACHED_VIEW, STEP_AUGMENT) for e in range(3) for i in range(50)]
    seeds = [stream_seed(*k) for k in keys]
    assert len(set(seeds)) == len(keys) and all(0 <= s < 2**63 for s in seeds)
    state = np.random.SeedSequence([42, STEP_AUGMENT, 1, 7]).generate_state(1, np.uint64)[0]
    assert stream_seed(42, STEP_AUGMENT, 1, 7) == int(state) >> 1
    # the same in a fresh interpreter: a key, not whatever hash() gives on this Python
    code = "from siamese_cv.training.batches import stream_seed; print(stream_seed(42, 1, 1, 7))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(out.stdout) == stream_seed(42, STEP_AUGMENT, 1, 7)


def test_a_cached_view_is_the_same_for_any_batch_size_and_differs_between_views():
    encoded = photos(5)

    def view(index: int, batch_size: int) -> torch.Tensor:
        return torch.cat(
            [make() for make in augmented_batches(encoded, PREP, 7, index, batch_size)]
        )

    first = view(0, 2)
    assert torch.equal(first, view(0, 5)) and first.shape == (5, 3, 32, 32)
    assert not torch.equal(first, view(1, 2))
    assert first.std() > 0.1  # a real picture, not a constant


def test_a_steps_augmentation_depends_on_the_epoch_and_step_only():
    encoded = photos(6)
    steps = [np.array([0, 1, 2]), np.array([3, 4, 5])]

    def item(epoch: int, index: int) -> torch.Tensor:
        return StepDataset(encoded, steps, PREP, True, 3, epoch)[index][0]

    assert torch.equal(item(0, 1), item(0, 1))
    assert not torch.equal(item(0, 1), item(1, 1))
    plain = StepDataset(encoded, steps, PREP, False, 3, 0)[1][0]
    assert not torch.equal(item(0, 1), plain)
