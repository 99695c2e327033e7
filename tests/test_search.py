import json

import numpy as np
import pytest
from conftest import food10_photos

from siamese_cv.retrieval.index import top_k
from siamese_cv.retrieval.search import main


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


def test_search_engine_onnxruntime_finds_what_torch_finds(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import torch

    from siamese_cv.data.images import load_rgb
    from siamese_cv.inference.embedder import Embedder
    from siamese_cv.inference.hardware import resolve_precision
    from siamese_cv.models.siamese import Preprocessing, build_model, save_checkpoint
    from siamese_cv.retrieval.gallery import gallery_table, write_gallery

    files = [f for group in food10_photos("train", 4, 3).values() for f in group]
    torch.manual_seed(0)
    model, backbone = build_model("tiny", "seed", 16)
    prep = Preprocessing(64, "stretch", backbone.mean, backbone.std)
    config = {"backbone": "tiny", "head": "seed", "embedding_dim": 16}
    fingerprint = save_checkpoint(model, config | {"preprocessing": prep.to_dict()}, tmp_path)
    images = [load_rgb(f, prep.image_size, prep.resize) for f in files]
    fp32 = resolve_precision("fp32", torch.device("cpu"))
    vectors = Embedder(model, prep, fp32).embed_images(images)
    names = [f.parent.name for f in files]
    table = gallery_table(
        [f.name for f in files], ["train"] * len(files), [0] * len(files), names, vectors
    )
    write_gallery(tmp_path / "gallery", table, {"model_fingerprint": fingerprint})

    def hits(engine: str) -> list[dict]:
        argv = [str(files[0]), "--top", "5", "--json", "--engine", engine, "--model", str(tmp_path)]
        argv += ["--gallery", str(tmp_path / "gallery"), "--index-dir", str(tmp_path / "none")]
        assert main(argv) == 0
        return json.loads(capsys.readouterr().out)

    torch_hits, ort_hits = hits("torch"), hits("onnxruntime")
    assert [h["id"] for h in ort_hits] == [h["id"] for h in torch_hits]
    assert ort_hits[0]["id"] == files[0].name
    # torch runs at auto precision (bf16 where the CPU is fast at it): scores agree to rounding
    assert np.allclose([h["score"] for h in ort_hits], [h["score"] for h in torch_hits], atol=1e-3)
