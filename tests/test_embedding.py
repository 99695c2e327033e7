"""The shared embedder on real photos with the real ImageNet Lite2: bf16 guard, order, overlap."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import food10_photos

from siamese_cv.embedding import Embedder, decode_batch
from siamese_cv.hardware import cpu_has_fast_bf16, resolve_precision
from siamese_cv.models.backbones import get_backbone_spec
from siamese_cv.models.siamese import Preprocessing

PREP = Preprocessing(244, "stretch", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


@pytest.fixture(scope="module")
def lite2() -> torch.nn.Module:
    spec = get_backbone_spec("efficientnet_lite2")
    backbone = spec.build()
    backbone.module.load_state_dict(spec.fetch_imagenet())
    return backbone.module


@pytest.fixture(scope="module")
def photos() -> list[bytes]:
    from siamese_cv.data.images import prepare_image

    files = [f for group in food10_photos("test", 6, 3).values() for f in group]
    return [prepare_image(f.read_bytes(), PREP.image_size, "stretch", "jpeg", 95) for f in files]


def test_embed_batches_keeps_order_whatever_the_batch_size(lite2, photos):
    fp32 = resolve_precision("fp32", torch.device("cpu"))
    one_by_one = np.concatenate(
        [Embedder(lite2, PREP, fp32).embed_tensor(decode_batch([p], PREP)) for p in photos]
    )
    overlapped = Embedder(lite2, PREP, fp32, batch_size=5).embed_encoded(photos)
    assert overlapped.shape == (len(photos), 1280)
    assert np.allclose(np.linalg.norm(overlapped, axis=1), 1.0, atol=1e-5)
    # the same images in the same rows (batching changes float rounding only)
    assert np.min(np.sum(overlapped * one_by_one, axis=1)) > 0.9999


@pytest.mark.skipif(not cpu_has_fast_bf16(), reason="this CPU has no fast bf16 (AMX/AVX512-BF16)")
def test_bf16_embeddings_stay_within_the_cosine_guard_of_fp32(lite2, photos):
    device = torch.device("cpu")
    fp32 = Embedder(lite2, PREP, resolve_precision("fp32", device)).embed_encoded(photos)
    auto = resolve_precision("auto", device)
    assert auto.dtype is torch.bfloat16 and auto.channels_last
    bf16 = Embedder(lite2, PREP, auto).embed_encoded(photos)
    cosines = np.sum(fp32 * bf16, axis=1)
    assert cosines.min() > 0.99, cosines
    # and the ranking it induces is the same: each photo's nearest other photo agrees
    nearest = lambda e: np.argsort(-(e @ e.T), axis=1)[:, 1]  # noqa: E731
    assert np.mean(nearest(fp32) == nearest(bf16)) >= 0.9
