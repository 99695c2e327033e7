"""Evaluation figures: each writes a readable PNG atomically on small synthetic data."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
from PIL import Image, ImageDraw
from scipy import ndimage

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


def check_png(path: Path, panels: int | None, min_px: int = 200) -> np.ndarray:
    """A complete PNG with something drawn: not one flat colour, and `panels` filled pictures
    (None: no filled picture to count, as in a scatter plot). Returns its RGB pixels."""
    assert path.is_file() and path.stat().st_size > 5_000
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert min(img.size) >= min_px, img.size
        pixels = np.asarray(img.convert("RGB")).astype(np.float64)
    assert pixels.std() > 10, "the picture is (nearly) one flat colour"
    if panels is not None:
        assert len(filled_panels(pixels)) == panels, filled_panels(pixels)
    leftovers = [p.name for p in path.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == [], leftovers
    return pixels


def filled_panels(pixels: np.ndarray, min_share: float = 0.005) -> list[tuple[int, int, int, int]]:
    """The (top, left, height, width) of each filled, non-white region (a photo, a matrix, a
    colour bar) covering at least `min_share` of the picture; text, lines and frames are not."""
    ink = (pixels < 245).any(axis=2)
    regions, _ = ndimage.label(ink)
    found = []
    for number, box in enumerate(ndimage.find_objects(regions), start=1):
        height, width = box[0].stop - box[0].start, box[1].stop - box[1].start
        area = int((regions[box] == number).sum())
        if area >= min_share * ink.size and area > 0.5 * height * width:
            found.append((box[0].start, box[1].start, height, width))
    return found


def dots_of(pixels: np.ndarray, colour: tuple[float, ...], alpha: float) -> int:
    """How many separate dots of `colour` (RGB in 0..1, drawn with `alpha` on white) there are."""
    shade = np.array(colour[:3]) * 255 * alpha + 255 * (1 - alpha)
    return ndimage.label(np.abs(pixels - shade).max(axis=2) < 12)[1]


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
    check_png(out, panels=2 * 3)  # anchor, positive, negative per row


def test_search_grid_two_rows(tmp_path):
    out = search_grid(
        shape_image(0, 99), CLASSES[0], search_results(8), tmp_path / "search.png", "Search"
    )
    check_png(out, panels=1 + 8)  # the query and its results
    few = search_grid(shape_image(0, 9), CLASSES[0], search_results(3), tmp_path / "3.png", "S")
    check_png(few, panels=1 + 3)


def test_embedding_map(tmp_path):
    emb, labels = clustered(20)
    pixels = check_png(
        embedding_map(emb, labels, CLASSES, tmp_path / "map.png", "Test embeddings"), panels=None
    )
    tab10 = plt.get_cmap("tab10")
    # each class's 20 points (and its legend marker) in its own colour; overlaps merge a few
    assert all(dots_of(pixels, tab10(c), 0.8) >= 12 for c in range(3))
    assert dots_of(pixels, tab10(3), 0.8) == 0  # no fourth class


def test_embedding_map_subsamples_large_sets(tmp_path, monkeypatch):
    import siamese_cv.evaluation.figures as figures

    monkeypatch.setattr(figures, "TSNE_MAX_POINTS", 40)
    emb, labels = clustered(30)
    out = figures.embedding_map(emb, labels, CLASSES, tmp_path / "map.png", "Subsampled")
    pixels = check_png(out, panels=None)
    dots = [dots_of(pixels, plt.get_cmap("tab10")(c), 0.8) for c in range(3)]
    assert 3 <= sum(dots) <= 40 + 3, dots  # the 40 sampled points, not all 90, and the legend


def test_confusion_figure(tmp_path):
    matrix = np.array([[18, 2, 0], [3, 15, 2], [0, 0, 0]])  # an empty row must not divide by 0
    out = confusion_figure(matrix, CLASSES, tmp_path / "confusion.png", "Nearest neighbour")
    check_png(out, panels=2)  # the matrix and its colour bar


def test_overwrites_existing_png_atomically(tmp_path):
    target = tmp_path / "confusion.png"
    target.write_bytes(b"stale")
    confusion_figure(np.eye(3, dtype=int) * 5, CLASSES, target, "Again")
    check_png(target, panels=2)


def test_check_png_refuses_a_figure_with_nothing_drawn(tmp_path):
    """The frames, titles and captions of a triplet figure without its photos are not one."""
    fig, axes = plt.subplots(2, 3, figsize=(7.5, 6.2))
    fig.suptitle("Seeded test triplets\n1 of 2 triplets correct")
    for ax in axes.flat:
        ax.set_title("anchor\ncircle")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.savefig(tmp_path / "frames.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    with pytest.raises(AssertionError, match="assert 0 == 6"):
        check_png(tmp_path / "frames.png", panels=6)
    Image.new("RGB", (800, 600), "white").save(tmp_path / "white.png", compress_level=0)
    with pytest.raises(AssertionError, match="one flat colour"):
        check_png(tmp_path / "white.png", panels=None)


def test_empty_inputs_say_what_is_missing(tmp_path):
    with pytest.raises(ValueError, match="no triplets"):
        triplet_figure([], tmp_path / "t.png", "x")
    with pytest.raises(ValueError, match="no search results"):
        search_grid(shape_image(0, 0), "a", [], tmp_path / "s.png", "x")
    with pytest.raises(ValueError, match="3 class names"):
        confusion_figure(np.zeros((2, 2)), CLASSES, tmp_path / "m.png", "x")
    assert list(tmp_path.iterdir()) == []
