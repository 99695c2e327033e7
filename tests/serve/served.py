"""A real tiny project for the serving tests, built once per test module.

A module's tests that only read it share `served_project`; a test that changes outputs works
on its own copy (`project_copy`), so no test sees another's leftovers. (Not a conftest.py: the
tests import `conftest` by name, and two of them would collide.)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
from pipeline_project import copy_photos, make_project, run

from siamese_cv.serve import Settings, create_app


def build_project(tmp_path_factory, **overrides: str) -> Path:
    """A tiny project of 3 classes (12 gallery photos) with its gallery, index and copies."""
    base = tmp_path_factory.mktemp("serve")
    photos = copy_photos(base / "photos", train=6, test=3, classes=3)
    root = make_project(base / "project", photos, overrides)
    run(root, "dvc", "repro", "index_gallery", "copy_gallery")
    return root


def copy_project(root: Path, dest: Path) -> Path:
    """A private copy of a built project (its git repository and DVC cache included)."""
    shutil.copytree(root, dest, symlinks=True)
    return dest


def gallery_rows(root: Path) -> list[dict]:
    """id, split and label_name of every gallery row, in order."""
    table = pq.read_table(
        root / "data/gallery/embeddings.parquet", columns=["id", "split", "label_name"]
    )
    return table.to_pylist()


def source_photo(root: Path, photo_id: str) -> Path:
    """The original photo (before preprocess) a gallery id was made from."""
    source = json.loads((root / "data/raw/source.json").read_text())
    return Path(source["location"]) / photo_id


def stored_image(root: Path, photo_id: str) -> bytes:
    """The bytes data/processed holds for a photo (what export_gallery embedded)."""
    for path in sorted((root / "data/processed").glob("*.parquet")):
        table = pq.read_table(path, columns=["id", "image"])
        ids = table.column("id").to_pylist()
        if photo_id in ids:
            return table.column("image")[ids.index(photo_id)].as_py()
    raise KeyError(photo_id)


def app_for(root: Path, **settings):
    """The app for `root`; live reloading off unless `reload_interval_s` is given."""
    return create_app(Settings(project_dir=root, **{"reload_interval_s": 0, **settings}))
