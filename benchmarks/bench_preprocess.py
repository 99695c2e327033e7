"""Preprocessing throughput: the preprocess stage's code against the original's PIL loop.

Project: `preprocess_splits` over a raw parquet of N food10 photos, on every core (the stage's
default), writing processed parquet. Baseline: one process opening each file with PIL,
converting to RGB, resizing to 244x244 and saving a JPEG at quality 95, as the original did.
Both read the same photos; the raw parquet is built (and the files read once, so both sides
find them in the page cache) before either clock starts.

Run: python benchmarks/bench_preprocess.py [--quick] [--images N]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from _common import Row, food10_files, print_table
from PIL import Image

from siamese_cv.config.params import SPLITS, PreprocessParams
from siamese_cv.data.parquet import RAW_SCHEMA, write_splits
from siamese_cv.data.preprocessing import available_cores, preprocess_splits
from siamese_cv.data.sources import open_source


def link_folder(files: list[tuple[str, str, Path]], root: Path) -> Path:
    """An image-folder source (split/class/file symlinks) holding exactly `files`."""
    for split, label, path in files:
        target = root / split / label / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(path, target)
    return root


def build_raw(folder: Path, raw_dir: Path) -> int:
    """data/raw for `folder`, as stages/download.py writes it; returns the image count."""
    _, records = open_source(str(folder), val_fraction=0.1, seed=42, retries=0, base_dir=folder)
    rows = (r.row() for r in records)
    raw_dir.mkdir()
    return sum(write_splits(raw_dir, RAW_SCHEMA, rows, 256, SPLITS).values())


def pil_loop(files: list[tuple[str, str, Path]], out_dir: Path, size: int) -> None:
    """The original's preprocessing: one image at a time, in one process."""
    out_dir.mkdir()
    for i, (_, _, path) in enumerate(files):
        img = Image.open(path).convert("RGB").resize((size, size))
        img.save(out_dir / f"{i}.jpg", "JPEG", quality=95)


def run_project(raw_dir: Path, out_dir: Path, params: PreprocessParams) -> tuple[float, int]:
    start = time.perf_counter()
    report = preprocess_splits(raw_dir, out_dir, params)
    return time.perf_counter() - start, report["kept"]["total"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="200 images instead of 1000")
    parser.add_argument("--images", type=int, help="how many food10 photos (default 1000)")
    args = parser.parse_args(argv)
    n = args.images or (200 if args.quick else 1000)
    files = food10_files(n)
    params = PreprocessParams()  # the stage's defaults: 244 px, stretch, JPEG q95, every core
    with tempfile.TemporaryDirectory(prefix="bench-preprocess-") as tmp_name:
        tmp = Path(tmp_name)
        images = build_raw(link_folder(files, tmp / "photos"), tmp / "raw")
        for _, _, path in files:  # warm the page cache for the baseline's reads too
            path.read_bytes()
        project_s, kept = run_project(tmp / "raw", tmp / "processed", params)
        single = params.model_copy(update={"workers": 1})
        one_s, _ = run_project(tmp / "raw", tmp / "processed-1", single)
        start = time.perf_counter()
        pil_loop(files, tmp / "pil", params.image_size)
        baseline_s = time.perf_counter() - start
    cores = available_cores()
    sides = sorted(min(Image.open(path).size) for _, _, path in files)
    rows = [
        Row(f"preprocess_splits, {cores} workers", kept / project_s, n / baseline_s, "images/s"),
        Row("preprocess_splits, 1 worker", kept / one_s, n / baseline_s, "images/s"),
    ]
    title = f"bench_preprocess: {n} food10 photos -> {params.image_size} px JPEG q{params.quality}"
    print_table(
        title,
        rows,
        [
            "baseline: one process, PIL open + convert RGB + resize + save JPEG q95, file by file",
            "project: raw parquet -> processed parquet; safe decode (EXIF, reduced-size JPEG decode "
            f"when the shorter side is >= {2 * params.image_size} px), BICUBIC resize, "
            "metadata-free JPEG",
            f"source photos: shorter side median {sides[len(sides) // 2]} px, max {sides[-1]} px",
            f"kept {kept} of {images} images; building the raw parquet is not timed",
        ],
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
