"""Evaluation figures a person can read at a glance: triplets, search results, maps, curves.

Every figure is titled, labelled and carries its scores, because these PNGs are what a reviewer
looks at in the DVC report instead of the raw metrics. Each function writes its PNG atomically
(a temporary name in the same folder, then `os.replace`) so a killed stage never leaves a
half-written image that looks like a finished output, and returns the path written.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: stages run on servers without a display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from PIL import Image  # noqa: E402

from siamese_cv.io import atomic_path  # noqa: E402

GOOD = "#1a9641"  # green: correct / same class
BAD = "#d7191c"  # red: wrong / other class
DPI = 110
# Images are shrunk to this many pixels on their long side before plotting: the figure cannot
# show more, and full-size photos would make the PNGs (and DVC's cache) needlessly large.
THUMB_PX = 160
# The most points t-SNE is run on; more are subsampled (t-SNE is O(n log n) but slow on CPUs).
TSNE_MAX_POINTS = 3000
# Above this many classes the scatter legend and the confusion cell texts become unreadable.
LEGEND_MAX_CLASSES = 30
CELL_TEXT_MAX_CLASSES = 25


def _save(fig: Figure, path: str | Path) -> Path:
    """Write `fig` as PNG atomically and close it (pyplot keeps figures alive until closed)."""
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight")
    finally:
        plt.close(fig)
    return Path(path)


def _thumb(image: Image.Image) -> np.ndarray:
    """An RGB uint8 array of `image`, shrunk to at most THUMB_PX on its long side."""
    small = image.convert("RGB")
    small.thumbnail((THUMB_PX, THUMB_PX))
    return np.asarray(small)


def _short(text: str, width: int = 24) -> str:
    """Shorten a class name so long names do not run into the neighbouring image."""
    return textwrap.shorten(str(text), width=width, placeholder="...")


def _show(ax: Axes, image: Image.Image) -> None:
    """Draw `image` on `ax` without ticks, keeping the frame (spines) for coloured borders."""
    ax.imshow(_thumb(image))
    ax.set_xticks([])
    ax.set_yticks([])


def _border(ax: Axes, color: str, width: float = 4.0) -> None:
    for spine in ax.spines.values():
        spine.set_edgecolor(color)
        spine.set_linewidth(width)


def triplet_figure(rows: list[dict], path: str | Path, title: str) -> Path:
    """A grid of triplets, one per row: Anchor | Positive | Negative, with their cosines.

    Used for seeded test triplets (what the model sees) and for the worst failures (what it gets
    wrong). The class name is written over each image and "cos = ..." under the positive and
    the negative, green when the anchor is closer to the positive (correct), red otherwise.

    Args:
        rows: dicts with `anchor`, `positive`, `negative` (PIL images), `sim_pos`, `sim_neg`
            (cosine similarities to the anchor) and `labels` (the three class names).
        path: where to write the PNG; parent folders are created.
        title: figure title; the count of correct triplets is appended.

    Returns:
        `path` as a Path.

    Raises:
        ValueError: `rows` is empty.
    """
    if not rows:
        raise ValueError("no triplets to draw: pass at least one row")
    n_correct = sum(float(r["sim_pos"]) > float(r["sim_neg"]) for r in rows)
    fig, axes = plt.subplots(len(rows), 3, figsize=(7.5, 2.75 * len(rows) + 0.7), squeeze=False)
    for i, row in enumerate(rows):
        correct = float(row["sim_pos"]) > float(row["sim_neg"])
        colour = GOOD if correct else BAD
        for j, (key, heading) in enumerate(
            (("anchor", "Anchor"), ("positive", "Positive"), ("negative", "Negative"))
        ):
            ax = axes[i, j]
            _show(ax, row[key])
            name = _short(row["labels"][j])
            ax.set_title(f"{heading}\n{name}" if i == 0 else name, fontsize=10)
            if key == "anchor":
                _border(ax, "#444444", 1.5)
                verdict = "correct" if correct else "WRONG"
                ax.set_xlabel(verdict, color=colour, fontsize=10, fontweight="bold")
            else:
                _border(ax, colour, 3.0)
                sim = float(row["sim_pos" if key == "positive" else "sim_neg"])
                ax.set_xlabel(f"cos = {sim:.3f}", color=colour, fontsize=10, fontweight="bold")
    fig.suptitle(f"{title}\n{n_correct} of {len(rows)} triplets correct (cos(a,p) > cos(a,n))")
    fig.tight_layout(h_pad=2.0, rect=(0, 0, 1, 1 - 0.9 / fig.get_figheight()))  # room for the title
    return _save(fig, path)


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
    _show(q_ax, query)
    _border(q_ax, "#1f4e9c", 4.0)
    q_ax.set_title(f"Query\n{_short(query_label)}", fontsize=11, fontweight="bold")
    n_same = 0
    for rank, result in enumerate(results, start=1):
        ax = fig.add_subplot(grid[(rank - 1) // per_row, 1 + (rank - 1) % per_row])
        _show(ax, result["image"])
        same = str(result["label"]) == str(query_label)
        n_same += same
        colour = GOOD if same else BAD
        _border(ax, colour)
        ax.set_title(
            f"#{rank}  {float(result['score']):.3f}\n{_short(result['label'], 20)}",
            fontsize=9,
            color=colour,
        )
    fig.suptitle(f"{title}\n{n_same} of top {len(results)} are '{_short(query_label)}'")
    return _save(fig, path)


def _class_colours(n: int) -> list:
    """n distinguishable colours: tab10, then tab20 with its dark shades first, then turbo."""
    if n <= 10:
        return [plt.get_cmap("tab10")(i) for i in range(n)]
    if n <= 20:
        tab20 = plt.get_cmap("tab20")
        return [tab20(i) for i in [*range(0, 20, 2), *range(1, 20, 2)][:n]]
    turbo = plt.get_cmap("turbo")
    return [turbo(i / (n - 1)) for i in range(n)]


def embedding_map(
    embeddings: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    path: str | Path,
    title: str,
    seed: int = 0,
) -> Path:
    """A 2-D t-SNE scatter of the embeddings, coloured by class.

    Well-separated clumps mean the model groups classes; t-SNE distances between clumps mean
    little, which the subtitle says. More than TSNE_MAX_POINTS rows are subsampled (seeded), so
    the picture is the same for the same embeddings and seed.

    Args:
        embeddings: [N, D] rows, N >= 2.
        labels: [N] integer class ids indexing `class_names`.
        class_names: names for the legend.
        path: where to write the PNG; parent folders are created.
        title: figure title.
        seed: seeds both the subsample and t-SNE.

    Returns:
        `path` as a Path.

    Raises:
        ValueError: fewer than two rows, mismatched lengths or labels outside `class_names`.
    """
    from sklearn.manifold import TSNE  # slow import; only this figure needs it

    emb = np.asarray(embeddings, dtype=np.float32)
    lab = np.asarray(labels, dtype=np.int64)
    if emb.ndim != 2 or len(emb) < 2 or len(lab) != len(emb):
        raise ValueError(
            f"need [N, D] embeddings with N >= 2 and one label per row, got {emb.shape} "
            f"and {lab.shape}"
        )
    if lab.min() < 0 or lab.max() >= len(class_names):
        raise ValueError(
            f"labels must index class_names (0..{len(class_names) - 1}), got "
            f"{lab.min()}..{lab.max()}"
        )
    n_total = len(emb)
    if n_total > TSNE_MAX_POINTS:
        keep = np.sort(np.random.default_rng(seed).choice(n_total, TSNE_MAX_POINTS, replace=False))
        emb, lab = emb[keep], lab[keep]
    points = TSNE(
        n_components=2, init="pca", random_state=seed, perplexity=float(min(30, len(emb) - 1))
    ).fit_transform(emb)

    present = np.unique(lab)
    colours = _class_colours(len(present))
    fig, ax = plt.subplots(figsize=(9.5, 7.5))
    for colour, cls in zip(colours, present.tolist(), strict=True):
        mask = lab == cls
        ax.scatter(
            points[mask, 0],
            points[mask, 1],
            s=14 if len(emb) > 500 else 30,
            color=colour,
            alpha=0.8,
            linewidths=0,
            label=f"{_short(class_names[cls])} ({int(mask.sum())})",
        )
    shown = (
        f"{len(emb)} of {n_total} points (seeded sample)"
        if n_total > len(emb)
        else (f"{n_total} points")
    )
    ax.set_title(
        f"{title}\nt-SNE of {shown}, {len(present)} classes; "
        "clump tightness matters, distances between clumps do not",
        fontsize=11,
    )
    ax.set_xlabel("t-SNE 1")
    ax.set_ylabel("t-SNE 2")
    ax.set_xticks([])
    ax.set_yticks([])
    if len(present) <= LEGEND_MAX_CLASSES:
        ax.legend(
            title="class (points)",
            loc="upper left",
            bbox_to_anchor=(1.01, 1.0),
            fontsize=8,
            markerscale=1.5,
            frameon=False,
        )
    else:
        ax.text(
            1.01,
            1.0,
            f"{len(present)} classes:\nlegend omitted",
            transform=ax.transAxes,
            va="top",
            fontsize=9,
        )
    fig.tight_layout()
    return _save(fig, path)


def confusion_figure(
    matrix: np.ndarray, class_names: Sequence[str], path: str | Path, title: str
) -> Path:
    """A row-normalised heat map of true class vs class of the nearest neighbour.

    Rows are normalised because classes differ in size; each cell also prints its percentage and
    count (for up to CELL_TEXT_MAX_CLASSES classes), so a bright cell of 2 images is not mistaken
    for a systematic confusion.

    Args:
        matrix: [C, C] counts as from `neighbour_confusion`.
        class_names: C names for the axes.
        path: where to write the PNG; parent folders are created.
        title: figure title; the overall nearest-neighbour accuracy is appended.

    Returns:
        `path` as a Path.

    Raises:
        ValueError: the matrix is not square or does not match `class_names`.
    """
    counts = np.asarray(matrix, dtype=np.int64)
    n = len(class_names)
    if counts.shape != (n, n):
        raise ValueError(f"matrix must be [{n}, {n}] for {n} class names, got {counts.shape}")
    totals = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
    accuracy = np.trace(counts) / max(1, counts.sum())

    side = min(22.0, max(5.5, 0.55 * n + 3.0))
    fig, ax = plt.subplots(figsize=(side + 1.2, side))
    image = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class's rows")
    names = [_short(name, 20) for name in class_names]
    ax.set_xticks(range(n), names, rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(n), names)
    ax.set_xlabel("class of nearest neighbour")
    ax.set_ylabel("true class")
    if n <= CELL_TEXT_MAX_CLASSES:
        size = 9 if n <= 10 else 7 if n <= 16 else 6
        for i in range(n):
            for j in range(n):
                if counts[i, j] == 0:
                    continue
                ax.text(
                    j,
                    i,
                    f"{100 * shares[i, j]:.0f}%\n{counts[i, j]}",
                    ha="center",
                    va="center",
                    fontsize=size,
                    color="white" if shares[i, j] > 0.55 else "black",
                )
    ax.set_title(
        f"{title}\nnearest-neighbour accuracy {100 * accuracy:.1f}% over {counts.sum()} images; "
        "cells: share of row, count"
    )
    fig.tight_layout()
    return _save(fig, path)


_LOSS_KEYS = ("train_loss", "val_loss")
_SCORE_KEYS = (
    "val_triplet_accuracy",
    "val_expected_triplet_accuracy",
    "val_precision_at_1",
    "val_map_at_r",
)
MONITOR = "val_map_at_r"  # what siamese_cv.training.loop keeps the best epoch by


def _plot_series(ax: Axes, history: list[dict], epochs: list[int], keys: Sequence[str]) -> bool:
    """Plot each key that some epoch has; label it with its last and best value."""
    drawn = False
    for key in keys:
        pairs = [
            (e, float(row[key]))
            for e, row in zip(epochs, history, strict=True)
            if row.get(key) is not None
        ]
        if not pairs:
            continue
        xs, ys = zip(*pairs, strict=True)
        best = min(ys) if key.endswith("loss") else max(ys)
        ax.plot(
            xs,
            ys,
            marker="o" if len(xs) <= 30 else None,
            markersize=4,
            label=f"{key}  (last {ys[-1]:.3f}, best {best:.3f})",
        )
        drawn = True
    return drawn


def _mark_best(ax: Axes, history: list[dict], epochs: list[int]) -> None:
    """A dashed line at the epoch the training loop keeps (best val_map_at_r, first on ties)."""
    scored = [
        (float(row[MONITOR]), -e, e)
        for e, row in zip(epochs, history, strict=True)
        if row.get(MONITOR) is not None
    ]
    if scored:
        _, _, best = max(scored)
        ax.axvline(best, color="grey", linestyle="--", linewidth=1, label=f"kept epoch {best}")
        ax.legend(fontsize=8)


def curves_figure(history: list[dict], path: str | Path, title: str) -> Path:
    """Training curves per epoch: losses on the left panel, validation scores on the right.

    Two panels rather than twin axes, so neither scale hides the other. Keys missing from some
    epochs (e.g. validation skipped) are plotted where present.

    Args:
        history: one dict per epoch, optionally with `epoch` (else 1, 2, ...), and any of
            `train_loss`, `val_loss`, `val_triplet_accuracy`, `val_precision_at_1`,
            `val_map_at_r`.
        path: where to write the PNG; parent folders are created.
        title: figure title.

    Returns:
        `path` as a Path.

    Raises:
        ValueError: `history` is empty or has none of the keys above.
    """
    if not history:
        raise ValueError("no epochs to plot: the training history is empty")
    epochs = [int(row.get("epoch", i + 1)) for i, row in enumerate(history)]
    has_scores = any(row.get(k) is not None for row in history for k in _SCORE_KEYS)
    has_losses = any(row.get(k) is not None for row in history for k in _LOSS_KEYS)
    if not (has_scores or has_losses):
        raise ValueError(
            f"history has none of {_LOSS_KEYS + _SCORE_KEYS}: pass the per-epoch rows the "
            "training loop records"
        )
    panels = [
        (k, lbl)
        for k, lbl, present in (
            (_LOSS_KEYS, "loss", has_losses),
            (_SCORE_KEYS, "score (higher is better)", has_scores),
        )
        if present
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.6), squeeze=False)
    for ax, (keys, ylabel) in zip(axes[0], panels, strict=True):
        _plot_series(ax, history, epochs, keys)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        if len(set(epochs)) <= 20:
            ax.set_xticks(sorted(set(epochs)))
        if keys is _SCORE_KEYS:
            ax.set_ylim(top=min(1.02, ax.get_ylim()[1]))
            _mark_best(ax, history, epochs)
    axes[0][0].set_title("losses" if has_losses else "validation scores")
    if len(panels) == 2:
        axes[0][1].set_title("validation scores")
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)
