"""Every test figure for one set of embeddings: triplet accuracy over the fixed draws, leave-one-out
retrieval on the test split, and test queries searching the exported gallery.

The trained model and the frozen baseline go through this same function, so their numbers are
comparable key for key in metrics/test.json.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from siamese_cv.core import paths
from siamese_cv.data.parquet import read_table
from siamese_cv.data.triplet_tables import read_triplets
from siamese_cv.evaluation.metrics import (
    expected_triplet_accuracy,
    gallery_metrics,
    retrieval_metrics,
    triplet_accuracy_draws,
)


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
