"""The real `dvc repro` on small collections: few photos a class, a class alone, no validation."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from pipeline_project import STAGES, copy_photos, make_project, ran, run

pytestmark = pytest.mark.slow


def labels(root: Path, split: str) -> list[str]:
    return pq.read_table(root / f"data/processed/{split}.parquet").column("label_name").to_pylist()


def test_ten_photos_a_class_without_val_folder(tmp_path):
    """The 10% slice lends 2 photos a class, every class trains; P x K fits the small split."""
    photos = copy_photos(tmp_path / "photos", train=10, test=3, classes=3)
    overrides = {
        "data.val_fraction": "0.1",
        "triplets.sampler": "pk",
        "triplets.classes_per_batch": "4",
        "triplets.samples_per_class": "10",
    }
    root = make_project(tmp_path / "project", photos, overrides)
    result = run(root, "dvc", "repro")
    assert ran(result.stdout) == set(STAGES), result.stdout
    validation = labels(root, "validation")
    assert {c: validation.count(c) for c in set(validation)} == dict.fromkeys(set(validation), 2)
    assert len(set(validation)) == 3 and len(labels(root, "train")) == 24
    report = json.loads((root / "metrics/data_report.json").read_text())
    assert report["validation"] == {
        "from": "train",
        "val_fraction": 0.1,
        "photos": dict.fromkeys(sorted(set(validation)), 2),
        "classes_without": [],
    }
    assert report["warnings"] == [] and report["problems"] == []
    log = result.stdout + result.stderr
    assert "3 training classes, fewer than triplets.classes_per_batch 4" in log
    assert "3 classes have fewer than triplets.samples_per_class 10 training images" in log
    steps = pq.read_table(root / "data/triplets/train.parquet")
    assert sorted(set(labels(root, "train")[r] for r in steps.column("row").to_pylist())) == sorted(
        set(validation)
    )


def test_a_class_with_one_test_photo_and_no_validation(tmp_path):
    """The single photo is no query (counted), the run goes on; val_fraction 0 keeps the last epoch."""
    photos = copy_photos(tmp_path / "photos", train=6, test=3, classes=3)
    alone = sorted((photos / "test").iterdir())[1]
    for extra in sorted(alone.iterdir())[1:]:
        extra.unlink()
    root = make_project(tmp_path / "project", photos, {"data.val_fraction": "0"})
    result = run(root, "dvc", "repro")
    assert ran(result.stdout) == set(STAGES), result.stdout
    report = json.loads((root / "metrics/data_report.json").read_text())
    assert report["problems"] == [] and report["skipped_queries"]["test"] == 1
    assert [w for w in report["warnings"] if alone.name in w] == [
        f"split 'test': class {alone.name!r} has only 1 readable image: it is left out as an "
        "anchor and a query there, and stays a negative and a gallery photo"
    ]
    assert (
        report["validation"]["photos"] == {} and len(report["validation"]["classes_without"]) == 3
    )
    log = result.stdout + result.stderr
    assert "1 test queries skipped in the retrieval metrics" in log
    assert "kept epoch 2 of 2 (the last: no validation split to choose by)" in log
    anchors = pq.read_table(root / "data/triplets/test.parquet").column("anchor").to_pylist()
    alone_row = labels(root, "test").index(alone.name)
    assert alone_row not in anchors and len(anchors) == 3 * 6
    config = json.loads((root / "models/config.json").read_text())
    assert config["best_epoch"] == 2
    assert len(json.loads((root / "metrics/test.json").read_text())) == 10
    assert "copies.margin auto needs validation photos (data.val_fraction); using 0.1" in log
    rule = json.loads((root / "data/copies/meta.json").read_text())["rule"]
    assert rule["margin"] == 0.1


def test_a_split_with_no_class_of_two_stops_in_one_line(tmp_path):
    photos = copy_photos(tmp_path / "photos", train=6, test=1, classes=3)
    root = make_project(tmp_path / "project", photos)
    result = run(root, "dvc", "repro", check=False)
    assert result.returncode != 0
    assert "Traceback" not in result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if "no class has 2" in line]
    assert len(lines) == 1 and "split 'test'" in lines[0] and "add a second image" in lines[0]
    assert "Running stage 'sample_triplets'" not in result.stdout
