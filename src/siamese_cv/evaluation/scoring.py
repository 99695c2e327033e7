"""Every test figure for one set of embeddings: triplet accuracy over the fixed draws, leave-one-out
retrieval on the test split, and test queries searching the exported gallery.

The trained model and the frozen baseline go through this same function and `write_scores`, so
metrics/test.json and metrics/baseline.json hold the same few short keys: `dvc metrics show` prints
them as two rows under one header that fits a terminal. Per-class figures go to a TSV beside them
(metrics/per_class/test.tsv, baseline.tsv), which `dvc plots show` draws as one bar chart per metric.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from siamese_cv.core import paths
from siamese_cv.core.atomic import atomic_path, write_json
from siamese_cv.data.parquet import read_table
from siamese_cv.data.triplet_tables import read_triplets
from siamese_cv.evaluation.metrics import (
    expected_triplet_accuracy,
    gallery_metrics,
    retrieval_metrics,
    triplet_accuracy_draws,
)

#: Metrics-file key -> score_embeddings key of the headline figures; recall@k is added per k > 1.
HEADLINE = {
    "triplet_acc": "triplet_accuracy",
    "triplet_std": "triplet_accuracy_std",
    "expected_acc": "expected_triplet_accuracy",
    "precision@1": "precision_at_1",
    "r_precision": "r_precision",
    "map@r": "map_at_r",
    "gallery_p@1": "gallery_precision_at_1",
}
PER_CLASS_COLUMNS = ("class", "precision_at_1", "map_at_r", "queries")
#: Metrics-file key -> copy_detection_metrics key: copies of gallery photos found first, µAP.
COPY_HEADLINE = {"copy_r@1": "recall@1", "copy_uap": "uap"}
PER_EDIT_COLUMNS = ("edit", "recall_at_1", "uap", "margin", "copy_score", "other_score", "flagged")


@dataclass
class TestSet:
    labels: np.ndarray
    class_names: list[str]
    draws: list[tuple[np.ndarray, np.ndarray, np.ndarray]]


def load_test_set(processed: Path = paths.PROCESSED, triplets: Path = paths.TRIPLETS) -> TestSet:
    table = read_table(processed / "test.parquet", ["label"])
    abc, draw = read_triplets(triplets / "test.parquet")
    draws = [tuple(abc[draw == d].T) for d in np.unique(draw)]
    class_names = read_class_names()
    return TestSet(table.column("label").to_numpy().astype(np.int64), class_names, draws)  # type: ignore[arg-type]


def read_class_names(raw: Path = paths.RAW) -> list[str]:
    import json

    return json.loads((raw / "classes.json").read_text(encoding="utf-8"))


def score_embeddings(
    test_emb: np.ndarray,
    test: TestSet,
    gallery_emb: np.ndarray,
    gallery_labels: np.ndarray,
    recall_at: list[int],
) -> dict[str, Any]:
    """All metrics of one model: see the module docstring. Embeddings must be L2-normalised."""
    out: dict[str, Any] = dict(triplet_accuracy_draws(test_emb, test.draws))
    out["expected_triplet_accuracy"] = expected_triplet_accuracy(test_emb, test.labels)
    retrieval = retrieval_metrics(
        test_emb, test.labels, recall_at=tuple(recall_at), class_names=test.class_names
    )
    out.update(retrieval)
    search = gallery_metrics(
        test_emb, test.labels, gallery_emb, gallery_labels, recall_at=tuple(recall_at)
    )
    out.update({f"gallery_{k}": v for k, v in search.items()})
    return out


def embed_splits(
    embedder, splits: list[str], processed: Path = paths.PROCESSED
) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings and labels of several processed splits, concatenated in order."""
    vectors, labels = [], []
    for split in splits:
        path = processed / f"{split}.parquet"
        vectors.append(embedder.embed_parquet(path, progress=f"embedding {split}"))
        labels.append(read_table(path, ["label"]).column("label").to_numpy().astype(np.int64))
    return np.concatenate(vectors), np.concatenate(labels)


def split_column(splits: list[str], column: str, processed: Path = paths.PROCESSED) -> list:
    """One column of several processed splits, concatenated in order (as `embed_splits`)."""
    return [
        value
        for split in splits
        for value in read_table(processed / f"{split}.parquet", [column]).column(column).to_pylist()
    ]


def split_images(splits: list[str], processed: Path = paths.PROCESSED) -> list[bytes]:
    """The stored photos of several processed splits, concatenated in order (as `embed_splits`)."""
    return split_column(splits, "image", processed)


def headline(scores: dict[str, Any]) -> dict[str, float]:
    """The few figures a metrics file keeps, under short keys (see `HEADLINE`).

    Recall@1 is left out: in metric learning it equals precision@1.
    """
    out = {name: float(scores[key]) for name, key in HEADLINE.items()}
    for key, value in scores.items():
        if (m := re.fullmatch(r"recall_at_(\d+)", key)) and int(m[1]) > 1:
            out[f"recall@{m[1]}"] = float(value)
    return out


def skipped_note(scores: dict[str, Any]) -> str:
    """`; 3 test queries skipped (...)` for a stage's log line, or nothing when none were."""
    skipped = scores.get("n_skipped", 0)
    if not skipped:
        return ""
    return (
        f"; {skipped} test queries skipped in the retrieval metrics (alone in their class; "
        "listed in metrics/data_report.json's warnings)"
    )


def per_class_rows(scores: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per class with counted queries (a class needs two test images), in class order."""
    return [
        {
            "class": name,
            "precision_at_1": f["precision_at_1"],
            "map_at_r": f["map_at_r"],
            "queries": f["n"],
        }
        for name, f in scores["per_class"].items()
    ]


def write_scores(
    scores: dict[str, Any], metrics: Path, copies: dict[str, Any] | None = None
) -> dict[str, float]:
    """Write the headline figures to `metrics` (JSON) and the per-class table beside it, to
    per_class/<stem>.tsv (metrics/test.json -> metrics/per_class/test.tsv); returns the figures.

    Args:
        copies: `copy_detection_metrics`' result: its headline joins the figures, and its
            per-edit figures go to copies/<stem>.tsv.
    """
    figures = headline(scores)
    if copies is not None:
        figures |= {name: float(copies[key]) for name, key in COPY_HEADLINE.items()}
        edits = [
            {"edit": edit, "recall_at_1": f["recall@1"], **f}
            for edit, f in copies["per_edit"].items()
        ]
        _write_tsv(metrics.parent / "copies" / f"{metrics.stem}.tsv", PER_EDIT_COLUMNS, edits)
    write_json(metrics, figures)
    _write_tsv(per_class_table(metrics), PER_CLASS_COLUMNS, per_class_rows(scores))
    return figures


def _write_tsv(path: Path, columns: tuple[str, ...], rows: list[dict[str, Any]]) -> None:
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(
            f, columns, delimiter="\t", lineterminator="\n", extrasaction="ignore"
        )
        writer.writeheader()
        for row in rows:
            writer.writerow({k: f"{v:.6f}" if isinstance(v, float) else v for k, v in row.items()})


def per_class_table(metrics: Path) -> Path:
    """Where `write_scores` puts the per-class table of the metrics file `metrics`."""
    return metrics.parent / "per_class" / f"{metrics.stem}.tsv"
