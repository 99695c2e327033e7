"""Evaluation figures a person can read at a glance: triplets, embedding maps, confusions.

Every figure is titled, labelled and carries its scores, because these PNGs are what a reviewer
looks at in the DVC report instead of the raw metrics. Each function writes its PNG atomically
(a temporary name in the same folder, then `os.replace`) so a killed stage never leaves a
half-written image that looks like a finished output, and returns the path written.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from siamese_cv.core.drawing import BAD, GOOD, draw_border, save_figure, shorten, show_image

# The most points t-SNE is run on; more are subsampled (t-SNE is O(n log n) but slow on CPUs).
TSNE_MAX_POINTS = 3000
# Above this many classes the scatter legend and the confusion cell texts become unreadable.
LEGEND_MAX_CLASSES = 30
CELL_TEXT_MAX_CLASSES = 25


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
            show_image(ax, row[key])
            name = shorten(row["labels"][j])
            ax.set_title(f"{heading}\n{name}" if i == 0 else name, fontsize=10)
            if key == "anchor":
                draw_border(ax, "#444444", 1.5)
                verdict = "correct" if correct else "WRONG"
                ax.set_xlabel(verdict, color=colour, fontsize=10, fontweight="bold")
            else:
                draw_border(ax, colour, 3.0)
                sim = float(row["sim_pos" if key == "positive" else "sim_neg"])
                ax.set_xlabel(f"cos = {sim:.3f}", color=colour, fontsize=10, fontweight="bold")
    fig.suptitle(f"{title}\n{n_correct} of {len(rows)} triplets correct (cos(a,p) > cos(a,n))")
    fig.tight_layout(h_pad=2.0, rect=(0, 0, 1, 1 - 0.9 / fig.get_figheight()))  # room for the title
    return save_figure(fig, path)


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
            label=f"{shorten(class_names[cls])} ({int(mask.sum())})",
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
    return save_figure(fig, path)


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
    names = [shorten(name, 20) for name in class_names]
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
    return save_figure(fig, path)


_LOSS_KEYS = ("train_loss", "val_loss")
_SCORE_KEYS = (
    "val_triplet_accuracy",
    "val_expected_triplet_accuracy",
    "val_precision_at_1",
    "val_map_at_r",
)
MONITOR = "val_map_at_r"  # what siamese_cv.training.validation keeps the best epoch by
