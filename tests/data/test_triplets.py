import numpy as np
import pytest

from siamese_cv.core.errors import UserError
from siamese_cv.data.triplets import pk_batches, random_triplets, rng_for

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


def test_single_image_class_is_refused_by_name():
    with pytest.raises(UserError, match="class 1 has fewer than 2 images"):
        random_triplets(np.array([0, 0, 1]), rng_for(0, "train", 0))


def test_pk_batches_are_class_balanced_and_cover_the_epoch():
    batches = pk_batches(LABELS, classes_per_batch=3, samples_per_class=2, rng=rng_for(0, "pk", 0))
    assert batches.shape == (3, 6)
    for row in batches:
        classes, counts = np.unique(LABELS[row], return_counts=True)
        assert len(classes) == 3 and set(counts) == {2}
    seen = np.unique(batches)
    assert len(seen) >= 14  # most of the 18 images appear in one epoch
