"""Copy detection: does an edited copy of a gallery photo find its original first, and how surely?

Queries are edited copies of gallery photos (`copy_edits`) mixed with distractors, photos with
no copy in the gallery (the test split). Per copy: recall@1 (its original ranks first) and the
margin between the original's cosine and the best other photo's. Over all queries: micro-average
precision (µAP) as DISC21 defines it: every query's top-k predictions pooled and ranked by
score, ties ranked pessimistically (wrong before right), precision summed at each right answer
and divided by the number of copies; distractors' predictions can only lower it.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from siamese_cv.data.images import load_rgb
from siamese_cv.evaluation.copy_edits import Copy, choose_sources, make_copies
from siamese_cv.evaluation.metrics import similarity_slabs
from siamese_cv.inference.embedder import to_tensor
from siamese_cv.retrieval.copies import BACKGROUND, CopyRule, lifts


def micro_average_precision(scores: np.ndarray, correct: np.ndarray, positives: int) -> float:
    """DISC21's µAP of pooled predictions: `scores` and `correct` are one entry per prediction.

    Ties are broken pessimistically (a wrong prediction ranks before a right one of equal score),
    so a constant score cannot buy precision.
    """
    if positives < 1:
        raise ValueError("µAP needs at least one query with a copy in the gallery")
    scores, correct = np.asarray(scores, np.float64).ravel(), np.asarray(correct, bool).ravel()
    order = np.lexsort((correct, -scores))  # by score descending, then wrong first
    right = correct[order]
    precision = np.cumsum(right) / np.arange(1, len(right) + 1)
    return float(precision[right].sum() / positives)


def copy_detection_metrics(
    copies: np.ndarray,
    sources: Sequence[int],
    edits: Sequence[str],
    distractors: np.ndarray,
    gallery: np.ndarray,
    k: int = 10,
    rule: CopyRule | None = None,
    similar_first: np.ndarray | None = None,
) -> dict:
    """Score copies of gallery photos, and distractors, searching `gallery` (all unit rows).

    Args:
        copies: [C, D] embeddings of the edited copies.
        sources: [C] the gallery row each copy was made from.
        edits: [C] the edit that made each copy.
        distractors: [Q, D] embeddings of photos with no copy in the gallery.
        gallery: [G, D] the gallery's embeddings (G >= 2).
        k: predictions per query that µAP pools.
        rule: score the search as it answers: a copy the rule flags shows its top copy first,
            any other shows `similar_first`'s photo first (the class embedding's best).
        similar_first: [C] with `rule`, the gallery row the class search ranks first per copy.

    Returns:
        `recall@1` (the first photo shown is the original), `uap` and `margin` over everything,
        with a rule `flagged` (copies flagged) and `false_flags` (distractors flagged), and
        `per_edit`: for each edit, its copies' `recall@1`, `uap` (its copies with all the
        distractors), the median `margin` (the original's cosine minus the best other
        photo's), the medians `copy_score` and `other_score`, and with a rule `flagged`.
    """
    sources = np.asarray(sources, np.int64)
    edits = np.asarray(edits)
    copies, distractors, gallery = (
        np.ascontiguousarray(a, dtype=np.float32) for a in (copies, distractors, gallery)
    )
    if len(copies) != len(sources) or len(sources) != len(edits):
        raise ValueError("copies, sources and edits must have one entry per copy")
    if len(gallery) < 2:
        raise ValueError("copy detection needs a gallery of at least 2 photos")
    if rule is not None and (similar_first is None or len(similar_first) != len(copies)):
        raise ValueError("a rule needs the class search's first photo for every copy")
    depth = min(k, len(gallery))
    wide = min(max(depth, 1 + BACKGROUND), len(gallery))
    own, other, best, copy_lift = (np.empty(len(copies)) for _ in range(4))
    best_row = np.empty(len(copies), np.int64)
    copy_scores, copy_right = np.empty((len(copies), depth)), np.empty((len(copies), depth), bool)
    for start, sims in similarity_slabs(copies, gallery):
        rows = torch.arange(len(sims))
        src = torch.from_numpy(sources[start : start + len(sims)])
        stop = start + len(sims)
        top, index = sims.topk(wide, dim=1)
        best_row[start:stop] = index[:, 0].numpy()
        copy_lift[start:stop] = best_lifts(top.numpy())
        own[start:stop] = sims[rows, src].numpy()
        sims[rows, src] = float("-inf")
        other[start:stop] = sims.max(dim=1).values.numpy()
        copy_scores[start:stop] = top[:, :depth].numpy()
        copy_right[start:stop] = (index[:, :depth] == src[:, None]).numpy()
    distractor_top = np.concatenate(
        [
            sims.topk(wide, dim=1).values.numpy()
            for _, sims in similarity_slabs(distractors, gallery)
        ]
        or [np.empty((0, wide))]
    )
    distractor_scores = distractor_top[:, :depth]
    if rule is None:
        flags = np.zeros(len(copies), bool)
        first = own > other
    else:
        flags = copy_lift >= rule.margin
        first = np.where(flags, best_row, np.asarray(similar_first)) == sources

    def summary(mask: np.ndarray) -> dict:
        scores = np.concatenate([copy_scores[mask].ravel(), distractor_scores.ravel()])
        right = np.concatenate([copy_right[mask].ravel(), np.zeros(distractor_scores.size, bool)])
        out = {
            "recall@1": float(first[mask].mean()),
            "uap": micro_average_precision(scores, right, int(mask.sum())),
            "margin": float(np.median(own[mask] - other[mask])),
            "copy_score": float(np.median(own[mask])),
            "other_score": float(np.median(other[mask])),
        }
        return out if rule is None else {**out, "flagged": float(flags[mask].mean())}

    overall = summary(np.ones(len(copies), bool))
    result = {key: overall[key] for key in ("recall@1", "uap", "margin")}
    if rule is not None:
        distractor_lifts = best_lifts(distractor_top)
        result["flagged"] = overall["flagged"]
        result["false_flags"] = (
            float((distractor_lifts >= rule.margin).mean()) if len(distractor_lifts) else 0.0
        )
    result["per_edit"] = {name: summary(edits == name) for name in dict.fromkeys(edits.tolist())}
    return result


def best_lifts(top: np.ndarray) -> np.ndarray:
    """How far each row's best score beats the mean of the next BACKGROUND (`top`: each query's
    highest scores, best first)."""
    return lifts(top)[:, 0]


def copy_queries(gallery_images: Sequence[bytes], count: int, seed: int) -> list[Copy]:
    """Every edit of `count` seeded gallery photos (none when `count` is 0)."""
    if count == 0:
        return []
    return make_copies(gallery_images, choose_sources(count, len(gallery_images), seed), seed)


def embed_copies(
    embedder: Any, copies: Sequence[Copy], label: str = "embedding copies"
) -> np.ndarray:
    """Embed the copies as search embeds a query: decoded and resized by `load_rgb` with the
    embedder's own size and resize."""
    prep = embedder.prep

    def batch(chunk: list[bytes]) -> torch.Tensor:
        return to_tensor([load_rgb(data, prep.image_size, prep.resize) for data in chunk], prep)

    encoded = [c.encoded for c in copies]
    size = embedder.batch_size
    makers = (functools.partial(batch, encoded[i : i + size]) for i in range(0, len(encoded), size))
    return embedder.embed_batches(makers, total=len(encoded), progress=label)


def score_copies(
    embedder: Any,
    gallery_images: Sequence[bytes],
    gallery: np.ndarray,
    distractors: np.ndarray,
    count: int,
    seed: int,
) -> dict | None:
    """Copy `count` seeded gallery photos with every edit, embed the copies as search embeds a
    query, and score them (`copy_detection_metrics`); None when `count` is 0.

    Args:
        embedder: the model's `Embedder`; its preprocessing resizes each copy like a query.
        gallery_images: the gallery's stored photos, in gallery order.
        gallery, distractors: the gallery's and the distractors' embeddings, by the same model.
    """
    copies = copy_queries(gallery_images, count, seed)
    if not copies:
        return None
    vectors = embed_copies(embedder, copies)
    return copy_detection_metrics(
        vectors, [c.source for c in copies], [c.edit for c in copies], distractors, gallery
    )
