"""The real `dvc repro` on a tiny image folder: every stage, every output, no-op and partial reruns."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from pipeline_project import STAGES, copy_photos, make_project, ran, run

pytestmark = pytest.mark.slow


def gallery_photo(root: Path, row: int) -> tuple[str, Path]:
    """The id of gallery row `row` and the source photo it was made from."""
    photo_id = pq.read_table(root / "data/gallery/embeddings.parquet").column("id")[row].as_py()
    source = json.loads((root / "data/raw/source.json").read_text())
    return photo_id, Path(source["location"]) / photo_id


def search(root: Path, photo: Path, *options: str) -> list[dict]:
    return json.loads(run(root, "siamese-search", str(photo), "--json", *options).stdout)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, str]:
    """The tiny project after its first `dvc repro`, and its params.yaml then."""
    base = tmp_path_factory.mktemp("pipeline")
    root = make_project(base / "project", copy_photos(base / "photos", train=6, test=3, classes=3))
    first = run(root, "dvc", "repro")
    assert ran(first.stdout) == set(STAGES), first.stdout
    return root, (root / "params.yaml").read_text()


@pytest.fixture
def project(built) -> Path:
    """The tiny project at the tiny profile it was built with, outputs included, whatever an
    earlier test applied: each test starts there and applies the settings it needs itself.
    DVC's run cache brings the outputs back without running a stage again."""
    root, params = built
    if (root / "params.yaml").read_text() != params:
        (root / "params.yaml").write_text(params)
        run(root, "dvc", "repro")
    assert "up to date" in run(root, "dvc", "status").stdout
    return root


def test_every_output_is_written(project):
    for split in ("train", "validation", "test"):
        assert (project / f"data/raw/{split}.parquet").is_file()
        table = pq.read_table(project / f"data/processed/{split}.parquet")
        assert set(table.column_names) >= {"id", "label", "label_name", "image", "width", "height"}
        assert set(table.column("width").to_pylist()) == {64}
    assert (
        pq.read_table(project / "data/processed/train.parquet").num_rows == 12
    )  # 4 of 6 per class
    assert pq.read_table(project / "data/processed/validation.parquet").num_rows == 6
    assert json.loads((project / "data/raw/classes.json").read_text()) == [
        "apple_pie",
        "baby_back_ribs",
        "baklava",
    ]
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
    assert (
        gallery.num_rows == 12
        and vector_type.list_size == 512
        and str(vector_type.value_type) == "float"
    )
    meta = json.loads((project / "data/gallery/meta.json").read_text())
    assert meta["model_fingerprint"] == config["fingerprint"] and meta["dim"] == 512
    assert (project / "metrics/train/metrics.json").is_file()


def test_metrics_have_the_model_and_the_baseline(project):
    metrics = json.loads((project / "metrics/test.json").read_text())
    baseline = json.loads((project / "metrics/baseline.json").read_text())
    keys = {"triplet_acc", "triplet_std", "expected_acc", "precision@1", "r_precision", "map@r"}
    keys |= {"recall@10", "gallery_p@1", "copy_r@1", "copy_uap"}
    assert keys == set(metrics) == set(baseline)
    assert 0.0 <= metrics["triplet_acc"] <= 1.0
    shown = run(project, "dvc", "metrics", "show").stdout
    assert "metrics/test.json" in shown and "metrics/baseline.json" in shown


def test_dvc_plots_show_renders_every_training_curve(project, tmp_path):
    run(project, "dvc", "plots", "show", "-o", str(tmp_path / "rendered"))
    page = (tmp_path / "rendered/index.html").read_text(encoding="utf-8")
    for curve in ("train_loss", "val_map_at_r", "val_expected_triplet_accuracy"):
        assert curve in page, curve


def test_second_repro_does_nothing(project):
    out = run(project, "dvc", "repro").stdout
    assert ran(out) == set() and "up to date" in out


def test_search_finds_a_gallery_image_first(project):
    _, photo = gallery_photo(project, 5)
    hits = search(project, photo, "--top", "3", "--grid", "grid.png")
    assert hits[0]["id"].endswith(photo.name) and hits[0]["score"] > 0.99
    assert [h["rank"] for h in hits] == [1, 2, 3] and (project / "grid.png").stat().st_size > 0


def test_a_train_param_edit_reruns_only_what_it_touches(project):
    run(project, "siamese-params", "apply", "--set", "train.lr=0.0003")
    status = run(project, "dvc", "status").stdout
    assert "train:" in status
    assert not any(
        f"{s}:" in status for s in ("download", "preprocess", "sample_triplets", "baseline")
    )
    out = run(project, "dvc", "repro").stdout
    assert ran(out) == {"train", "export_gallery", "index_gallery", "evaluate"}, out


def test_a_code_edit_reruns_the_stages_that_run_that_code(project):
    """A comment added in models/ reaches every stage that imports it, and only those."""
    module = project / "src/siamese_cv/models/siamese.py"
    code = module.read_text()
    try:
        module.write_text(code + "# an edit\n")
        status = run(project, "dvc", "status").stdout
    finally:
        module.write_text(code)
    changed = {s for s in STAGES if f"{s}:" in status}
    touched = {"download", "features", "prefix_maps", "train", "baseline", "export_gallery"}
    touched |= {"copy_gallery"}
    assert changed == touched | {"evaluate"}, status


