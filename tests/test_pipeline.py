"""The real `dvc repro` on a tiny image folder: every stage, every output, no-op and partial reruns."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import save_file

from siamese_cv.models.backbones import get_backbone_spec

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
STAGES = ["download", "preprocess", "sample_triplets", "train", "baseline", "export_gallery", "evaluate"]


def run(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def ran(output: str) -> set[str]:
    return {s for s in STAGES if f"Running stage '{s}'" in output}


@pytest.fixture(scope="module")
def project(tmp_path_factory, request) -> Path:
    from conftest import food10_photos

    root = tmp_path_factory.mktemp("project")
    for name in ("dvc.yaml", "params.yaml", ".gitignore"):
        shutil.copy(ROOT / name, root / name)
    for folder in ("stages", "src", "profiles"):
        shutil.copytree(ROOT / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    photos = root.parent / "photos"
    for split, n in (("train", 6), ("test", 3)):
        for cls, files in food10_photos(split, n, classes=3).items():
            (photos / split / cls).mkdir(parents=True, exist_ok=True)
            for f in files:
                shutil.copy(f, photos / split / cls / f.name)
    torch.manual_seed(0)
    save_file(get_backbone_spec("tiny").build().module.state_dict(), str(root / "tiny.safetensors"))
    run(root, "git", "init", "-q")
    run(root, "dvc", "init", "-q")
    run(root, "dvc", "config", "core.analytics", "false")
    overrides = {"data.source": str(photos), "data.val_fraction": "0.34", "model.backbone": "tiny",
                 "model.weights": "tiny.safetensors", "preprocess.image_size": "64", "train.epochs": "2",
                 "train.batch_size": "4", "train.workers": "0", "triplets.test_draws": "3",
                 "evaluate.batch_size": "8", "export.batch_size": "8"}
    run(root, "siamese-params", "apply", *[a for k, v in overrides.items() for a in ("--set", f"{k}={v}")])
    run(root, "git", "add", "-A")
    run(root, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    first = run(root, "dvc", "repro")
    request.config.cache.set("pipeline/first_run", first.stdout[-3000:])
    assert ran(first.stdout) == set(STAGES), first.stdout
    return root


def test_every_output_is_written(project):
    for split in ("train", "validation", "test"):
        assert (project / f"data/raw/{split}.parquet").is_file()
        table = pq.read_table(project / f"data/processed/{split}.parquet")
        assert set(table.column_names) >= {"id", "label", "label_name", "image", "width", "height"}
        assert set(table.column("width").to_pylist()) == {64}
    assert pq.read_table(project / "data/processed/train.parquet").num_rows == 12  # 4 of 6 per class
    assert pq.read_table(project / "data/processed/validation.parquet").num_rows == 6
    assert json.loads((project / "data/raw/classes.json").read_text()) == ["apple_pie", "baby_back_ribs", "baklava"]
    report = json.loads((project / "metrics/data_report.json").read_text())
    assert report["kept"]["total"] == 27 and report["skipped"]["total"] == 0
    triplets = pq.read_table(project / "data/triplets/test.parquet")
    assert triplets.num_rows == 3 * 9 and set(triplets.column("draw").to_pylist()) == {0, 1, 2}
    config = json.loads((project / "models/config.json").read_text())
    assert config["backbone"] == "tiny" and config["preprocessing"]["image_size"] == 64
    assert config["pretrained"]["weights"] == "tiny.safetensors" and len(config["history"]) == 2
    assert (project / "models/model.safetensors").stat().st_size > 0
    gallery = pq.read_table(project / "data/gallery/embeddings.parquet")
    vector_type = gallery.schema.field("vector").type
    assert gallery.num_rows == 12 and vector_type.list_size == 512 and str(vector_type.value_type) == "float"
    meta = json.loads((project / "data/gallery/meta.json").read_text())
    assert meta["model_fingerprint"] == config["fingerprint"] and meta["dim"] == 512
    assert (project / "metrics/train/metrics.json").is_file()


def test_metrics_have_the_model_and_the_baseline(project):
    metrics = json.loads((project / "metrics/test.json").read_text())
    keys = {"triplet_accuracy", "triplet_accuracy_std", "n_triplets", "precision_at_1", "recall_at_1",
            "recall_at_5", "recall_at_10", "r_precision", "map_at_r", "gallery_precision_at_1",
            "gallery_recall_at_5", "per_class"}
    assert keys <= set(metrics) and keys <= set(metrics["baseline"])
    assert metrics["n_triplets"] == 9 and 0.0 <= metrics["triplet_accuracy"] <= 1.0
    shown = run(project, "dvc", "metrics", "show").stdout
    assert "triplet_accuracy" in shown and "baseline.triplet_accuracy" in shown


def test_second_repro_does_nothing(project):
    out = run(project, "dvc", "repro").stdout
    assert ran(out) == set() and "up to date" in out


def test_search_finds_a_gallery_image_first(project):
    source = json.loads((project / "data/raw/source.json").read_text())
    first_id = pq.read_table(project / "data/gallery/embeddings.parquet").column("id")[5].as_py()
    photo = Path(source["location"]) / first_id
    out = run(project, "siamese-search", str(photo), "--top", "3", "--json", "--grid", "grid.png").stdout
    hits = json.loads(out)
    assert hits[0]["id"].endswith(photo.name) and hits[0]["score"] > 0.99
    assert [h["rank"] for h in hits] == [1, 2, 3] and (project / "grid.png").stat().st_size > 0


def test_a_train_param_edit_reruns_only_what_it_touches(project):
    run(project, "siamese-params", "apply", "--set", "train.lr=0.0003")
    status = run(project, "dvc", "status").stdout
    assert "train:" in status
    assert not any(f"{s}:" in status for s in ("download", "preprocess", "sample_triplets", "baseline"))
    out = run(project, "dvc", "repro").stdout
    assert ran(out) == {"train", "export_gallery", "evaluate"}, out


def test_forced_reruns_give_identical_metrics(project):
    run(project, "dvc", "repro", "--force", "-s", "train")
    run(project, "dvc", "repro")
    first = (project / "metrics/test.json").read_bytes()
    run(project, "dvc", "repro", "--force", "-s", "train")
    run(project, "dvc", "repro")
    assert (project / "metrics/test.json").read_bytes() == first
