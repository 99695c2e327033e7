"""Build a tiny, real DVC project of this pipeline in a temp folder, and run commands in it.

Shared by the tests that run `dvc repro` or the stage scripts as subprocesses: the project gets
this checkout's dvc.yaml, params.yaml, stages/, src/ and profiles/, a git repository, `dvc init`,
the `tiny` backbone with a saved weights file, and params overridden for a few dozen 64 px images.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import torch
from conftest import food10_photos
from safetensors.torch import save_file

from siamese_cv.models.backbones import get_backbone_spec

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
STAGES = [
    "download",
    "preprocess",
    "sample_triplets",
    "features",
    "prefix_maps",
    "train",
    "baseline",
    "export_gallery",
    "copy_gallery",
    "index_gallery",
    "evaluate",
]
# Everything but data.source: the tiny backbone, 64 px images, 2 short epochs, no worker processes.
TINY_OVERRIDES = {
    "data.val_fraction": "0.34", "model.backbone": "tiny", "model.weights": "tiny.safetensors",
    "preprocess.image_size": "64", "train.epochs": "2", "train.batch_size": "4",
    "train.workers": "0", "triplets.test_draws": "3", "evaluate.batch_size": "8",
    "export.batch_size": "8", "copies.queries": "4",
    "train.precision": "fp32",  # auto times a step: on a busy CPU two runs may choose apart
}  # fmt: skip


def env() -> dict[str, str]:
    """The environment of every subprocess: this venv first on PATH, no DVC analytics."""
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}


def run(
    cwd: Path, *args: str, check: bool = True, timeout: float = 900
) -> subprocess.CompletedProcess:
    result = subprocess.run(
        args, cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def ran(output: str) -> set[str]:
    """The stages a `dvc repro` output says it ran."""
    return {s for s in STAGES if f"Running stage '{s}'" in output}


def copy_photos(dest: Path, train: int = 6, test: int = 3, classes: int = 3) -> Path:
    """An image folder source of real food10 photos: dest/{train,test}/<class>/*.jpg (copies)."""
    for split, n in (("train", train), ("test", test)):
        for cls, files in food10_photos(split, n, classes=classes).items():
            (dest / split / cls).mkdir(parents=True, exist_ok=True)
            for f in files:
                shutil.copy(f, dest / split / cls / f.name)
    return dest


def make_project(root: Path, source: Path, overrides: Mapping[str, str] | None = None) -> Path:
    """A committed git + DVC project at `root` reading `source`, TINY_OVERRIDES and `overrides`."""
    root.mkdir(parents=True, exist_ok=True)
    for name in ("dvc.yaml", "params.yaml", ".gitignore"):
        shutil.copy(ROOT / name, root / name)
    for folder in ("stages", "src", "profiles"):
        shutil.copytree(
            ROOT / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
        )
    torch.manual_seed(0)
    save_file(get_backbone_spec("tiny").build().module.state_dict(), str(root / "tiny.safetensors"))
    run(root, "git", "init", "-q")
    run(root, "dvc", "init", "-q")
    run(root, "dvc", "config", "core.analytics", "false")
    settings = {"data.source": str(source), **TINY_OVERRIDES, **(overrides or {})}
    apply_params(root, settings)
    commit(root)
    return root


def apply_params(root: Path, settings: Mapping[str, str]) -> subprocess.CompletedProcess:
    """`siamese-params apply --set key=value ...` in `root` (checked: an invalid value fails)."""
    return run(
        root,
        "siamese-params",
        "apply",
        *[a for k, v in settings.items() for a in ("--set", f"{k}={v}")],
    )


def stage_status(root: Path) -> set[str]:
    """The stages `dvc status` names as changed."""
    status = run(root, "dvc", "status").stdout
    return {line.split(":")[0] for line in status.splitlines() if line and not line[0].isspace()}


def status_after(root: Path, settings: Mapping[str, str]) -> set[str]:
    """The stages `dvc status` names after `settings` are applied; params.yaml is restored."""
    try:
        apply_params(root, settings)
        return stage_status(root)
    finally:
        run(root, "git", "checkout", "params.yaml")


def commit(root: Path) -> None:
    run(root, "git", "add", "-A")
    run(root, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "state")
