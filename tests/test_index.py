import numpy as np
import pytest

from siamese_cv.retrieval.index import build_index, default_nlist

pytest.importorskip("faiss")


def clustered(n: int, dim: int, centres: int, seed: int) -> np.ndarray:
    """Normalised vectors around `centres` random directions, like class-clustered embeddings."""
    rng = np.random.default_rng(seed)
    centre = rng.normal(size=(centres, dim)).astype(np.float32)
    noise = rng.normal(scale=0.5 / np.sqrt(dim), size=(n, dim)).astype(np.float32)
    vectors = centre[rng.integers(0, centres, n)] / np.sqrt(dim) + noise
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def gallery() -> np.ndarray:
    return clustered(20_000, 64, 200, seed=0)


@pytest.fixture(scope="module")
def queries(gallery: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(1)
    picked = gallery[rng.choice(len(gallery), 100, replace=False)]
    return picked + rng.normal(scale=0.05, size=picked.shape).astype(np.float32)


@pytest.fixture(scope="module")
def ivf(gallery: np.ndarray):
    return build_index(gallery, "ivf", seed=0)


def test_exact_matches_brute_force(gallery: np.ndarray, queries: np.ndarray):
    ids, scores = build_index(gallery[:3000]).search(queries, 10)
    unit = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    full = unit @ gallery[:3000].T
    want = np.argsort(-full, axis=1, kind="stable")[:, :10]
    assert np.array_equal(ids, want)
    assert np.allclose(scores, np.take_along_axis(full, want, axis=1), atol=1e-5)


def test_ivf_recall_at_10_against_exact(gallery: np.ndarray, queries: np.ndarray, ivf):
    assert ivf.nlist == default_nlist(len(gallery))
    exact, _ = build_index(gallery).search(queries, 10)
    approx, scores = ivf.search(queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact, approx, strict=True)])
    assert recall >= 0.95
    assert np.all(np.diff(scores, axis=1) <= 1e-6)


@pytest.mark.parametrize("kind", ["exact", "ivf"])
def test_k_larger_than_the_gallery_gives_every_vector_and_no_minus_one(kind: str):
    vectors = clustered(50, 16, 5, seed=2)
    index = build_index(vectors, kind, seed=0)
    kwargs = {"nprobe": 1} if kind == "ivf" else {}  # one list holds far fewer than 50
    ids, scores = index.search(vectors[:3], 80, **kwargs)
    assert ids.shape == scores.shape == (3, 50)
    assert (ids >= 0).all()
    assert all(sorted(row) == list(range(50)) for row in ids.tolist())


def test_ivf_fills_short_rows_with_real_hits(ivf, queries: np.ndarray):
    ids, _ = ivf.search(queries[:5], 500, nprobe=1)
    assert ids.shape == (5, 500)
    assert (ids >= 0).all()
    assert all(len(set(row)) == 500 for row in ids.tolist())


def test_nprobe_per_call_does_not_leak_into_later_calls(ivf, queries: np.ndarray):
    before = ivf.search(queries, 10)
    narrow = ivf.search(queries, 10, nprobe=1)
    after_narrow = ivf.search(queries, 10)
    ivf.search(queries, 10, nprobe=ivf.nlist)
    after_wide = ivf.search(queries, 10)
    assert not np.array_equal(narrow[0], before[0])  # the per-call nprobe did take effect
    for after in (after_narrow, after_wide):
        assert np.array_equal(before[0], after[0])
        assert np.array_equal(before[1], after[1])
    assert ivf.faiss_index.nprobe == 1  # FAISS's own field was never set


def test_bad_arguments_say_what_to_do(gallery: np.ndarray):
    with pytest.raises(ValueError, match="exact, ivf"):
        build_index(gallery[:10], "hnsw")
    with pytest.raises(ValueError, match="kind='ivf'"):
        build_index(gallery[:10]).search(gallery[:1], 5, nprobe=4)
    with pytest.raises(ValueError, match="dimension"):
        build_index(gallery[:10]).search(np.ones(8, np.float32), 5)
    with pytest.raises(ValueError, match="export a gallery"):
        build_index(np.zeros((0, 64), np.float32))


