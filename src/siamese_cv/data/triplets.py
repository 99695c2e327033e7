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
    """Rows per class; a split needs a class of two (a positive pair) and two classes."""
    classes = {int(c): np.flatnonzero(labels == c) for c in np.unique(labels)}
    if not any(len(members) >= 2 for members in classes.values()):
        raise UserError(
            f"{split}: no class has 2 images, so no triplet has a positive pair; add images"
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
    a uniformly chosen other class. An image alone in its class anchors nothing (it has no
    positive) but is still drawn as a negative.

    Returns:
        int64 array [n, 3] of row indices (anchor, positive, negative).
    """
    labels = np.asarray(labels)
    by_class = _class_index(labels, split)
    class_ids = np.array(sorted(by_class))
    anchors = rng.permutation(len(labels))
    alone = [c for c, members in by_class.items() if len(members) < 2]
    if alone:
        anchors = anchors[~np.isin(labels[anchors], alone)]
    positives = np.empty_like(anchors)
    negatives = np.empty_like(anchors)
    # Draw everything for one class at a time: vectorised, and the order is fixed by the rng.
    for c in class_ids:
        members = by_class[int(c)]
        if len(members) < 2:
            continue
        rows = np.flatnonzero(labels[anchors] == c)
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
) -> list[np.ndarray]:
    """One epoch of class-balanced P x K batches for online mining.

    Each batch holds `classes_per_batch` distinct classes (all of them if there are fewer) and
    `samples_per_class` images of each, taken from a per-class shuffled queue so an epoch sees
    every image about once. A class with fewer than K images gives all of them, each once: a
    repeated row would be the same embedding (a step embeds each distinct row once, in one view),
    so repeats would only weigh the class more.

    Returns:
        Each batch's int64 row indices (P*K of them when every class has K images).
    """
    labels = np.asarray(labels)
    by_class = _class_index(labels, "train")
    class_ids = np.array(sorted(by_class))
    p = min(classes_per_batch, len(class_ids))
    k = samples_per_class
    n_batches = max(1, int(np.ceil(len(labels) / (p * k))))
    queues = {c: list(rng.permutation(by_class[int(c)])) for c in class_ids}
    batches = []
    for _ in range(n_batches):
        chosen = rng.choice(class_ids, size=p, replace=False)
        row = []
        for c in chosen:
            members = by_class[int(c)]
            if len(members) < k:
                row.extend(members)
                continue
            queue = queues[c]
            if len(queue) < k:
                queue.extend(rng.permutation(members))
            row.extend(queue[:k])
            del queue[:k]
        batches.append(np.asarray(row, dtype=np.int64))
    return batches


def pk_notes(labels: np.ndarray, classes_per_batch: int, samples_per_class: int) -> list[str]:
    """What P x K sampling adapts to in this training split, for the stage's log."""
    counts = np.bincount(np.asarray(labels))
    counts = counts[counts > 0]
    notes = []
    if len(counts) < classes_per_batch:
        notes.append(
            f"{len(counts)} training classes, fewer than triplets.classes_per_batch "
            f"{classes_per_batch}: every batch holds all of them"
        )
    short = int((counts < samples_per_class).sum())
    if short:
        notes.append(
            f"{short} classes have fewer than triplets.samples_per_class {samples_per_class} "
            f"training images (fewest {int(counts.min())}): a batch takes all of theirs, each once"
        )
    return notes