def test_an_ivf_index_is_built_once_by_its_stage_and_loaded_by_search(project):
    assert json.loads((project / "data/index/index.json").read_text())["kind"] == "exact"
    run(project, "siamese-params", "apply", "--set", "search.index=ivf")
    out = run(project, "dvc", "repro").stdout
    assert ran(out) == {"index_gallery"}, out  # the gallery is not embedded again
    meta = json.loads((project / "data/index/index.json").read_text())
    assert meta["kind"] == "ivf" and meta["ntotal"] == 12
    assert (project / "data/index/ivf.faiss").stat().st_size > 0
    first_id, photo = gallery_photo(project, 5)
    found = run(project, "siamese-search", str(photo), "--json")
    assert json.loads(found.stdout)[0]["id"] == first_id
    assert "building" not in found.stderr  # loaded, not rebuilt


def test_the_pooled_features_as_embedding_reach_every_later_stage(project):
    run(project, "siamese-params", "apply", "--set", "model.embed_from=pooled")
    out = run(project, "dvc", "repro").stdout
    assert ran(out) == {"train", "export_gallery", "index_gallery", "evaluate"}, out
    config = json.loads((project / "models/config.json").read_text())
    assert (config["head"], config["trained_head"], config["embed_from"]) == (
        "identity",
        "seed",
        "pooled",
    )
    assert config["embedding_dim"] == config["feature_dim"] != 512
    meta = json.loads((project / "data/gallery/meta.json").read_text())
    assert (
        meta["dim"] == config["feature_dim"] and meta["model_fingerprint"] == config["fingerprint"]
    )
    assert 0.0 < json.loads((project / "metrics/test.json").read_text())["map@r"] <= 1.0
    first_id, photo = gallery_photo(project, 2)
    assert search(project, photo)[0]["id"] == first_id


def test_inference_sizes_reach_the_gallery_and_a_search_query(project):
    import numpy as np
    import torch

    from siamese_cv.config.params import load_params
    from siamese_cv.inference.embedder import Embedder
    from siamese_cv.inference.hardware import resolve_precision
    from siamese_cv.models.siamese import Preprocessing, load_checkpoint

    run(project, "siamese-params", "apply", "--set", "model.inference_sizes=[64, 96]")
    out = run(project, "dvc", "repro").stdout
    # features and prefix_maps: stored at every inference size (nothing here: no frozen stage)
    stages = {"features", "prefix_maps", "train", "export_gallery", "index_gallery", "evaluate"}
    assert ran(out) == stages, out
    config = json.loads((project / "models/config.json").read_text())
    assert config["preprocessing"]["input_sizes"] == [64, 96]
    meta = json.loads((project / "data/gallery/meta.json").read_text())
    assert meta["preprocessing"]["input_sizes"] == [64, 96]
    # the gallery holds the two sizes' mean embedding of each stored photo, not the 64 px one
    model, _ = load_checkpoint(project / "models")
    prep = Preprocessing.from_dict(config["preprocessing"])
    photos = pq.read_table(project / "data/processed/train.parquet").column("image").to_pylist()
    gallery = pq.read_table(project / "data/gallery/embeddings.parquet").column("vector")
    gallery = np.array(gallery.to_pylist(), dtype=np.float32)
    export = load_params(project / "params.yaml").export  # embed as the stage did
    precision = resolve_precision(export.precision, torch.device("cpu"))
    both = Embedder(model, prep, precision, export.batch_size).embed_encoded(photos)
    stored_size = Embedder(model, replace(prep, input_sizes=()), precision, export.batch_size)
    stored_size = stored_size.embed_encoded(photos)
    np.testing.assert_allclose(gallery, both, atol=1e-6)
    assert np.abs(gallery - stored_size).max() > 1e-3
    # a query photo, read from its original file, is embedded the same way and finds itself
    first_id, photo = gallery_photo(project, 4)
    hits = search(project, photo)
    assert hits[0]["id"] == first_id and hits[0]["score"] > 0.99


