"""The copy-detection queries as the copy descriptor sees them, stored once by copy_gallery.

The descriptor is the frozen pretrained network, so its vectors of the seeded edited copies and
of the test photos (the queries with no copy) do not change when a training parameter does:
copy_gallery writes them beside the copy gallery (`test_copies.npy`, `test_photos.npy`, and
which photos they are in meta.json), and evaluate reads them, memory-mapped, instead of
embedding them again after every training edit. Where they are missing or of other photos,
evaluate embeds them itself, as copy_gallery would.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from siamese_cv.core import paths
from siamese_cv.data.parquet import read_table
from siamese_cv.evaluation.copy_detection import embed_copies
from siamese_cv.evaluation.copy_edits import Copy
from siamese_cv.inference.embedder import Embedder
from siamese_cv.inference.prefix_maps import TailEmbedder, from_maps_or_images, ids_digest

log = logging.getLogger(__name__)

COPIES_FILE = "test_copies.npy"
PHOTOS_FILE = "test_photos.npy"
META_KEY = "test_queries"  # in data/copies/meta.json: which photos the two files describe


def queries_about(gallery_ids: list[str], test_ids: str, copies_params: Any) -> dict:
    """Which photos the stored queries are: the gallery's ids, the test split's (`ids_digest`),
    the copies' count and seed."""
    return {
        "gallery_ids": ids_digest(gallery_ids),
        "test_ids": test_ids,
        "queries": copies_params.queries,
        "seed": copies_params.seed,
    }


def describe_queries(
    copies: list[Copy],
    about: dict,
    frozen: TailEmbedder | None,
    describer: Callable[[], Embedder],
    name: str,
) -> tuple[np.ndarray, np.ndarray]:
    """(the copies' descriptors, the test photos'), from the stored prefix maps where they
    apply, else from the images."""
    maps_about = {k: about[k] for k in ("gallery_ids", "queries", "seed")}
    described = from_maps_or_images(
        frozen,
        "copies",
        maps_about,
        name,
        lambda: embed_copies(describer(), copies, f"{name}: copies"),
    )
    photos = from_maps_or_images(
        frozen,
        "test",
        {"ids": about["test_ids"]},
        name,
        lambda: describer().embed_parquet(paths.PROCESSED / "test.parquet", f"{name}: test"),
    )
    return described, photos


def query_arrays(described: np.ndarray, photos: np.ndarray) -> dict[str, np.ndarray]:
    """The files copy_gallery writes beside the copy gallery."""
    return {COPIES_FILE: described, PHOTOS_FILE: photos}


def stored_queries(
    directory: Path, meta: dict, about: dict
) -> tuple[np.ndarray, np.ndarray] | None:
    """The stored descriptors when they are of these photos (`about`), else None (and why)."""
    if meta.get(META_KEY) != about:
        why = "none stored" if META_KEY not in meta else "they are of other photos or copies"
        log.info("evaluate: embedding the copy queries with the copy descriptor (%s)", why)
        return None
    log.info("evaluate: the copy queries' descriptors stored by copy_gallery in %s", directory)
    load = functools.partial(np.load, allow_pickle=False)
    return load(directory / COPIES_FILE), load(directory / PHOTOS_FILE)


def gallery_images(ids: list[str], splits: list[str]) -> list[bytes]:
    """The processed images of a gallery's rows (`ids`, from `splits`), in gallery order."""
    images: dict[str, bytes] = {}
    for split in dict.fromkeys(splits):
        table = read_table(paths.PROCESSED / f"{split}.parquet", ["id", "image"])
        images.update(
            zip(table.column("id").to_pylist(), table.column("image").to_pylist(), strict=True)
        )
    return [images[i] for i in ids]
