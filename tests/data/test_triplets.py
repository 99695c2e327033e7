import numpy as np
import pytest

from siamese_cv.core.errors import UserError
from siamese_cv.data.triplets import pk_batches, pk_notes, random_triplets, rng_for

LABELS = np.array([0] * 5 + [1] * 3 + [2] * 8 + [3] * 2)


def test_random_triplets_follow_the_original_rules():
    t = random_triplets(LABELS, rng_for(1, "train", 0))
    assert sorted(t[:, 0]) == list(range(len(LABELS)))  # every image is the anchor once
    assert np.all(LABELS[t[:, 0]] == LABELS[t[:, 1]]) and np.all(t[:, 0] != t[:, 1])
    assert np.all(LABELS[t[:, 0]] != LABELS[t[:, 2]])


def test_random_triplets_are_seeded_and_streams_independent():
    a = random_triplets(LABELS, rng_for(7, "test", 0))
    assert np.array_equal(a, random_triplets(LABELS, rng_for(7, "test", 0)))
    assert not np.array_equal(a, random_triplets(LABELS, rng_for(7, "test", 1)))
    assert not np.array_equal(a, random_triplets(LABELS, rng_for(8, "test", 0)))


def test_negatives_cover_other_classes_uniformly():
    labels = np.repeat(np.arange(4), 300)
    t = random_triplets(labels, rng_for(0, "train", 0))
    neg = labels[t[labels[t[:, 0]] == 0, 2]]
    counts = np.bincount(neg, minlength=4)[1:]
    assert counts.min() > 70 and counts.max() < 130


def test_single_image_class_is_a_negative_never_an_anchor():
    labels = np.array([0, 0, 0, 1, 2, 2])
    t = random_triplets(labels, rng_for(0, "test", 0), "test")
    assert sorted(t[:, 0]) == [0, 1, 2, 4, 5]  # row 3 is alone in class 1
    assert 3 not in t[:, 1]
    draws = np.concatenate([random_triplets(labels, rng_for(0, "test", d))[:, 2] for d in range(9)])
    assert 3 in draws


def test_a_split_with_no_class_of_two_is_refused():
    with pytest.raises(UserError, match="test: no class has 2 images"):
        random_triplets(np.array([0, 1, 2]), rng_for(0, "test", 0), "test")
    with pytest.raises(UserError, match="needs at least 2 classes"):
        random_triplets(np.array([0, 0, 0]), rng_for(0, "test", 0), "test")


def _old_random_triplets(labels, rng):
    """The sampler before single-image classes were allowed (every class has 2 or more)."""
    by_class = {int(c): np.flatnonzero(labels == c) for c in np.unique(labels)}
    class_ids = np.array(sorted(by_class))
    anchors = rng.permutation(len(labels))
    positives, negatives = np.empty_like(anchors), np.empty_like(anchors)
    for c in class_ids:
        rows = np.flatnonzero(labels[anchors] == c)
        members = by_class[int(c)]
        slot_of_anchor = np.searchsorted(members, anchors[rows])
        pick = rng.integers(0, len(members) - 1, size=len(rows))
        pick += pick >= slot_of_anchor
        positives[rows] = members[pick]
        others = class_ids[class_ids != c]
        neg_class = others[rng.integers(0, len(others), size=len(rows))]
        for nc in np.unique(neg_class):
            sel = rows[neg_class == nc]
            negatives[sel] = by_class[int(nc)][rng.integers(0, len(by_class[int(nc)]), len(sel))]
    return np.stack([anchors, positives, negatives], axis=1)


def _old_pk_batches(labels, p, k, rng):
    """The P x K sampler before classes smaller than K were allowed."""
    by_class = {int(c): np.flatnonzero(labels == c) for c in np.unique(labels)}
    class_ids = np.array(sorted(by_class))
    p = min(p, len(class_ids))
    n_batches = max(1, int(np.ceil(len(labels) / (p * k))))
    queues = {c: list(rng.permutation(by_class[int(c)])) for c in class_ids}
    batches = np.empty((n_batches, p * k), dtype=np.int64)
    for b in range(n_batches):
        row = []
        for c in rng.choice(class_ids, size=p, replace=False):
            if len(queues[c]) < k:
                queues[c].extend(rng.permutation(by_class[int(c)]))
            row.extend(queues[c][:k])
            del queues[c][:k]
        batches[b] = row
    return batches


def test_classes_of_k_or_more_draw_exactly_as_before():
    """food10-sized classes (337 training, 125 test photos) keep their measured streams."""
    train, test = np.repeat(np.arange(10), 337), np.repeat(np.arange(10), 125)
    for e in range(3):
        new = np.stack(pk_batches(train, 10, 6, rng_for(42, "pk", e)))
        assert np.array_equal(new, _old_pk_batches(train, 10, 6, rng_for(42, "pk", e)))
        new = random_triplets(test, rng_for(42, "test", e))
        assert np.array_equal(new, _old_random_triplets(test, rng_for(42, "test", e)))


def test_pk_classes_smaller_than_k_give_each_image_once():
    labels = np.array([0] * 10 + [1] * 3 + [2] * 1 + [3] * 8)
    batches = pk_batches(labels, classes_per_batch=6, samples_per_class=4, rng=rng_for(0, "pk", 0))
    assert len(batches) == 2  # ceil(22 / (4 classes x 4))
    for batch in batches:
        counts = dict(zip(*np.unique(labels[batch], return_counts=True), strict=True))
        assert counts == {0: 4, 1: 3, 2: 1, 3: 4}
        assert len(set(batch.tolist())) == len(batch)


def test_pk_notes_say_what_the_sampler_adapted():
    labels = np.array([0] * 10 + [1] * 3 + [2] * 1 + [3] * 8)
    notes = pk_notes(labels, 6, 4)
    assert notes[0].startswith("4 training classes, fewer than triplets.classes_per_batch 6")
    assert notes[1].startswith("2 classes have fewer than triplets.samples_per_class 4")
    assert pk_notes(labels, 4, 1) == []


def test_pk_batches_are_class_balanced_and_cover_the_epoch():
    batches = pk_batches(LABELS, classes_per_batch=3, samples_per_class=2, rng=rng_for(0, "pk", 0))
    assert len(batches) == 3 and all(len(b) == 6 for b in batches)
    for row in batches:
        classes, counts = np.unique(LABELS[row], return_counts=True)
        assert len(classes) == 3 and set(counts) == {2}
    seen = np.unique(batches)
    assert len(seen) >= 14  # most of the 18 images appear in one epoch
