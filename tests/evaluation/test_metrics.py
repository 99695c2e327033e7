"""Retrieval and triplet metrics: hand-computed cases, PML's AccuracyCalculator, brute force."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from pytorch_metric_learning.distances import CosineSimilarity
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
from pytorch_metric_learning.utils.inference import CustomKNN

from siamese_cv.core.errors import UserError
from siamese_cv.data.triplets import random_triplets
from siamese_cv.evaluation.metrics import (
    expected_triplet_accuracy,
    gallery_metrics,
    neighbour_confusion,
    retrieval_metrics,
    triplet_accuracy,
    triplet_accuracy_draws,
)


def unit(rows) -> np.ndarray:
    array = np.asarray(rows, dtype=np.float32)
    return (array / np.linalg.norm(array, axis=1, keepdims=True)).astype(np.float32)


def random_unit(n: int, dims: int, seed: int) -> np.ndarray:
    return unit(np.random.default_rng(seed).normal(size=(n, dims)))


def angles(degrees) -> np.ndarray:
    """Points on the unit circle: cosine order = angular distance order, easy to reason about."""
    rad = np.deg2rad(np.asarray(degrees, dtype=np.float64))
    return unit(np.stack([np.cos(rad), np.sin(rad)], axis=1))


def test_perfect_ranking_scores_one_everywhere():
    # Three tight clusters far apart on the circle: every neighbour is of the same class.
    emb = angles([0, 1, 2, 120, 121, 240, 241, 242, 243])
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    out = retrieval_metrics(emb, labels, recall_at=(1, 2), class_names=["a", "b", "c"])
    for key in ("precision_at_1", "recall_at_1", "recall_at_2", "r_precision", "map_at_r"):
        assert out[key] == 1.0, key
    assert out["n_queries"] == 9
    assert out["per_class"] == {
        "a": {"precision_at_1": 1.0, "map_at_r": 1.0, "n": 3},
        "b": {"precision_at_1": 1.0, "map_at_r": 1.0, "n": 2},
        "c": {"precision_at_1": 1.0, "map_at_r": 1.0, "n": 4},
    }
    gal = gallery_metrics(emb, labels, emb, labels, recall_at=(1, 5))
    assert gal == {"precision_at_1": 1.0, "recall_at_1": 1.0, "recall_at_5": 1.0, "n_queries": 9}
    np.testing.assert_array_equal(neighbour_confusion(emb, labels, 3), np.diag([3, 2, 4]))
    assert triplet_accuracy(emb, np.array([0, 3]), np.array([1, 4]), np.array([5, 6])) == 1.0


def test_small_case_by_hand():
    # Five points on the circle at angles 0, 10, 25, 40, 90 degrees; classes A A B A B.
    #   idx:    0(A,0)  1(A,10)  2(B,25)  3(A,40)  4(B,90)
    # Rankings of the other points by angular distance (nearest first), R = other items of class:
    #   q0 (A, R=2): 1(A,10)  2(B,25)  3(A,40)  4(B,90)
    #   q1 (A, R=2): 0(A,10)  2(B,15)  3(A,30)  4(B,80)
    #   q2 (B, R=1): 1(A,15)  3(A,15)  0(A,25)  4(B,65)   (1 and 3 tie, both A: order moot)
    #   q3 (A, R=2): 2(B,15)  1(A,30)  0(A,40)  4(B,50)
    #   q4 (B, R=1): 3(A,50)  2(B,65)  1(A,80)  0(A,90)
    # P@1:  q0 1, q1 1, q2 0, q3 0, q4 0                                  -> 2/5 = 0.4
    # R-precision (hits in top R / R): 1/2, 1/2, 0/1, 1/2, 0/1            -> 1.5/5 = 0.3
    # MAP@R = (1/R) * sum of precision@i over hits at ranks i <= R:
    #   q0: hit at 1 -> (1/1)/2 = 0.5;  q1: 0.5;  q2: 0;  q3: hit at 2 -> (1/2)/2 = 0.25;  q4: 0
    #   mean = 1.25/5 = 0.25
    # Recall@1 = P@1 = 0.4; Recall@2: 1, 1, 0, 1, 1 -> 0.8; Recall@3: q2 still misses -> 0.8;
    # Recall@4 = 1.0 (every other row is in the top 4).
    # Per class A (q0, q1, q3): P@1 2/3, MAP@R 1.25/3;  B (q2, q4): 0 and 0.
    emb = angles([0, 10, 25, 40, 90])
    labels = np.array([0, 0, 1, 0, 1])
    out = retrieval_metrics(emb, labels, recall_at=(1, 2, 3, 4), class_names=["A", "B"])
    assert out["precision_at_1"] == pytest.approx(0.4)
    assert out["recall_at_1"] == pytest.approx(0.4)
    assert out["recall_at_2"] == pytest.approx(0.8)
    assert out["recall_at_3"] == pytest.approx(0.8)
    assert out["recall_at_4"] == pytest.approx(1.0)
    assert out["r_precision"] == pytest.approx(0.3)
    assert out["map_at_r"] == pytest.approx(0.25)
    assert out["per_class"]["A"] == {
        "precision_at_1": pytest.approx(2 / 3),
        "map_at_r": pytest.approx(1.25 / 3),
        "n": 3,
    }
    assert out["per_class"]["B"] == {"precision_at_1": 0.0, "map_at_r": 0.0, "n": 2}
    # Nearest others: 0->1(A), 1->0(A), 2->1(A, tie with 3), 3->2(B), 4->3(A).
    np.testing.assert_array_equal(neighbour_confusion(emb, labels, 2), [[2, 1], [2, 0]])


def test_map_at_r_uses_full_depth_of_large_class():
    # Class 0 has 6 members; the query's last same-class neighbour is ranked 6th of 7 others.
    # A ranking cut at 5 (e.g. k = max(recall_at)) would miss it and give a lower MAP@R.
    #   q0 ranking: 1(A) 2(A) 3(A) 4(A) 6(B) 5(A) 7(B); R = 5
    #   MAP@R(q0) = (1/1 + 2/2 + 3/3 + 4/4) / 5 = 0.8  (rank 6 is beyond R, so not counted)
    emb = angles([0, 1, 2, 3, 4, 30, 20, 60])
    labels = np.array([0, 0, 0, 0, 0, 0, 1, 1])
    out = retrieval_metrics(emb, labels, recall_at=(1,))
    ref = pml_metrics(emb, labels)
    assert out["map_at_r"] == pytest.approx(ref["mean_average_precision_at_r"], abs=1e-6)
    assert out["r_precision"] == pytest.approx(ref["r_precision"], abs=1e-6)


def test_singleton_classes_are_excluded_and_reported():
    emb = angles([0, 5, 90, 180])
    labels = np.array([0, 0, 1, 2])  # classes 1 and 2 have no other member
    out = retrieval_metrics(emb, labels, recall_at=(1,), class_names=["x", "y", "z"])
    assert out["n_queries"] == 2 and out["n_skipped"] == 2
    assert out["precision_at_1"] == 1.0
    assert set(out["per_class"]) == {"x"}


def test_results_are_plain_python_and_json_serialisable():
    emb = random_unit(40, 8, seed=0)
    labels = np.arange(40) % 4
    out = retrieval_metrics(emb, labels)
    json.dumps(out)
    json.dumps(gallery_metrics(emb[:10], labels[:10], emb[10:], labels[10:]))
    draws = triplet_accuracy_draws(emb, [(np.array([0]), np.array([4]), np.array([1]))])
    json.dumps(draws)
    for value in [*out.values(), *out["per_class"]["0"].values(), *draws.values()]:
        if not isinstance(value, dict):
            assert type(value) in (float, int), (value, type(value))


def pml_metrics(emb: np.ndarray, labels: np.ndarray) -> dict:
    calc = AccuracyCalculator(
        include=("precision_at_1", "r_precision", "mean_average_precision_at_r"),
        k="max_bin_count",
        knn_func=CustomKNN(CosineSimilarity()),
        device=torch.device("cpu"),
    )
    return calc.get_accuracy(
        emb, labels, reference=emb, reference_labels=labels, ref_includes_query=True
    )


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_matches_pytorch_metric_learning(seed):
    # 300 points, 7 classes of unequal sizes (incl. one of 3 and one of 110) on a weak signal, so
    # the scores sit well between 0 and 1 where a definitional slip would show.
    rng = np.random.default_rng(seed)
    sizes = [110, 60, 45, 40, 25, 17, 3]
    labels = rng.permutation(np.repeat(np.arange(7), sizes))
    centres = rng.normal(size=(7, 16))
    emb = unit(centres[labels] * 0.6 + rng.normal(size=(300, 16)))
    ours = retrieval_metrics(emb, labels)
    ref = pml_metrics(emb, labels)
    assert 0.05 < ours["map_at_r"] < 0.95
    assert ours["precision_at_1"] == pytest.approx(ref["precision_at_1"], abs=1e-4)
    assert ours["r_precision"] == pytest.approx(ref["r_precision"], abs=1e-4)
    assert ours["map_at_r"] == pytest.approx(ref["mean_average_precision_at_r"], abs=1e-4)
    assert ours["n_queries"] == 300


def test_matches_pml_with_a_singleton_class():
    rng = np.random.default_rng(5)
    labels = np.array([0] * 20 + [1] * 12 + [2])  # class 2 cannot be answered: both exclude it
    emb = unit(rng.normal(size=(len(labels), 6)))
    ours = retrieval_metrics(emb, labels)
    ref = pml_metrics(emb, labels)
    assert ours["n_queries"] == 32 and ours["n_skipped"] == 1
    assert ours["precision_at_1"] == pytest.approx(ref["precision_at_1"], abs=1e-4)
    assert ours["map_at_r"] == pytest.approx(ref["mean_average_precision_at_r"], abs=1e-4)


def test_chunked_ranking_equals_unchunked(monkeypatch):
    import siamese_cv.evaluation.metrics as metrics

    emb = random_unit(90, 8, seed=3)
    labels = np.arange(90) % 6
    whole = retrieval_metrics(emb, labels)
    monkeypatch.setattr(metrics, "_SLAB_ELEMENTS", 7 * 90)  # 7 query rows per slab
    assert retrieval_metrics(emb, labels) == whole
    np.testing.assert_array_equal(
        metrics.neighbour_confusion(emb, labels, 6), neighbour_confusion(emb, labels, 6)
    )


def test_ties_rank_lower_index_first():
    # All rows identical: every ranking is one big tie, broken by index.
    emb = unit(np.ones((6, 3)))
    labels = np.array([1, 0, 0, 1, 1, 0])
    # Query 0 (class 1): others 1..5 in index order -> 1(0) 2(0) 3(1) 4(1) 5(0); R = 2.
    # Every other query ranks row 0 first. P@1: q0 miss (row 1 is class 0), q1 miss, q2 miss,
    # q3 hit, q4 hit, q5 miss -> 2/6.
    # R-precision of q0: top 2 = rows 1, 2 (class 0) -> 0; of q3 (class 1, R=2): rows 0, 1 -> 1/2.
    out = retrieval_metrics(emb, labels, recall_at=(1,))
    assert out["precision_at_1"] == pytest.approx(2 / 6)
    assert retrieval_metrics(emb, labels, recall_at=(1,)) == out
    nearest_class = neighbour_confusion(emb, labels, 2)
    # Row 0 -> row 1 (class 0); rows 1..5 -> row 0 (class 1).
    np.testing.assert_array_equal(nearest_class, [[0, 3], [1, 2]])


def test_triplet_accuracy_matches_hand_loop():
    rng = np.random.default_rng(7)
    emb = random_unit(50, 5, seed=7)
    a, p, n = (rng.integers(0, 50, size=200) for _ in range(3))
    correct = [
        np.dot(emb[i], emb[j]) > np.dot(emb[i], emb[k]) for i, j, k in zip(a, p, n, strict=True)
    ]
    expected = np.mean(correct)
    assert triplet_accuracy(emb, a, p, n) == pytest.approx(expected)


def test_triplet_accuracy_is_strict():
    emb = unit(np.ones((3, 2)))  # all similarities equal: no triplet is "correct"
    assert triplet_accuracy(emb, np.array([0]), np.array([1]), np.array([2])) == 0.0


def test_triplet_accuracy_draws_mean_std_and_sizes():
    emb = angles([0, 10, 90, 100])
    good = (np.array([0, 2]), np.array([1, 3]), np.array([2, 0]))  # both correct -> 1.0
    # (0,1,2) correct, (0,2,1) wrong, (2,3,0) correct, (1,0,3) correct -> 3/4
    most = (np.array([0, 0, 2, 1]), np.array([1, 2, 3, 0]), np.array([2, 1, 0, 3]))
    out = triplet_accuracy_draws(emb, [good, most])
    assert out["triplet_accuracy"] == pytest.approx(0.875)
    assert out["triplet_accuracy_std"] == pytest.approx(0.125)  # population std of 1.0, 0.75
    assert out["n_triplets"] == 3  # draws of 2 and 4 triplets
    assert out["n_draws"] == 2


def expected_by_enumeration(emb: np.ndarray, labels: np.ndarray) -> float:
    """Every (anchor, positive, negative) with the chance random_triplets gives it."""
    classes = sorted(set(labels.tolist()))
    per_anchor = []
    for a in range(len(labels)):
        positives = [p for p in range(len(labels)) if labels[p] == labels[a] and p != a]
        if not positives:
            continue
        total = 0.0
        for p in positives:
            for c in classes:
                if c == labels[a]:
                    continue
                members = np.flatnonzero(labels == c)
                wins = sum(float(emb[a] @ emb[p]) > float(emb[a] @ emb[n]) for n in members)
                total += wins / len(members) / (len(classes) - 1)
        per_anchor.append(total / len(positives))
    return float(np.mean(per_anchor))


@pytest.mark.parametrize("seed", [0, 1])
def test_expected_triplet_accuracy_weighs_every_triplet_as_the_draws_do(seed):
    rng = np.random.default_rng(seed)
    labels = np.repeat([0, 1, 2, 3], [2, 3, 7, 12])  # unbalanced: negatives are not uniform
    emb = unit(rng.normal(size=(len(labels), 3)) + 1.5 * np.eye(3)[labels % 3])
    exact = expected_triplet_accuracy(emb, labels)
    assert exact == pytest.approx(expected_by_enumeration(emb, labels), abs=1e-9)
    assert 0.5 < exact < 0.97  # a real mixture, neither random nor perfect
    # and it is what many draws converge to
    draws = [random_triplets(labels, np.random.default_rng(d)).T for d in range(3000)]
    mean = np.mean([triplet_accuracy(emb, *draw) for draw in draws])
    assert mean == pytest.approx(exact, abs=0.005)


def test_expected_triplet_accuracy_by_hand():
    # class 0 at 0 and 12 degrees, class 1 at 20 and 180
    emb, labels = angles([0, 12, 20, 180]), np.array([0, 0, 1, 1])
    # anchors: 0 wins both negatives (1.0); 12 loses to 20 (8 degrees, its positive is 12
    # away) and beats 180 (0.5); 20's positive is 160 away, both negatives nearer (0.0);
    # 180's positive is 160 away, both negatives further (1.0)
    assert expected_triplet_accuracy(emb, labels) == pytest.approx((1.0 + 0.5 + 0.0 + 1.0) / 4)
    assert expected_triplet_accuracy(angles([0, 1, 90, 91]), labels) == 1.0
    assert expected_triplet_accuracy(unit(np.ones((4, 2))), labels) == 0.0  # strict, collapsed
    with pytest.raises(ValueError, match="two classes"):
        expected_triplet_accuracy(angles([0, 1]), np.array([0, 0]))


def test_expected_triplet_accuracy_in_chunks_equals_one_slab(monkeypatch):
    from siamese_cv.evaluation import metrics

    emb, labels = random_unit(50, 8, 5), np.arange(50) % 4
    whole = expected_triplet_accuracy(emb, labels)
    monkeypatch.setattr(metrics, "_SLAB_ELEMENTS", 7 * 50)
    assert expected_triplet_accuracy(emb, labels) == pytest.approx(whole, abs=1e-12)


def test_gallery_metrics_match_brute_force():
    rng = np.random.default_rng(11)
    gallery = random_unit(120, 8, seed=11)
    g_lab = rng.integers(0, 5, size=120)
    query = random_unit(40, 8, seed=12)
    q_lab = rng.integers(0, 6, size=40)  # class 5 is not in the gallery: excluded
    ks = (1, 3, 10)
    out = gallery_metrics(query, q_lab, gallery, g_lab, recall_at=ks)
    counted = [i for i in range(40) if q_lab[i] in set(g_lab.tolist())]
    p1, rec = [], {k: [] for k in ks}
    for i in counted:
        sims = [float(np.dot(query[i], gallery[j])) for j in range(120)]
        order = sorted(range(120), key=lambda j: (-sims[j], j))
        p1.append(g_lab[order[0]] == q_lab[i])
        for k in ks:
            rec[k].append(any(g_lab[j] == q_lab[i] for j in order[:k]))
    assert out["n_queries"] == len(counted) < 40
    assert out["precision_at_1"] == pytest.approx(np.mean(p1))
    for k in ks:
        assert out[f"recall_at_{k}"] == pytest.approx(np.mean(rec[k]))


def test_neighbour_confusion_matches_brute_force():
    emb = random_unit(60, 4, seed=2)
    labels = np.arange(60) % 3
    sims = emb @ emb.T
    np.fill_diagonal(sims, -np.inf)
    expected = np.zeros((3, 3), dtype=np.int64)
    for i, j in enumerate(sims.argmax(axis=1)):
        expected[labels[i], labels[j]] += 1
    out = neighbour_confusion(emb, labels, 3)
    np.testing.assert_array_equal(out, expected)
    assert out.sum() == 60


def test_bad_inputs_say_what_to_do():
    emb = random_unit(10, 4, seed=0)
    labels = np.arange(10) % 2
    with pytest.raises(ValueError, match="L2-normalised"):
        retrieval_metrics(emb * 2, labels)
    bad = emb.copy()
    bad[3, 0] = np.nan
    with pytest.raises(UserError, match="NaN"):
        retrieval_metrics(bad, labels)
    with pytest.raises(ValueError, match="one label per row"):
        retrieval_metrics(emb, labels[:5])
    with pytest.raises(ValueError, match="at least two rows"):
        retrieval_metrics(emb, np.arange(10))
    with pytest.raises(ValueError, match="class_names"):
        retrieval_metrics(emb, labels, class_names=["only one"])
    with pytest.raises(ValueError, match="no triplets"):
        triplet_accuracy(emb, np.array([]), np.array([]), np.array([]))
    with pytest.raises(ValueError, match="same model"):
        gallery_metrics(emb, labels, random_unit(5, 3, seed=1), np.arange(5))


def test_all_zero_rows_are_accepted_as_normalised():
    # F.normalize leaves a zero vector at zero; it must not be mistaken for unnormalised input.
    emb = angles([0, 5, 90, 95])
    emb[3] = 0.0
    out = retrieval_metrics(emb, np.array([0, 0, 1, 1]), recall_at=(1,))
    assert out["n_queries"] == 4