def test_an_ensemble_trains_each_member_and_embeds_with_their_mean(project):
    import numpy as np
    import torch

    from siamese_cv.config.params import load_params
    from siamese_cv.inference.embedder import Embedder
    from siamese_cv.inference.hardware import resolve_precision
    from siamese_cv.models.ensemble import Ensemble
    from siamese_cv.models.siamese import Preprocessing, load_checkpoint
    from siamese_cv.training.validation import validation_scores

    settings = ("train.members=2", "model.inference_sizes=[[64], [96]]")
    run(project, "siamese-params", "apply", *[a for s in settings for a in ("--set", s)])
    out = run(project, "dvc", "repro").stdout
    assert ran(out) == {
        "sample_triplets", "features", "prefix_maps", "train", "export_gallery", "index_gallery",
        "evaluate",
    }, out  # fmt: skip
    params = load_params(project / "params.yaml")
    epochs = pq.read_table(project / "data/triplets/train.parquet").column("epoch").to_numpy()
    assert set(epochs) == set(range(2 * params.train.epochs))  # each member its own steps
    config = json.loads((project / "models/config.json").read_text())
    members = config["members"]
    assert [m["seed"] for m in members] == [params.train.seed, params.train.seed + 1]
    assert [m["input_sizes"] for m in members] == [[64], [96]]
    assert all(len(m["history"]) == params.train.epochs for m in members)
    assert config["preprocessing"]["input_sizes"] == []  # the ensemble resizes inside itself
    model, _ = load_checkpoint(project / "models")
    assert isinstance(model, Ensemble)
    first, second = model.members
    assert any(
        not torch.equal(a, b)
        for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True)
    )
    # the gallery is the mean of member 1 at 64 px and member 2 at 96 px
    prep = Preprocessing.from_dict(config["preprocessing"])
    export = load_params(project / "params.yaml").export
    precision = resolve_precision(export.precision, torch.device("cpu"))

    def embed(net, split, sizes=()):
        photos = pq.read_table(project / f"data/processed/{split}.parquet")
        at = replace(prep, input_sizes=sizes)
        embedder = Embedder(net, at, precision, export.batch_size)
        return embedder.embed_encoded(photos.column("image").to_pylist())

    one, two = embed(first, "train", (64,)), embed(second, "train", (96,))
    gallery = pq.read_table(project / "data/gallery/embeddings.parquet").column("vector")
    gallery = np.array(gallery.to_pylist(), dtype=np.float32)
    np.testing.assert_allclose(
        gallery, (one + two) / np.linalg.norm(one + two, axis=1)[:, None], atol=1e-5
    )
    assert np.abs(one - two).max() > 1e-3
    # the ensemble's validation scores are the saved ensemble's, and DVCLive has every member
    val = pq.read_table(project / "data/processed/validation.parquet").column("label").to_numpy()
    triplets = pq.read_table(project / "data/triplets/validation.parquet")
    triplets = np.stack(
        [triplets.column(c).to_numpy() for c in ("anchor", "positive", "negative")], 1
    )
    scores = validation_scores(torch.from_numpy(embed(model, "validation")), val, triplets)
    for key, value in scores.items():
        assert config["best"][key] == pytest.approx(value, abs=1e-5), key
    logged = json.loads((project / "metrics/train/metrics.json").read_text())
    assert logged["val_map_at_r"] == pytest.approx(config["best"]["val_map_at_r"])
    # the members' epochs follow one another on the curves, which dvc plots renders
    curve = (project / "metrics/train/plots/metrics/val_map_at_r.tsv").read_text().split()[2:]
    assert [float(v) for v in curve[1::2]] == pytest.approx(
        [h["val_map_at_r"] for m in members for h in m["history"]]
    )
    assert curve[::2] == [str(step) for step in range(2 * params.train.epochs)]
    shown = run(project, "dvc", "plots", "show", "-o", str(project.parent / "plots"))
    assert "failed" not in shown.stdout + shown.stderr, shown.stderr
    first_id, photo = gallery_photo(project, 4)
    hits = search(project, photo)
    assert hits[0]["id"] == first_id and hits[0]["score"] > 0.99
    # the train script run by hand after adding a member, before sample_triplets: one clear line
    three = ("train.members=3", "model.inference_sizes=[[64], [96], [80]]")
    run(project, "siamese-params", "apply", *[a for s in three for a in ("--set", s)])
    try:
        failed = run(project, "python", "stages/train.py", check=False)
    finally:
        run(project, "siamese-params", "apply", *[a for s in settings for a in ("--set", s)])
    assert failed.returncode != 0 and "Traceback" not in failed.stderr
    assert "data/triplets: 4 epochs of steps, but train.members x train.epochs = 6" in (
        failed.stderr
    )
    assert run(project, "dvc", "status").stdout.strip() == "Data and pipelines are up to date."


def test_forced_reruns_give_identical_metrics(project):
    run(project, "dvc", "repro", "--force", "-s", "train")
    run(project, "dvc", "repro")
    first = (project / "metrics/test.json").read_bytes()
    run(project, "dvc", "repro", "--force", "-s", "train")
    run(project, "dvc", "repro")
    assert (project / "metrics/test.json").read_bytes() == first


def test_push_then_pull_on_a_fresh_clone_needs_no_stage(project, tmp_path):
    remote = tmp_path / "remote"
    run(project, "dvc", "remote", "add", "-f", "-d", "test", str(remote))
    run(project, "git", "add", "-A")
    run(project, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "results")
    run(project, "dvc", "push")
    clone = tmp_path / "clone"
    run(tmp_path, "git", "clone", "-q", str(project), str(clone))
    run(clone, "dvc", "pull")
    status = run(clone, "dvc", "status").stdout
    assert "up to date" in status, status
    out = run(clone, "dvc", "repro").stdout
    assert ran(out) == set(), out
    first_id, photo = gallery_photo(clone, 0)
    assert search(clone, photo)[0]["id"] == first_id
