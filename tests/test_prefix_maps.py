"""The prefix_maps stage: the frozen prefix's maps of the gallery, test photos and copies, stored
once, so that export_gallery and evaluate run only the trained rest after a training edit."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from pipeline_project import apply_params, copy_photos, make_project, ran, run, status_after

from siamese_cv.inference.embedder import Embedder
from siamese_cv.inference.hardware import Precision
from siamese_cv.inference.prefix_maps import (
    CARD,
    PhotoSet,
    prefix_fingerprint,
    tail_embedder,
    write_prefix_maps,
)
from siamese_cv.models.siamese import Preprocessing, load_checkpoint
from siamese_cv.retrieval.gallery import load_gallery

pytestmark = pytest.mark.slow

# a frozen prefix, two members at their own sizes, fp32 so both paths compute alike
FROZEN = {
    "train.freeze": "1", "train.members": "2", "model.inference_sizes": "[[64], [96]]",
    "evaluate.precision": "fp32", "export.precision": "fp32", "copies.whitening": "4",
}  # fmt: skip
# every key the stage lists, each with a valid new value: each edit must rerun it
MAP_EDITS = {
    "preprocess.image_size": "72", "preprocess.resize": "shorter_side_crop",
    "model.pooling": "gem", "model.inference_sizes": "[[64], [80]]", "train.freeze": "2",
    "export.splits": "[train, validation]", "export.batch_size": "4", "export.precision": "bf16",
    "export.engine": "onnxruntime", "copies.queries": "3", "copies.seed": "7",
}  # fmt: skip
TRAINING_EDITS = {"train.lr": "0.0003", "train.epochs": "3", "train.optimizer": "sgd"}
FP32 = Precision(torch.device("cpu"), None, channels_last=True)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    base = tmp_path_factory.mktemp("prefix_maps")
    photos = copy_photos(base / "photos", train=6, test=3, classes=3)
    root = make_project(base / "project", photos, FROZEN)
    run(root, "dvc", "repro")
    return root


def test_the_stage_stores_each_set_at_each_size(project):
    card = json.loads((project / "data/prefix_maps" / CARD).read_text())
    assert card["stored"] and card["sizes"] == [64, 96]
    counts = {name: s["count"] for name, s in card["sets"].items()}
    assert counts["test"] == 9 and counts["copies"] == 4 * 12, counts
    assert (
        counts["gallery"] == json.loads((project / "data/gallery/meta.json").read_text())["count"]
    )
    for name, count in counts.items():
        small = np.load(project / f"data/prefix_maps/{name}_64.npy", mmap_mode="r")
        large = np.load(project / f"data/prefix_maps/{name}_96.npy", mmap_mode="r")
        assert small.dtype == np.float32 and len(small) == len(large) == count
        assert large.shape[2] > small.shape[2]  # the map at 96 px is larger


def test_the_gallery_from_the_maps_is_the_gallery_from_the_images(project):
    model, config = load_checkpoint(project / "models")
    prep = Preprocessing.from_dict(config["preprocessing"])
    from_images = Embedder(model, prep, FP32, 8).embed_parquet(
        project / "data/processed/train.parquet"
    )
    exported = load_gallery(project / "data/gallery").vectors
    cosine = (from_images * exported).sum(axis=1)
    assert cosine.min() > 0.99999, cosine.min()


# what each stage that reads the maps writes: the same from the maps as from the images
OUTPUTS = {
    "baseline": "metrics/baseline.json",
    "copy_gallery": "data/copies/meta.json",
    "export_gallery": "data/gallery/meta.json",
    "evaluate": "metrics/test.json",
}


def vectors_of(project, stage):
    if stage in ("copy_gallery", "export_gallery"):
        return load_gallery(project / OUTPUTS[stage].rsplit("/", 1)[0]).vectors
    return None


@pytest.mark.parametrize("stage", list(OUTPUTS))
def test_each_stage_gives_from_the_maps_what_it_gives_from_the_images(project, tmp_path, stage):
    maps = run(project, "python", f"stages/{stage}.py")
    assert f"{stage}: the frozen prefix's maps are stored in data/prefix_maps" in (
        maps.stdout + maps.stderr
    )
    assert "embedding the images" not in maps.stdout + maps.stderr
    stored = json.loads((project / OUTPUTS[stage]).read_text())
    vectors = vectors_of(project, stage)
    shutil.move(project / "data/prefix_maps", tmp_path / "maps")
    try:
        (project / "data/prefix_maps").mkdir()
        (project / "data/prefix_maps" / CARD).write_text('{"stored": false, "why": "test"}')
        images = run(project, "python", f"stages/{stage}.py")
        from_images = json.loads((project / OUTPUTS[stage]).read_text())
        again = vectors_of(project, stage)
    finally:
        shutil.rmtree(project / "data/prefix_maps")
        shutil.move(tmp_path / "maps", project / "data/prefix_maps")
        run(project, "dvc", "repro", "-f", "-s", stage)  # its outputs (some uncached) as locked
    assert (
        f"{stage}: embedding the images (the stored prefix maps do not apply: test)"
        in images.stdout + images.stderr
    )
    if vectors is None:
        assert from_images == pytest.approx(stored)
    else:
        # copy_gallery's whitening is fitted on these vectors: its margin moves in the 7th digit
        margins = [m.get("rule", {}).pop("margin", 0.0) for m in (from_images, stored)]
        assert margins[0] == pytest.approx(margins[1], abs=1e-6)
        assert from_images == stored
        assert np.abs(again - vectors).max() < 1e-5


@pytest.mark.parametrize(("key", "value"), list(MAP_EDITS.items()))
def test_an_edit_of_what_changes_the_maps_reruns_the_stage(project, key, value):
    assert "prefix_maps" in status_after(project, {key: value}), key


@pytest.mark.parametrize(("key", "value"), list(TRAINING_EDITS.items()))
def test_an_edit_of_training_alone_does_not_rerun_the_stage(project, key, value):
    status = status_after(project, {key: value})
    assert "prefix_maps" not in status and "train" in status, (key, status)


def test_a_train_lr_edit_embeds_from_the_stored_maps(project):
    try:
        apply_params(project, {"train.lr": "0.0003"})
        result = run(project, "dvc", "repro")
        out = result.stdout + result.stderr
        assert ran(out) == {"train", "export_gallery", "index_gallery", "evaluate"}, out
        for stage in ("export_gallery", "evaluate"):
            assert f"{stage}: the frozen prefix's maps are stored in data/prefix_maps" in out
        assert "evaluate: copies: 48 photos from the stored prefix maps" in out
        assert "evaluate: the copy queries' descriptors stored by copy_gallery" in out
        assert "copy descriptor" not in out  # the frozen descriptor runs on nothing again
        assert "embedding the images" not in out
    finally:
        run(project, "git", "checkout", "params.yaml")
        run(project, "dvc", "checkout", "--force")


def test_copy_gallery_stores_the_copy_queries_that_evaluate_would_embed(project):
    """The frozen descriptor's vectors of the copies and test photos, stored once: evaluate
    scores the same from them as from embedding them itself."""
    meta_path = project / "data/copies/meta.json"
    meta = json.loads(meta_path.read_text())
    about = meta["test_queries"]
    assert about["queries"] == 4 and set(about) == {"gallery_ids", "test_ids", "queries", "seed"}
    copies = np.load(project / "data/copies/test_copies.npy", allow_pickle=False)
    photos = np.load(project / "data/copies/test_photos.npy", allow_pickle=False)
    assert copies.shape == (4 * 12, meta["dim"]) and photos.shape == (9, meta["dim"])
    assert np.allclose(np.linalg.norm(copies, axis=1), 1, atol=1e-5)
    stored = json.loads((project / "metrics/test.json").read_text())
    try:
        meta_path.chmod(0o644)
        meta_path.write_text(json.dumps({k: v for k, v in meta.items() if k != "test_queries"}))
        result = run(project, "python", "stages/evaluate.py")
        embedded = json.loads((project / "metrics/test.json").read_text())
    finally:
        run(project, "dvc", "checkout", "--force")
    out = result.stdout + result.stderr
    assert "evaluate: embedding the copy queries with the copy descriptor (none stored)" in out
    assert "evaluate: copy descriptor: copies: 48 photos from the stored prefix maps" in out
    assert embedded == pytest.approx(stored)
    assert embedded["copy_r@1"] == stored["copy_r@1"]


def test_copy_gallery_whitens_the_frozen_descriptor_fitted_on_the_gallery(project):
    """copies.whitening 4 on the 18-photo gallery: the stored vectors are the unwhitened
    descriptor of the images through the stored whitening, and search embeds queries alike."""
    from siamese_cv.retrieval.copies import copy_embedder, copy_embedder_of, load_copy_gallery

    gallery = load_gallery(project / "data/gallery")
    copies = load_copy_gallery(project / "data/copies", gallery.ids)
    assert copies.meta["whitening"] == {"dims": 4, "photos": len(gallery.ids), "shrinkage": 0.1}
    assert copies.vectors.shape == (len(gallery.ids), 4) and copies.whitening.dims == 4
    assert "PCA-whitened to 4 dims" in copies.rule.descriptor
    prep = Preprocessing.from_dict(copies.meta["preprocessing"])
    plain, _, _ = copy_embedder(project / "models/pretrained", prep, "torch", "fp32", 8)
    train = project / "data/processed/train.parquet"
    from_images = copies.whitening.apply(plain.embed_parquet(train))
    assert (from_images * copies.vectors).sum(axis=1).min() > 0.99999
    queries = copy_embedder_of(copies, project / "models/pretrained").embed_parquet(train)
    assert (queries * copies.vectors).sum(axis=1).min() > 0.99999


def test_a_model_with_another_prefix_embeds_the_images(project):
    card_path = project / "data/prefix_maps" / CARD
    card = card_path.read_text()
    try:
        card_path.chmod(0o644)
        card_path.write_text(card.replace('"prefix_fingerprint": "', '"prefix_fingerprint": "x'))
        result = run(project, "python", "stages/export_gallery.py")
    finally:
        run(project, "dvc", "checkout", "--force")
    assert (
        "export_gallery: embedding the images (the stored prefix maps do not apply: the "
        "model's frozen prefix is not the one the maps were made with)"
        in result.stdout
        + result.stderr
    )


def gallery_photos(project) -> PhotoSet:
    images = pq.read_table(project / "data/processed/train.parquet", columns=["image"])
    return PhotoSet.stored("gallery", images.column("image").to_pylist(), {})


def frozen_prefix(model, config):
    member = model.members[0]
    member.freeze(config["train"]["freeze"])
    return member.split_frozen()[0]


def test_the_onnxruntime_engine_gives_the_images_vectors(project, tmp_path):
    model, config = load_checkpoint(project / "models")
    prep = Preprocessing.from_dict(config["preprocessing"])
    prefix = frozen_prefix(model, config)
    args = (prep, [64, 96], [gallery_photos(project)], FP32, 8, "onnxruntime", {})
    write_prefix_maps(tmp_path / "maps", prefix, prefix_fingerprint(prefix), *args)
    tail = tail_embedder(tmp_path / "maps", model, config, FP32, 8, "onnxruntime", "test")
    assert tail is not None and tail.precision_name == "fp32"
    from_maps = tail.embed("gallery", "test: gallery")
    engine = Embedder(model, prep, FP32, 8, engine="onnxruntime")
    from_images = engine.embed_parquet(project / "data/processed/train.parquet")
    assert from_maps.shape == from_images.shape
    assert (from_maps * from_images).sum(axis=1).min() > 0.99999
    # made by onnxruntime, they do not stand in for the torch engine's vectors
    assert tail_embedder(tmp_path / "maps", model, config, FP32, 8, "torch", "test") is None


def test_maps_over_the_budget_are_not_stored(project, tmp_path, monkeypatch, caplog):
    from siamese_cv.inference import prefix_maps

    model, config = load_checkpoint(project / "models")
    prefix = frozen_prefix(model, config)
    monkeypatch.setattr(prefix_maps, "BUDGET_BYTES", 1000)
    prep = Preprocessing.from_dict(config["preprocessing"])
    card = write_prefix_maps(
        tmp_path / "maps", prefix, "f", prep, [64], [gallery_photos(project)], FP32, 8, "torch", {}
    )
    assert not card["stored"] and "over the 0 GiB budget" in card["why"]
    assert [p.name for p in (tmp_path / "maps").iterdir()] == [CARD]
    with caplog.at_level("INFO"):
        assert tail_embedder(tmp_path / "maps", model, config, FP32, 8, "torch", "x") is None
    assert "the stored prefix maps do not apply" in caplog.text and "budget" in caplog.text


def test_nothing_frozen_writes_only_a_marker(tmp_path):
    photos = copy_photos(tmp_path / "photos", train=4, test=2, classes=2)
    root = make_project(tmp_path / "project", photos)  # params.yaml's train.freeze: none
    result = run(root, "dvc", "repro", "prefix_maps")
    assert (
        "prefix_maps: nothing to store (train.freeze: none: nothing is frozen)"
        in result.stdout + result.stderr
    )
    assert [p.name for p in (root / "data/prefix_maps").iterdir()] == [CARD]
