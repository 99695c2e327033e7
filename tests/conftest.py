"""Shared fixtures: small real photos from ../shared/datasets/food10 and Pillow-made images."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from siamese_cv.core.cache import CACHE_ENV

ROOT = Path(__file__).resolve().parents[1]
FOOD10 = Path(os.environ.get("SIAMESE_CV_FOOD10", ROOT.parent / "shared" / "datasets" / "food10"))


def food10_photos(split: str, per_class: int, classes: int = 3) -> dict[str, list[Path]]:
    """The first `per_class` photos (sorted) of the first `classes` classes of a food10 split."""
    if not (FOOD10 / split).is_dir():
        pytest.skip(f"food10 not found at {FOOD10}")
    names = sorted(p.name for p in (FOOD10 / split).iterdir() if p.is_dir())[:classes]
    return {n: sorted((FOOD10 / split / n).glob("*.jpg"))[:per_class] for n in names}


@pytest.fixture
def make_folder(tmp_path: Path):
    """Build an ImageFolder source of real food10 photos: {train,test}/<class>/*.jpg (symlinks)."""

    def build(train: int = 6, test: int = 3, classes: int = 3, val: int = 0) -> Path:
        root = tmp_path / "photos"
        layout = {
            "train": food10_photos("train", train + val, classes),
            "test": food10_photos("test", test, classes),
        }
        for split, by_class in layout.items():
            for name, files in by_class.items():
                for i, src in enumerate(files):
                    target_split = "val" if split == "train" and i >= train else split
                    dst = root / target_split / name / src.name
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    os.symlink(src, dst)
        return root

    return build


def unit_rows(rows: np.ndarray) -> np.ndarray:
    """`rows` scaled to length 1, float32: descriptors as the embedder returns them."""
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def solid_image(color: tuple[int, int, int], size: tuple[int, int] = (32, 32)) -> Image.Image:
    return Image.new("RGB", size, color)


@pytest.fixture(autouse=True, scope="session")
def _a_fresh_onnx_cache(tmp_path_factory):
    """Tests never read or fill the user's ~/.cache/siamese-cv; their ONNX exports share one."""
    before = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(tmp_path_factory.mktemp("siamese-cv-cache"))
    yield
    if before is None:
        os.environ.pop(CACHE_ENV)
    else:
        os.environ[CACHE_ENV] = before
