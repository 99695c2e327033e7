"""PCA whitening of the copy descriptor: fitted on the gallery, stored, applied as a head."""

from __future__ import annotations

import logging

import numpy as np
import torch
from conftest import unit_rows

from siamese_cv.retrieval.gallery import gallery_table, write_gallery
from siamese_cv.retrieval.whitening import (
    PROJECTION_FILE,
    SHRINKAGE,
    fit_whitening,
    load_whitening,
)


def _photos(n: int, dim: int = 16, seed: int = 0) -> np.ndarray:
    """Descriptors that share one strong direction (what every photo has) plus detail."""
    rng = np.random.default_rng(seed)
    shared = np.zeros(dim)
    shared[0] = 5.0
    return unit_rows(shared + rng.normal(size=(n, dim)) * np.linspace(2.0, 0.2, dim))


def test_whitened_gallery_has_equal_spread_in_every_kept_direction():
    vectors = _photos(400)
    whitening = fit_whitening(vectors, 8, "test")
    assert whitening is not None and whitening.dims == 8
    with torch.inference_mode():
        out = whitening(torch.from_numpy(vectors)).double().numpy()
    assert np.allclose(out.mean(axis=0), 0.0, atol=1e-6)
    # each direction's variance, shrunk by SHRINKAGE of the mean: all equal before shrinking
    variances = out.var(axis=0)
    assert variances.max() / variances.min() < 1 + 10 * SHRINKAGE
    cov = np.cov(out.T, bias=True)
    assert np.abs(cov - np.diag(np.diag(cov))).max() < 1e-6  # decorrelated


def test_a_near_copy_stands_further_above_other_photos_once_whitened():
    vectors = _photos(400)
    whitening = fit_whitening(vectors, 12, "test")
    rng = np.random.default_rng(1)
    copy = unit_rows(vectors[5:6] + 0.05 * rng.normal(size=(1, vectors.shape[1])))
    before = (copy @ vectors.T)[0]
    after = (whitening.apply(copy) @ whitening.apply(vectors).T)[0]
    assert before.argmax() == after.argmax() == 5
    gap = lambda s: s[5] - np.delete(s, 5).max()  # noqa: E731
    assert gap(after) > 2 * gap(before)  # the shared direction no longer crowds the others


def test_apply_on_stored_vectors_equals_the_head_on_pooled_features():
    vectors = _photos(200)
    whitening = fit_whitening(vectors, 6, "test")
    pooled = torch.from_numpy(vectors) * 3.7  # the embedder normalises: scale must not matter
    with torch.inference_mode():
        head = torch.nn.functional.normalize(whitening(pooled), dim=1).numpy()
    assert np.allclose(whitening.apply(vectors), head, atol=1e-6)
    assert np.allclose(np.linalg.norm(head, axis=1), 1.0, atol=1e-6)


def test_too_few_photos_or_zero_dims_leave_the_descriptor_unwhitened(caplog):
    with caplog.at_level(logging.INFO):
        assert fit_whitening(_photos(15), 8, "copy_gallery") is None
    assert "15 photos are too few to whiten the copy descriptor to 8 dims (16 needed)" in (
        caplog.text
    )
    assert "lower copies.whitening" in caplog.text
    assert fit_whitening(_photos(100), 0, "copy_gallery") is None
    assert fit_whitening(_photos(100), 64, "x").dims == 16  # never more than the descriptor has


def test_stored_whitening_loads_back_the_same_and_none_where_there_is_none(tmp_path):
    vectors = _photos(100)
    whitening = fit_whitening(vectors, 5, "test")
    table = gallery_table(
        [f"p{i}" for i in range(100)], ["train"] * 100, [0] * 100, ["a"] * 100, vectors
    )
    write_gallery(tmp_path / "copies", table, {"count": 100}, whitening.arrays())
    loaded = load_whitening(tmp_path / "copies")
    assert np.allclose(loaded.apply(vectors), whitening.apply(vectors), atol=1e-7)
    (tmp_path / "copies" / PROJECTION_FILE).unlink()
    assert load_whitening(tmp_path / "copies") is None
