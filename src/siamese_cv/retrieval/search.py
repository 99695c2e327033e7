"""Reverse image search: embed a query photo, rank the gallery by cosine similarity.

`siamese-search QUERY_IMAGE [--top 20] [--json] [--grid out.png] [--index exact|ivf]` is the
original notebook's search, but vectorised: one matrix product and a partial sort instead of a
Python loop (`exact`), or a FAISS IVF index for galleries too large for that (`ivf
[--nprobe N]`; see `siamese_cv.retrieval.index`). By default it uses the index the index_gallery stage
saved in data/index (`search.index` in params.yaml), so a large gallery's index is trained once.
The query is embedded as export_gallery embedded the gallery (the engine and precision in its
meta.json); `--engine` overrides the engine. It is one query through `SearchEngine`
(`siamese_cv.retrieval.engine`), the path `siamese-serve` answers many with. Hits that the copy
rule calls copies of the query (an edited copy of a gallery photo, or the photo itself; see
`siamese_cv.retrieval.copies`) come first, marked `copy` with their copy score.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from siamese_cv.config.choices import ENGINES
from siamese_cv.core import paths
from siamese_cv.core.errors import UserError, run_cli
from siamese_cv.retrieval.engine import Hit, SearchEngine
from siamese_cv.retrieval.index import KINDS

__all__ = ["Hit", "main", "cli"]


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
        help="what runs the network: torch or onnxruntime (the model exported to ONNX first, "
        "seconds; needs onnxruntime and onnxscript); default: the one the gallery was "
        "embedded with",
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
    engine = SearchEngine.load(
        model_dir=args.model,
        gallery_dir=args.gallery,
        index_dir=args.index_dir,
        processed_dir=args.processed,
        index_kind=args.index,
        engine=args.engine,
    )
    if args.nprobe is not None and engine.index.kind != "ivf":
        raise UserError(
            f"--nprobe: the index in {args.index_dir} is exact; add --index ivf "
            "(or set search.index: ivf and run `dvc repro index_gallery`)"
        )
    from siamese_cv.data.images import ImageError

    try:
        hits = engine.search(args.query, args.top, nprobe=args.nprobe)
    except ImageError as error:
        raise UserError(f"cannot read the query image ({error})") from None
    if args.grid:
        _draw_grid(args.query, hits, engine, args.grid)
    if args.json:
        print(json.dumps([hit.__dict__ for hit in hits], indent=2))
    else:
        for hit in hits:
            mark = f"  copy ({hit.copy_score:.3f})" if hit.copy else ""
            print(f"{hit.rank:3d}  {hit.score:.4f}  {hit.label_name:<24}  {hit.id}{mark}")
        if any(hit.copy for hit in hits):
            print(f"copy: {engine.copy_rule()}", file=sys.stderr)
        if args.grid:
            print(f"grid: {args.grid}", file=sys.stderr)
    return 0


def _draw_grid(query: Path, hits: list[Hit], engine: SearchEngine, out: Path) -> None:
    import io

    from PIL import Image

    from siamese_cv.retrieval.grid import search_grid

    results = [
        {"image": Image.open(io.BytesIO(engine.image_bytes(h.id))), "label": h.label_name,
         "score": h.score}
        for h in hits
    ]  # fmt: skip
    # The query's class is unknown: frame results by agreement with the top hit's class.
    predicted = hits[0].label_name if hits else ""
    title = f"siamese-search: top {len(hits)} for {query.name} (predicted class)"
    search_grid(Image.open(query), predicted, results, out, title)


def cli() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
