"""The metrics files keep the headline figures under the same short keys for the model and the
baseline, the per-class figures go to a table with one row per class, and on a real project
`dvc metrics show` prints both as rows that fit a 160-column terminal."""

from __future__ import annotations

import csv
import json
import subprocess

import numpy as np
import pytest
from pipeline_project import copy_photos, env, make_project, run

from siamese_cv.evaluation import scoring
from siamese_cv.evaluation.scoring import (
    PER_CLASS_COLUMNS,
    per_class_table,
    score_embeddings,
    write_scores,
)

HEADLINE = {
    "triplet_acc",
    "triplet_std",
    "expected_acc",
    "precision@1",
    "r_precision",
    "map@r",
    "recall@5",
    "recall@10",
    "gallery_p@1",
}
CLASSES = ["apple_pie", "pizza", "sushi"]


def clustered(per_class: int, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalised rows around one random centre per class of CLASSES, labels in class order."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(CLASSES), 16))
    labels = np.repeat(np.arange(len(CLASSES)), per_class)
    rows = centres[labels] + noise * rng.normal(size=(len(labels), 16))
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32), labels


def draws(labels: np.ndarray, n: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """`n` seeded draws: every row an anchor, a random other row of its class, one of another."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        rows = np.arange(len(labels))
        pos = [rng.choice(np.flatnonzero((labels == labels[a]) & (rows != a))) for a in rows]
        neg = [rng.choice(np.flatnonzero(labels != labels[a])) for a in rows]
        out.append((rows, np.array(pos), np.array(neg)))
    return out


def evaluation(noise: float, recall_at=(1, 5, 10)) -> dict:
    """score_embeddings of a synthetic test split (4 images a class) against a gallery (5 a class)."""
    emb, labels = clustered(9, noise, seed=1)
    test_rows = np.arange(len(labels)) % 9 < 4
    test = scoring.TestSet(labels[test_rows], CLASSES, draws(labels[test_rows], 3))
    return score_embeddings(
        emb[test_rows], test, emb[~test_rows], labels[~test_rows], list(recall_at)
    )


def read_table(path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        assert tuple(reader.fieldnames or ()) == PER_CLASS_COLUMNS
        return list(reader)


def test_the_model_and_the_baseline_files_hold_the_same_headline_keys(tmp_path):
    model, baseline = evaluation(noise=0.2), evaluation(noise=3.0)
    written = write_scores(model, tmp_path / "test.json")
    write_scores(baseline, tmp_path / "baseline.json")
    test_json = json.loads((tmp_path / "test.json").read_text())
    baseline_json = json.loads((tmp_path / "baseline.json").read_text())
    assert set(test_json) == set(baseline_json) == HEADLINE
    assert test_json == written
    # each short key holds its own figure, not a neighbour's
    for short, full in [
        ("triplet_acc", "triplet_accuracy"),
        ("triplet_std", "triplet_accuracy_std"),
        ("expected_acc", "expected_triplet_accuracy"),
        ("precision@1", "precision_at_1"),
        ("r_precision", "r_precision"),
        ("map@r", "map_at_r"),
        ("recall@5", "recall_at_5"),
        ("recall@10", "recall_at_10"),
        ("gallery_p@1", "gallery_precision_at_1"),
    ]:
        assert test_json[short] == model[full] and baseline_json[short] == baseline[full], short
    # well-separated clusters against noise: the files tell the two models apart
    assert test_json["map@r"] > baseline_json["map@r"] + 0.2
    assert all(0.0 <= v <= 1.0 for v in [*test_json.values(), *baseline_json.values()])


def test_the_per_class_table_has_one_row_per_class(tmp_path):
    scores = evaluation(noise=1.0)
    write_scores(scores, tmp_path / "test.json")
    table = per_class_table(tmp_path / "test.json")
    assert table == tmp_path / "per_class" / "test.tsv"
    rows = read_table(table)
    assert [r["class"] for r in rows] == CLASSES
    for row in rows:
        expected = scores["per_class"][row["class"]]
        assert int(row["queries"]) == expected["n"] == 4
        assert float(row["precision_at_1"]) == pytest.approx(expected["precision_at_1"], abs=1e-6)
        assert float(row["map_at_r"]) == pytest.approx(expected["map_at_r"], abs=1e-6)
    assert len({r["map_at_r"] for r in rows}) > 1  # real per-class figures, not one value copied
    assert not [p.name for p in tmp_path.rglob("*") if p.name.startswith(".tmp-")]


def test_recall_follows_evaluate_recall_at_without_recall_at_1(tmp_path):
    write_scores(evaluation(noise=0.5, recall_at=(1, 3)), tmp_path / "test.json")
    keys = set(json.loads((tmp_path / "test.json").read_text()))
    assert keys == HEADLINE - {"recall@5", "recall@10"} | {"recall@3"}


@pytest.mark.slow
def test_dvc_metrics_show_fits_160_columns_with_a_row_each(tmp_path):
    root = make_project(
        tmp_path / "project", copy_photos(tmp_path / "photos", train=6, test=3, classes=3)
    )
    run(root, "dvc", "repro")
    for command in (["metrics", "show"], ["metrics", "diff", "--all"]):
        shown = unwrapped(root, "dvc", *command)
        assert max(map(len, shown.splitlines())) <= 160, shown
    lines = unwrapped(root, "dvc", "metrics", "show").splitlines()
    pipeline_keys = HEADLINE - {"recall@5"} | {"copy_r@1", "copy_uap"}  # params.yaml: [1, 10]
    assert set(lines[0].split()) == {"Path", *pipeline_keys}, lines[0]
    assert sorted(line.split()[0] for line in lines[1:]) == [
        "metrics/baseline.json",
        "metrics/test.json",
    ]
    for name in ("test", "baseline"):
        rows = read_table(root / "metrics/per_class" / f"{name}.tsv")
        assert sorted(r["class"] for r in rows) == sorted(
            json.loads((root / "data/raw/classes.json").read_text())
        )
    plots = json.loads(run(root, "dvc", "plots", "show", "--json").stdout)["data"]
    for metric in ("precision@1", "MAP@R"):
        (plot,) = [p for title, p in plots.items() if title.startswith(f"Per-class {metric} ")]
        values = plot[0]["content"]["data"]["values"]
        assert sorted({v["filename"] for v in values}) == ["baseline.tsv", "test.tsv"]
        assert len(values) == 2 * 3 and plot[0]["content"]["mark"]["type"] == "bar"
    (plot,) = [p for title, p in plots.items() if title.startswith("Copy recall@1 per edit")]
    values = plot[0]["content"]["data"]["values"]
    edits = {v["edit"] for v in values}
    assert len(edits) >= 10 and len(values) == 2 * len(edits)  # every edit, model and baseline
    assert all(0.0 <= float(v["recall_at_1"]) <= 1.0 for v in values)


def unwrapped(root, *args: str) -> str:
    """The output of a command told the terminal is 1000 columns wide, so nothing wraps."""
    return subprocess.run(
        args, cwd=root, env={**env(), "COLUMNS": "1000"}, capture_output=True, text=True, check=True
    ).stdout
