"""Reverse image search: embed a query photo, rank the gallery by cosine similarity.

`siamese-search QUERY_IMAGE [--top 20] [--json] [--grid out.png] [--index exact|ivf]` is the
original notebook's search, but vectorised: one matrix product and a partial sort instead of a
Python loop (`exact`), or a FAISS IVF index for galleries too large for that (`ivf
[--nprobe N]`; see `siamese_cv.retrieval.index`). By default it uses the index the index_gallery stage
saved in data/index (`search.index` in params.yaml), so a large gallery's index is trained once.
`--engine onnxruntime` embeds the query with ONNX Runtime instead of torch.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from siamese_cv.config.params import ENGINES
from siamese_cv.core import paths
from siamese_cv.core.errors import UserError, run_cli
from siamese_cv.retrieval.gallery import Gallery, load_gallery
from siamese_cv.retrieval.index import (
    KINDS,
    ExactIndex,
    Index,
    build_index,
    load_index,
    normalize_rows,
    top_k,
)

__all__ = ["Hit", "search_gallery", "embed_query", "main", "cli"]


@dataclass(frozen=True)
class Hit:
    rank: int
    id: str
    label_name: str
    score: float


def search_gallery(
    gallery: Gallery,
    query_vector: np.ndarray,
    k: int,
    index: Index | None = None,
    nprobe: int | None = None,
) -> list[Hit]:
    """The gallery's `k` best hits for one query vector.

    Args:
        index: built from `gallery.vectors` (`build_index`); None searches them exactly.
        nprobe: IVF lists to scan for this query (ivf indexes only).
    """
    if index is None:
        if nprobe is not None:
            raise ValueError("nprobe needs an ivf index; pass index=build_index(..., kind='ivf')")
        ids, scores = top_k(gallery.vectors, query_vector, k)
    else:
        if index.ntotal != len(gallery.ids):
            raise ValueError(
                f"the index holds {index.ntotal} vectors, the gallery "
                f"{len(gallery.ids)}; build the index from this gallery's vectors"
            )
        ids, scores = index.search(query_vector, k, nprobe=nprobe)
    return [
        Hit(r + 1, gallery.ids[i], gallery.label_names[i], float(s))
        for r, (i, s) in enumerate(zip(ids[0], scores[0], strict=True))
    ]


def embed_query(path: Path, model_dir: Path, gallery: Gallery, engine: str = "torch") -> np.ndarray:
    """Embed one photo with the trained model, exactly as the gallery was embedded.

    Args:
        engine: what runs the network (`siamese_cv.config.params.ENGINES`); onnxruntime first
            exports the model to ONNX, which takes seconds.
    """
    from siamese_cv.data.images import ImageError, load_rgb
    from siamese_cv.inference.embedder import Embedder
    from siamese_cv.inference.hardware import resolve_device, resolve_precision
    from siamese_cv.models.siamese import Preprocessing, load_checkpoint

    model, config = load_checkpoint(model_dir)
    if config["fingerprint"] != gallery.meta.get("model_fingerprint"):
        raise UserError(
            f"the gallery was built with another model than {model_dir}; "
            "run `dvc repro export_gallery`"
        )
    prep = Preprocessing.from_dict(config["preprocessing"])
    try:
        image = load_rgb(path, prep.image_size, prep.resize)
    except (ImageError, OSError) as error:
        raise UserError(f"{path}: cannot read the query image ({error})") from None
    precision = resolve_precision("auto", resolve_device("auto"))
    return Embedder(model, prep, precision, batch_size=1, engine=engine).embed_images([image])


def choose_index(gallery: Gallery, index_dir: Path, kind: str | None) -> Index | None:
    """The index to search: the saved one when it fits `kind` (None: whatever was saved).

    Asking for `ivf` where none was saved builds one for this call (k-means: minutes on a
    million vectors) and says how to save it; None means exact search.
    """
    saved = load_index(index_dir, gallery.vectors)
    if saved is not None and kind in (None, saved.kind):
        return saved
    if kind in (None, "exact"):
        return ExactIndex(normalize_rows(gallery.vectors))
    print(
        f"siamese-search: no saved ivf index in {index_dir}; building one for this search "
        "(save it: set search.index: ivf and run `dvc repro index_gallery`)",
        file=sys.stderr,
    )
    try:
        return build_index(gallery.vectors, "ivf")
    except ImportError as error:
        raise UserError(str(error)) from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="siamese-search", description=__doc__.splitlines()[0])
    parser.add_argument("query", type=Path, help="the photo to search for")
    parser.add_argument("--top", type=int, default=20, help="how many results (default 20)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument(
        "--grid", type=Path, help="also draw the query and its results into this PNG"
    )
    parser.add_argument(
        "--gallery", type=Path, default=paths.GALLERY, help="gallery folder (data/gallery)"
    )
    parser.add_argument(
        "--model", type=Path, default=paths.MODEL, help="trained model folder (models)"
    )
    parser.add_argument(
        "--index",
        choices=KINDS,
        help="exact scores every gallery vector; ivf uses the approximate FAISS index, for "
        "galleries of hundreds of thousands of images (default: the one saved in data/index)",
    )
    parser.add_argument(
        "--index-dir", type=Path, default=paths.INDEX, help="saved index folder (data/index)"
    )
    parser.add_argument(
        "--nprobe",
        type=int,
        help="ivf lists to scan: more is slower and closer to exact (default: the index's own, "
        "1/128 of the lists, at least 8)",
    )
    parser.add_argument(
        "--engine",
        choices=ENGINES,
        default="torch",
        help="what runs the network: torch (default) or onnxruntime (the model exported to "
        "ONNX first, seconds; needs onnxruntime and onnxscript)",
    )
    parser.add_argument(
        "--processed",
        type=Path,
        default=paths.PROCESSED,
        help="processed images, for drawing the grid (data/processed)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.top < 1:
        raise UserError(f"--top: {args.top} must be at least 1")
    if args.nprobe is not None and args.index == "exact":
        raise UserError("--nprobe applies only to the approximate index; add --index ivf")
    if args.nprobe is not None and args.nprobe < 1:
        raise UserError(f"--nprobe: {args.nprobe} must be at least 1")
    if not args.query.is_file():
        raise UserError(f"{args.query}: no such image file")
    gallery = load_gallery(args.gallery)
    query = embed_query(args.query, args.model, gallery, args.engine)
    index = choose_index(gallery, args.index_dir, args.index)
    if args.nprobe is not None and index.kind != "ivf":
        raise UserError(
            f"--nprobe: the index in {args.index_dir} is exact; add --index ivf "
            "(or set search.index: ivf and run `dvc repro index_gallery`)"
        )
    hits = search_gallery(gallery, query, args.top, index, args.nprobe)
    if args.grid:
        from siamese_cv.retrieval.grid import draw_search_grid

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
