"""Reverse image search: embed a query photo, rank the gallery by cosine similarity.

`siamese-search QUERY_IMAGE [--top 20] [--json] [--grid out.png]` is the original notebook's
search, but vectorised: one matrix product and a partial sort instead of a Python loop.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from siamese_cv import paths
from siamese_cv.errors import UserError, run_cli
from siamese_cv.gallery import Gallery, load_gallery


@dataclass(frozen=True)
class Hit:
    rank: int
    id: str
    label_name: str
    score: float


def top_k(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine top-k of each query row against normalised `vectors`.

    Returns:
        (indices [q, k'], scores [q, k']) best first, k' = min(k, len(vectors)); ties by index.
    """
    queries = np.atleast_2d(queries).astype(np.float32, copy=False)
    k = min(k, len(vectors))
    scores = queries @ vectors.T
    if k < len(vectors):
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    else:
        part = np.tile(np.arange(len(vectors)), (len(queries), 1))
    part_scores = np.take_along_axis(scores, part, axis=1)
    order = np.lexsort((part, -part_scores), axis=1)
    best = np.take_along_axis(part, order, axis=1)
    return best, np.take_along_axis(scores, best, axis=1)


def search_gallery(gallery: Gallery, query_vector: np.ndarray, k: int) -> list[Hit]:
    index, score = top_k(gallery.vectors, query_vector, k)
    return [Hit(r + 1, gallery.ids[i], gallery.label_names[i], float(s))
            for r, (i, s) in enumerate(zip(index[0], score[0], strict=True))]


def embed_query(path: Path, model_dir: Path, gallery: Gallery) -> np.ndarray:
    """Embed one photo with the trained model, exactly as the gallery was embedded."""
    from siamese_cv.data.images import ImageError, load_rgb
    from siamese_cv.embedding import Embedder
    from siamese_cv.hardware import resolve_device, resolve_precision
    from siamese_cv.models.siamese import Preprocessing, load_checkpoint

    model, config = load_checkpoint(model_dir)
    if config["fingerprint"] != gallery.meta.get("model_fingerprint"):
        raise UserError(f"the gallery was built with another model than {model_dir}; "
                        "run `dvc repro export_gallery`")
    prep = Preprocessing.from_dict(config["preprocessing"])
    try:
        image = load_rgb(path, prep.image_size, prep.resize)
    except (ImageError, OSError) as error:
        raise UserError(f"{path}: cannot read the query image ({error})") from None
    precision = resolve_precision("auto", resolve_device("auto"))
    return Embedder(model, prep, precision, batch_size=1).embed_images([image])


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="siamese-search", description=__doc__.splitlines()[0])
    parser.add_argument("query", type=Path, help="the photo to search for")
    parser.add_argument("--top", type=int, default=20, help="how many results (default 20)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--grid", type=Path, help="also draw the query and its results into this PNG")
    parser.add_argument("--gallery", type=Path, default=paths.GALLERY, help="gallery folder (data/gallery)")
    parser.add_argument("--model", type=Path, default=paths.MODEL, help="trained model folder (models)")
    parser.add_argument("--processed", type=Path, default=paths.PROCESSED,
                        help="processed images, for drawing the grid (data/processed)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.top < 1:
        raise UserError(f"--top: {args.top} must be at least 1")
    if not args.query.is_file():
        raise UserError(f"{args.query}: no such image file")
    gallery = load_gallery(args.gallery)
    hits = search_gallery(gallery, embed_query(args.query, args.model, gallery), args.top)
    if args.grid:
        from siamese_cv.search_grid import draw_search_grid

        draw_search_grid(args.query, hits, gallery, args.processed, args.grid)
    if args.json:
        print(json.dumps([hit.__dict__ for hit in hits], indent=2))
    else:
        for hit in hits:
            print(f"{hit.rank:3d}  {hit.score:.4f}  {hit.label_name:<24}  {hit.id}")
        if args.grid:
            print(f"grid: {args.grid}", file=sys.stderr)
    return 0


def cli() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