def test_ivf_survives_faiss_torch_utils_patching():
    """pytorch-metric-learning imports faiss.contrib.torch_utils, which patches Index.search."""
    import faiss.contrib.torch_utils  # noqa: F401

    from siamese_cv.retrieval.index import build_index

    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(500, 16)).astype(np.float32)
    index = build_index(vectors, "ivf", nlist=8)
    ids, _ = index.search(vectors[:3], 5, nprobe=8)
    assert ids[:, 0].tolist() == [0, 1, 2]


def test_a_saved_ivf_index_loads_and_searches_exactly_as_built(tmp_path, gallery, queries, ivf):
    from siamese_cv.retrieval.index import IVF_FILE, load_index, save_index

    meta = save_index(ivf, tmp_path / "index", gallery)
    assert meta["kind"] == "ivf" and meta["ntotal"] == len(gallery)
    assert (tmp_path / "index" / IVF_FILE).stat().st_size > 0
    loaded = load_index(tmp_path / "index", gallery)
    assert loaded.kind == "ivf" and loaded.nlist == ivf.nlist
    assert loaded.default_nprobe == ivf.default_nprobe
    for got, want in zip(loaded.search(queries, 10), ivf.search(queries, 10), strict=True):
        assert np.array_equal(got, want)


def test_a_saved_index_refuses_another_gallery_and_is_absent_when_never_saved(tmp_path, gallery):
    from siamese_cv.core.errors import UserError
    from siamese_cv.retrieval.index import load_index, save_index

    assert load_index(tmp_path / "nothing", gallery) is None
    save_index(build_index(gallery[:500]), tmp_path / "index", gallery[:500])
    assert load_index(tmp_path / "index", gallery[:500]).kind == "exact"
    changed = gallery[:500].copy()
    changed[0] = changed[1]
    with pytest.raises(UserError, match="another gallery.*dvc repro index_gallery"):
        load_index(tmp_path / "index", changed)


def test_ivf_comes_from_its_factory_string_and_equals_the_hand_built_index(tmp_path):
    """`IVF<n>,SQ8` with inner product is byte for byte the IVF-SQ8 index once built by hand."""
    import faiss

    from siamese_cv.retrieval.index import save_index

    vectors = clustered(2000, 32, 20, seed=3)
    built = build_index(vectors, "ivf", nlist=16, seed=5)
    by_hand = faiss.IndexIVFScalarQuantizer(
        faiss.IndexFlatIP(32), 32, 16, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT
    )
    by_hand.cp.seed = 5
    by_hand.cp.min_points_per_centroid = 1
    by_hand.cp.max_points_per_centroid = 40
    by_hand.train(vectors[np.sort(np.random.default_rng(5).choice(2000, 640, replace=False))])
    by_hand.add(vectors)
    assert np.array_equal(faiss.serialize_index(built.faiss_index), faiss.serialize_index(by_hand))
    assert save_index(built, tmp_path / "index", vectors)["factory"] == "IVF16,SQ8"


def test_an_index_saved_before_the_factory_string_was_recorded_still_loads(tmp_path, gallery, ivf):
    import json

    from siamese_cv.retrieval.index import INDEX_META, load_index, save_index

    save_index(ivf, tmp_path / "index", gallery)
    meta_path = tmp_path / "index" / INDEX_META
    meta = json.loads(meta_path.read_text())
    del meta["factory"]
    meta_path.write_text(json.dumps(meta))
    loaded = load_index(tmp_path / "index", gallery)
    probe = gallery[:20]
    for got, want in zip(loaded.search(probe, 5), ivf.search(probe, 5), strict=True):
        assert np.array_equal(got, want)
