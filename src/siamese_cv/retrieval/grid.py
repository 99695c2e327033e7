"""Draw `siamese-search --grid`: the query photo and its results, with scores and class borders."""

from __future__ import annotations

import io
import math
from pathlib import Path

import matplotlib.pyplot as plt
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from siamese_cv.core.drawing import BAD, GOOD, draw_border, save_figure, shorten, show_image
from siamese_cv.data.parquet import read_table
from siamese_cv.retrieval.gallery import Gallery


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


def search_grid(
    query: Image.Image, query_label: str, results: list[dict], path: str | Path, title: str
) -> Path:
    """The query image at left, then its top-N results in rows of up to five.

    Each result is captioned "#rank score label" and framed green if it is of the query's class,
    red otherwise, so a reader sees at once how far down the first mistake is.

    Args:
        query: the query image.
        query_label: the query's class name.
        results: ranked dicts with `image` (PIL), `label` (class name) and `score` (cosine).
        path: where to write the PNG; parent folders are created.
        title: figure title; the count of same-class results is appended.

    Returns:
        `path` as a Path.

    Raises:
        ValueError: `results` is empty.
    """
    if not results:
        raise ValueError("no search results to draw: pass at least one result")
    per_row = 5
    n_rows = math.ceil(len(results) / per_row)
    fig = plt.figure(figsize=(2.2 * (per_row + 1.4), 2.5 * n_rows + 0.8))
    grid = fig.add_gridspec(n_rows, per_row + 1, width_ratios=[1.4] + [1] * per_row)
    q_ax = fig.add_subplot(grid[0, 0])
    show_image(q_ax, query)
    draw_border(q_ax, "#1f4e9c", 4.0)
    q_ax.set_title(f"Query\n{shorten(query_label)}", fontsize=11, fontweight="bold")
    n_same = 0
    for rank, result in enumerate(results, start=1):
        ax = fig.add_subplot(grid[(rank - 1) // per_row, 1 + (rank - 1) % per_row])
        show_image(ax, result["image"])
        same = str(result["label"]) == str(query_label)
        n_same += same
        colour = GOOD if same else BAD
        draw_border(ax, colour)
        ax.set_title(
            f"#{rank}  {float(result['score']):.3f}\n{shorten(result['label'], 20)}",
            fontsize=9,
            color=colour,
        )
    fig.suptitle(f"{title}\n{n_same} of top {len(results)} are '{shorten(query_label)}'")
    return save_figure(fig, path)
