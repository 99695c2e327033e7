"""Seeded triplet and class-balanced batch sampling.

Each split and draw has its own random stream (`SeedSequence([seed, split, draw])`), so the test
triplets depend only on `triplets.seed` and the test split: changing `train.epochs` or the
training sampler never changes what a model is scored on.
"""

from __future__ import annotations

import numpy as np

from siamese_cv.core.errors import UserError

_STREAM = {"train": 0, "validation": 1, "test": 2, "pk": 3}


def rng_for(seed: int, stream: str, draw: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, _STREAM[stream], draw]))


def _class_index(labels: np.ndarray, split: str) -> dict[int, np.ndarray]:
    classes = {int(c): np.flatnonzero(labels == c) for c in np.unique(labels)}
    small = [c for c, members in classes.items() if len(members) < 2]
    if small:
        raise UserError(
            f"{split}: class {small[0]} has fewer than 2 images, so it has no positive pair; "
            "add images or remove the class"
        )
    if len(classes) < 2:
        raise UserError(
            f"{split}: needs at least 2 classes to draw negatives, found {len(classes)}"
        )
    return classes


def random_triplets(
    labels: np.ndarray, rng: np.random.Generator, split: str = "train"
) -> np.ndarray:
    """The original's triplets: every image is the anchor once, in a shuffled order.

    The positive is a random *other* image of the anchor's class; the negative a random image of
    a uniformly chosen other class.

    Returns:
        int64 array [n, 3] of row indices (anchor, positive, negative).
    """
    labels = np.asarray(labels)
    by_class = _class_index(labels, split)
    class_ids = np.array(sorted(by_class))
    anchors = rng.permutation(len(labels))
    positives = np.empty_like(anchors)
    negatives = np.empty_like(anchors)
    # Draw everything for one class at a time: vectorised, and the order is fixed by the rng.
    for c in class_ids:
        rows = np.flatnonzero(labels[anchors] == c)
        members = by_class[int(c)]
        a = anchors[rows]
        # a random member other than the anchor: draw from n-1 slots and skip the anchor's own slot
        slot_of_anchor = np.searchsorted(members, a)
        pick = rng.integers(0, len(members) - 1, size=len(rows))
        pick += pick >= slot_of_anchor
        positives[rows] = members[pick]
        others = class_ids[class_ids != c]
        neg_class = others[rng.integers(0, len(others), size=len(rows))]
        for nc in np.unique(neg_class):
            sel = rows[neg_class == nc]
            pool = by_class[int(nc)]
            negatives[sel] = pool[rng.integers(0, len(pool), size=len(sel))]
    return np.stack([anchors, positives, negatives], axis=1).astype(np.int64)


def pk_batches(
    labels: np.ndarray, classes_per_batch: int, samples_per_class: int, rng: np.random.Generator
) -> np.ndarray:
    """One epoch of class-balanced P x K batches for online mining.

    Each batch holds `classes_per_batch` distinct classes (all of them if there are fewer) and
    `samples_per_class` images of each, taken from a per-class shuffled queue so an epoch sees
    every image about once; classes with fewer images than K repeat some.

    Returns:
        int64 array [n_batches, P*K] of row indices.
    """
    labels = np.asarray(labels)
    by_class = _class_index(labels, "train")
    class_ids = np.array(sorted(by_class))
    p = min(classes_per_batch, len(class_ids))
    k = samples_per_class
    n_batches = max(1, int(np.ceil(len(labels) / (p * k))))
    queues = {c: list(rng.permutation(by_class[int(c)])) for c in class_ids}
    batches = np.empty((n_batches, p * k), dtype=np.int64)
    for b in range(n_batches):
        chosen = rng.choice(class_ids, size=p, replace=False)
        row = []
        for c in chosen:
            queue = queues[c]
            if len(queue) < k:
                queue.extend(rng.permutation(by_class[int(c)]))
            row.extend(queue[:k])
            del queue[:k]
        batches[b] = row
    return batches
