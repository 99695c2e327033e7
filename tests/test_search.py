import numpy as np

from siamese_cv.search import top_k


def test_top_k_matches_a_full_sort():
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(500, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    queries = vectors[:7] + 0.01
    index, score = top_k(vectors, queries, 10)
    full = np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :10]
    assert np.array_equal(index, full)
    assert np.all(np.diff(score, axis=1) <= 0)
    assert np.array_equal(index[:, 0], np.arange(7))


def test_top_k_larger_than_gallery_returns_everything_sorted():
    vectors = np.eye(3, dtype=np.float32)
    index, score = top_k(vectors, np.array([0.1, 0.9, 0.3], np.float32), 10)
    assert index.tolist() == [[1, 2, 0]]
