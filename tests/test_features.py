"""The features stage: the frozen prefix's outputs, stored once, read by train, rerun only when
what changes them is edited."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from pipeline_project import apply_params, copy_photos, make_project, ran, run, status_after
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

# the offline profile's shape on the tiny project: a frozen prefix, cached augmented views,
# P x K batches, a proxy loss, a moving average and two members at two sizes, stored in fp32
# (auto stores bf16 on CPUs with bf16 units)
CACHED = {
    "evaluate.precision": "fp32",
    "train.freeze": "1", "train.augment": "true", "train.augment_views": "3",
    "triplets.sampler": "pk", "triplets.classes_per_batch": "3", "triplets.samples_per_class": "2",
    "train.loss": "proxy_anchor", "train.margin": "0.1", "train.ema": "0.9",
    "train.members": "2", "model.inference_sizes": "[64, 96]",
}  # fmt: skip

# every key the stage lists, each with a valid new value: each edit must rerun it
FEATURE_EDITS = {
    "preprocess.image_size": "72", "preprocess.resize": "shorter_side_crop",
    "model.pooling": "gem", "model.inference_sizes": "[64, 80]", "train.freeze": "2",
    "train.augment": "false", "train.augment_views": "2", "train.seed": "7",
    "train.device": "cpu", "evaluate.batch_size": "4", "evaluate.precision": "bf16",
    "evaluate.engine": "onnxruntime",
}  # fmt: skip
# what only changes training: train reruns, the features stage does not
TRAINING_EDITS = {
    "train.lr": "0.0003", "train.loss": "triplet_cosine", "train.epochs": "3",
    "train.ema": "0.0", "train.members": "1", "train.optimizer": "sgd", "train.margin": "0.3",
}  # fmt: skip


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    base = tmp_path_factory.mktemp("features")
    photos = copy_photos(base / "photos", train=6, test=3, classes=3)
    root = make_project(base / "project", photos, CACHED)
    run(root, "dvc", "repro")
    return root


def test_the_stage_stores_every_view_and_validation_size_memory_mapped(project):
    card = json.loads((project / "data/features/card.json").read_text())
    assert card["cached"] and card["views"] == 3 and card["validation_sizes"] == [64, 96]
    train = np.load(project / "data/features/train.npy", mmap_mode="r")
    assert isinstance(train, np.memmap) and train.dtype == np.float32
    assert train.shape[:2] == (3, card["train_images"]) == (3, 12)
    assert not np.array_equal(train[0], train[1])  # the views are differently augmented
    for size in (64, 96):
        val = np.load(project / f"data/features/validation_{size}.npy", mmap_mode="r")
        assert val.shape[0] == card["validation_images"] == 6
    on_disk = sum(f.stat().st_size for f in (project / "data/features").glob("*.npy"))
    assert card["bytes"] == on_disk


def test_training_from_stored_features_gives_the_in_memory_cache_weights(project, tmp_path):
    stored = load_file(project / "models/model.safetensors")
    config = json.loads((project / "models/config.json").read_text())
    assert config["cached_features"] and config["cached_views"] == 3
    code = (
        "from siamese_cv.config.params import load_params\n"
        "from siamese_cv.training.run import train_and_save\n"
        "train_and_save(load_params(), stored_features=False)\n"
    )
    try:
        subprocess.run(
            [sys.executable, "-c", code], cwd=project, check=True, capture_output=True, text=True
        )
        in_memory = load_file(project / "models/model.safetensors")
    finally:
        run(project, "dvc", "checkout", "--force", "train")
    assert stored.keys() == in_memory.keys()
    assert all(torch.equal(stored[k], in_memory[k]) for k in stored)


@pytest.mark.parametrize(("key", "value"), list(FEATURE_EDITS.items()))
def test_an_edit_of_what_changes_the_features_reruns_the_stage(project, key, value):
    assert "features" in status_after(project, {key: value}), key


@pytest.mark.parametrize(("key", "value"), list(TRAINING_EDITS.items()))
def test_an_edit_of_training_alone_reruns_train_not_the_features(project, key, value):
    status = status_after(project, {key: value})
    assert "features" not in status and "train" in status, (key, status)


def test_a_train_lr_edit_reruns_train_and_what_follows_only(project):
    try:
        apply_params(project, {"train.lr": "0.0003"})
        result = run(project, "dvc", "repro")
        out = result.stdout
        assert ran(out) == {"train", "export_gallery", "index_gallery", "evaluate"}, out
        assert "read the frozen prefix's outputs from data/features" in out + result.stderr
    finally:
        run(project, "git", "checkout", "params.yaml")
        run(project, "dvc", "checkout", "--force")


def test_train_by_hand_after_a_features_edit_names_the_stage_to_rerun(project):
    try:
        apply_params(project, {"train.augment_views": "2"})
        result = run(project, "python", "stages/train.py", check=False)
    finally:
        run(project, "git", "checkout", "params.yaml")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert (
        "data/features: made for other settings: asked_views 3 (needed 2); run `dvc repro "
        "features`" in result.stderr
    )


def test_nothing_frozen_writes_only_a_marker(tmp_path):
    photos = copy_photos(tmp_path / "photos", train=4, test=2, classes=2)
    root = make_project(tmp_path / "project", photos)  # params.yaml's train.freeze: none
    result = run(root, "dvc", "repro", "features")
    assert (
        "features: nothing to cache (train.freeze: none: nothing is frozen)"
        in result.stdout + result.stderr
    )
    assert [p.name for p in (root / "data/features").iterdir()] == ["card.json"]
