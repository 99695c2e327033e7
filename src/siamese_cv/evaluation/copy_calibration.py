"""Choose the copy rule's margin on the validation split, never on the test split.

The validation photos are split in two, seeded: one half joins the gallery and is copied with
every edit; the other half searches it as photos with no copy. The margin is the smallest that
flags at most `copies.false_flags` of the second half, and the copies show what it catches.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from siamese_cv.data.parquet import read_table
from siamese_cv.evaluation.copy_detection import (
    best_lifts,
    copy_detection_metrics,
    copy_queries,
    embed_copies,
)
from siamese_cv.evaluation.metrics import similarity_slabs
from siamese_cv.retrieval.copies import BACKGROUND, CopyRule, choose_margin

log = logging.getLogger(__name__)

FALLBACK_MARGIN = 0.1  # without validation photos (docs/experiments.md, copy detection)


def calibrate_margin(
    embedder: Any,
    descriptor: str,
    gallery: np.ndarray,
    gallery_splits: list[str],
    processed: Path,
    copies: Any,
) -> tuple[float, dict[str, Any]]:
    """The margin `copies` (params) asks for, and what it did on validation.

    Args:
        embedder: the copy descriptor's `Embedder`.
        descriptor: its name, for the rule.
        gallery, gallery_splits: the copy descriptors of the gallery, and each row's split
            (validation rows are left out: the split's halves stand in for them).
        processed: data/processed.

    With fewer than 2 validation photos, margin auto is FALLBACK_MARGIN, with a warning.
    """
    path = processed / "validation.parquet"
    images = read_table(path, ["image"]).column("image").to_pylist() if path.is_file() else []
    if copies.margin != "auto":
        return float(copies.margin), {"chosen": "set in params.yaml"}
    if len(images) < 2:  # a small collection: say so, and keep the pipeline running
        log.warning(
            f"copy_gallery: copies.margin auto needs validation photos (data.val_fraction); "
            f"using {FALLBACK_MARGIN}, measured for the frozen EfficientNet-Lite2 on food10"
        )
        return FALLBACK_MARGIN, {"chosen": "no validation photos: the fallback"}
    rng = np.random.default_rng(np.random.SeedSequence([copies.seed, 0xCA1]))
    order = rng.permutation(len(images))
    copied, alone = np.sort(order[: len(images) // 2]), np.sort(order[len(images) // 2 :])
    vectors = embedder.embed_encoded(images, progress="copy_gallery: validation")
    kept = gallery[np.asarray(gallery_splits) != "validation"]
    searched = np.concatenate([kept, vectors[copied]])
    margin = choose_margin(_best_lifts(vectors[alone], searched), copies.false_flags)
    report: dict[str, Any] = {
        "chosen": "on validation",
        "false_flags_allowed": copies.false_flags,
        "photos_without_copy": int(len(alone)),
    }
    made = copy_queries([images[i] for i in copied], min(copies.queries, len(copied)), copies.seed)
    if made:
        scores = copy_detection_metrics(
            embed_copies(embedder, made, "copy_gallery: validation copies"),
            [len(kept) + c.source for c in made],
            [c.edit for c in made],
            vectors[alone],
            searched,
            rule=CopyRule(margin, descriptor),
            similar_first=np.full(len(made), -1),  # recall@1 counts the flagged copies only
        )
        report.update(
            copies=len(made),
            flagged_right=scores["recall@1"],
            false_flags=scores["false_flags"],
            uap=scores["uap"],
        )
    return margin, report


def _best_lifts(queries: np.ndarray, gallery: np.ndarray) -> np.ndarray:
    """Each query's best copy score minus the mean of its next BACKGROUND."""
    wide = min(1 + BACKGROUND, len(gallery))
    out = []
    for _, sims in similarity_slabs(np.ascontiguousarray(queries), np.ascontiguousarray(gallery)):
        out.append(best_lifts(sims.topk(wide, dim=1).values.numpy()))
    return np.concatenate(out) if out else np.empty(0)
