"""Draw `siamese-search --grid`: the query photo and its results, with scores and class borders."""

from __future__ import annotations

import io
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from siamese_cv.data.parquet import read_table
from siamese_cv.evaluation.figures import search_grid
from siamese_cv.gallery import Gallery


def draw_search_grid(query: Path, hits: list, gallery: Gallery, processed: Path, out: Path) -> Path:
    """Look up each hit's processed image by id and draw the grid into `out`."""
    position = {gid: i for i, gid in enumerate(gallery.ids)}
    wanted: dict[str, list[str]] = {}
    for hit in hits:
        wanted.setdefault(gallery.splits[position[hit.id]], []).append(hit.id)
    images: dict[str, bytes] = {}
    for split, ids in wanted.items():
        table = read_table(processed / f"{split}.parquet", ["id", "image"])
        table = table.filter(pc.is_in(table.column("id"), value_set=pa.array(ids)))
        images.update(
            zip(table.column("id").to_pylist(), table.column("image").to_pylist(), strict=True)
        )
    results = [
        {"image": Image.open(io.BytesIO(images[h.id])), "label": h.label_name, "score": h.score}
        for h in hits
    ]
    # The query's class is unknown: frame results by agreement with the top hit's class.
    predicted = hits[0].label_name if hits else ""
    return search_grid(
        Image.open(query),
        predicted,
        results,
        out,
        f"siamese-search: top {len(hits)} for {query.name} (predicted class)",
    )
