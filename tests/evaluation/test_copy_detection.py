"""Copy detection: the edits, DISC21's µAP, and copies of real photos found by a real network."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from conftest import food10_photos
from PIL import Image

from siamese_cv.evaluation.copy_detection import (
    copy_detection_metrics,
    micro_average_precision,
    score_copies,
)
from siamese_cv.evaluation.copy_edits import EDITS, choose_sources, make_copies


def _isc_uap(scores: np.ndarray, correct: np.ndarray, positives: int) -> float:
    """The ISC 2021 evaluation's µAP, written out as it is: sum of recall steps x precision."""
    order = sorted(range(len(scores)), key=lambda i: (scores[i], not correct[i]))[::-1]
    right = correct[order]
    recalls = np.cumsum(right) / positives
    precisions = np.cumsum(right) / np.arange(1, len(right) + 1)
    return float(((recalls - np.concatenate([[0], recalls[:-1]])) * precisions).sum())


def test_uap_by_hand_and_ties_ranked_wrong_first() -> None:
    # right at ranks 1 and 3 of 3 copies: (1/1 + 2/3) / 3
    assert micro_average_precision([0.9, 0.8, 0.7], [True, False, True], 3) == pytest.approx(5 / 9)
    # equal scores: the wrong one ranks first, so the right one has precision 1/2
    assert micro_average_precision([0.5, 0.5], [True, False], 1) == pytest.approx(0.5)
    assert micro_average_precision([0.5, 0.5], [False, True], 1) == pytest.approx(0.5)


def test_uap_equals_the_isc_formula_on_random_predictions() -> None:
    rng = np.random.default_rng(3)
    scores = np.round(rng.random(400), 2)  # rounded: many ties
    correct = rng.random(400) < 0.3
    positives = int(correct.sum()) + 17  # some copies were never predicted
    assert micro_average_precision(scores, correct, positives) == pytest.approx(
        _isc_uap(scores, correct, positives), abs=1e-12
    )


def _unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def test_copies_near_their_source_are_found_and_others_are_not() -> None:
    rng = np.random.default_rng(0)
    gallery = _unit(rng.normal(size=(50, 16)))
    sources = np.array([3, 7, 11, 20])
    copies = _unit(gallery[sources] + 0.05 * rng.normal(size=(4, 16)))
    wrong = _unit(gallery[[4]] + 0.3 * rng.normal(size=(1, 16)))  # a copy of 4, said to be of 5
    distractors = _unit(rng.normal(size=(30, 16)))
    result = copy_detection_metrics(
        np.concatenate([copies, wrong]),
        [*sources, 5],
        ["noise"] * 4 + ["mislabelled"],
        distractors,
        gallery,
    )
    noise, mislabelled = result["per_edit"]["noise"], result["per_edit"]["mislabelled"]
    assert noise["recall@1"] == 1.0 and noise["margin"] > 0.5 and noise["copy_score"] > 0.99
    assert mislabelled["recall@1"] == 0.0 and mislabelled["margin"] < 0
    assert result["recall@1"] == pytest.approx(0.8)
    # the 4 found copies outscore every other prediction: precision 1 at each, and the fifth
    # copy's original is never predicted
    assert noise["uap"] == pytest.approx(1.0)
    assert result["uap"] == pytest.approx(4 / 5)


def _photos(per_class: int = 3) -> list[bytes]:
    files = food10_photos("train", per_class, classes=3)
    return [path.read_bytes() for paths in files.values() for path in paths]


def test_every_edit_changes_the_photo_the_same_way_for_the_same_seed() -> None:
    photos = _photos(1)
    first, again = make_copies(photos, [0, 2], seed=5), make_copies(photos, [0, 2], seed=5)
    assert [c.encoded for c in first] == [c.encoded for c in again]
    assert [c.edit for c in first[: len(EDITS)]] == list(EDITS)
    original = np.asarray(Image.open(io.BytesIO(photos[0])).convert("RGB"), np.float32)
    for copy in first[: len(EDITS)]:
        image = Image.open(io.BytesIO(copy.encoded))
        assert image.format == "JPEG" and image.mode == "RGB"
        pixels = np.asarray(image, np.float32)
        changed = pixels.shape != original.shape or np.abs(pixels - original).mean() > 2.0
        assert changed, copy.edit
    other_seed = make_copies(photos, [0], seed=6, edits=["crop 60%"])[0]
    assert other_seed.encoded != first[list(EDITS).index("crop 60%")].encoded
    # a subset of the edits draws each edit as the full set does
    subset = make_copies(photos, [2], seed=5, edits=["pad 15%"])[0]
    assert subset.encoded == first[len(EDITS) + list(EDITS).index("pad 15%")].encoded
    with pytest.raises(ValueError, match="unknown edit 'sepia'"):
        make_copies(photos, [0], seed=5, edits=["sepia"])


def test_sources_are_seeded_distinct_rows() -> None:
    chosen = choose_sources(20, 100, seed=1)
    assert len(set(chosen)) == 20 and list(chosen) == sorted(chosen)
    assert list(chosen) == list(choose_sources(20, 100, seed=1))
    assert list(chosen) != list(choose_sources(20, 100, seed=2))
    assert list(choose_sources(20, 5, seed=1)) == [0, 1, 2, 3, 4]


def test_pretrained_features_find_copies_of_real_photos() -> None:
    """Frozen ImageNet Lite0 on 9 food10 photos of 3 classes: every edit's copies, embedded as
    search embeds a query, find their original (the edits are copies, not new photos), and beat
    a same-class photo clearly."""
    from siamese_cv.inference.embedder import Embedder
    from siamese_cv.inference.hardware import resolve_precision
    from siamese_cv.models.backbones import get_backbone_spec
    from siamese_cv.models.siamese import Preprocessing

    spec = get_backbone_spec("efficientnet_lite0")
    backbone = spec.build()
    backbone.module.load_state_dict(spec.fetch_imagenet())
    prep = Preprocessing(224, "stretch", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    embedder = Embedder(backbone.module, prep, resolve_precision("fp32", torch.device("cpu")), 32)
    photos = _photos(3)
    distractors = [p.read_bytes() for p in food10_photos("test", 2, classes=3)["apple_pie"]]
    result = score_copies(
        embedder,
        photos,
        embedder.embed_encoded(photos),
        embedder.embed_encoded(distractors),
        count=len(photos),
        seed=0,
    )
    assert result is not None and set(result["per_edit"]) == set(EDITS)
    assert result["recall@1"] >= 0.95, result
    assert result["uap"] >= 0.9 and result["margin"] > 0.05, result
    assert score_copies(embedder, photos, np.zeros((9, 4)), np.zeros((0, 4)), 0, 0) is None
