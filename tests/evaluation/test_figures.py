"""Evaluation figures: each writes a readable PNG atomically on small synthetic data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from siamese_cv.evaluation.figures import confusion_figure, embedding_map, triplet_figure
from siamese_cv.retrieval.grid import search_grid

CLASSES = ["circle", "square", "a rather long class name that must be shortened"]
COLOURS = [(220, 60, 60), (60, 120, 220), (40, 170, 90)]


def shape_image(cls: int, seed: int, size: int = 96) -> Image.Image:
    """A coloured shape on a noisy background: distinguishable classes without any data files."""
    rng = np.random.default_rng(seed)
    noise = rng.integers(200, 255, size=(size, size, 3), dtype=np.uint8)
    img = Image.fromarray(noise, "RGB")
    draw = ImageDraw.Draw(img)
    off = int(rng.integers(5, 20))
    box = (off, off, size - off, size - off)
    if cls == 0:
        draw.ellipse(box, fill=COLOURS[0])
    elif cls == 1:
        draw.rectangle(box, fill=COLOURS[1])
    else:
        draw.polygon(
            [(size // 2, off), (off, size - off), (size - off, size - off)], fill=COLOURS[2]
        )
    return img


def check_png(path: Path, min_px: int = 200) -> None:
    assert path.is_file() and path.stat().st_size > 5_000
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert min(img.size) >= min_px, img.size
    leftovers = [p.name for p in path.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == [], leftovers


def triplet_rows() -> list[dict]:
    return [
        {
            "anchor": shape_image(0, 1),
            "positive": shape_image(0, 2),
            "negative": shape_image(1, 3),
            "sim_pos": 0.873,
            "sim_neg": 0.214,
            "labels": (CLASSES[0], CLASSES[0], CLASSES[1]),
        },
        {
            "anchor": shape_image(2, 4),
            "positive": shape_image(2, 5, size=140),
            "negative": shape_image(1, 6, size=64),
            "sim_pos": 0.301,
            "sim_neg": 0.655,
            "labels": (CLASSES[2], CLASSES[2], CLASSES[1]),
        },
    ]


def search_results(n: int) -> list[dict]:
    return [
        {"image": shape_image(i % 3, 10 + i), "label": CLASSES[i % 3], "score": 0.95 - 0.04 * i}
        for i in range(n)
    ]


def clustered(n_per_class: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(3), n_per_class)
    emb = rng.normal(size=(3, 16))[labels] * 3 + rng.normal(size=(len(labels), 16))
    return (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32), labels


def test_triplet_figure(tmp_path):
    out = triplet_figure(triplet_rows(), tmp_path / "sub" / "triplets.png", "Seeded test triplets")
    assert out == tmp_path / "sub" / "triplets.png"
    check_png(out)


def test_search_grid_two_rows(tmp_path):
    out = search_grid(
        shape_image(0, 99), CLASSES[0], search_results(8), tmp_path / "search.png", "Search"
    )
    check_png(out)


def test_embedding_map(tmp_path):
    emb, labels = clustered(20)
    check_png(embedding_map(emb, labels, CLASSES, tmp_path / "map.png", "Test embeddings"))


def test_embedding_map_subsamples_large_sets(tmp_path, monkeypatch):
    import siamese_cv.evaluation.figures as figures

    monkeypatch.setattr(figures, "TSNE_MAX_POINTS", 40)
    emb, labels = clustered(30)
    check_png(figures.embedding_map(emb, labels, CLASSES, tmp_path / "map.png", "Subsampled"))


def test_confusion_figure(tmp_path):
    matrix = np.array([[18, 2, 0], [3, 15, 2], [0, 0, 0]])  # an empty row must not divide by 0
    check_png(confusion_figure(matrix, CLASSES, tmp_path / "confusion.png", "Nearest neighbour"))


def test_overwrites_existing_png_atomically(tmp_path):
    target = tmp_path / "confusion.png"
    target.write_bytes(b"stale")
    confusion_figure(np.eye(3, dtype=int) * 5, CLASSES, target, "Again")
    check_png(target)


def test_empty_inputs_say_what_is_missing(tmp_path):
    with pytest.raises(ValueError, match="no triplets"):
        triplet_figure([], tmp_path / "t.png", "x")
    with pytest.raises(ValueError, match="no search results"):
        search_grid(shape_image(0, 0), "a", [], tmp_path / "s.png", "x")
    with pytest.raises(ValueError, match="3 class names"):
        confusion_figure(np.zeros((2, 2)), CLASSES, tmp_path / "m.png", "x")
    assert list(tmp_path.iterdir()) == []
