"""dvc.yaml lists every project file and params key each stage reads, proven by running the stages.

Every stage script runs, in pipeline order, on the tiny project of tests/pipeline_project.py,
under tests/trace_stage.py (which records the modules it imports and the params keys it reads)
while this process watches the project tree with inotify for every file any process opens: the
native readers (pyarrow's parquet, safetensors, FAISS) and child processes included, which
Python's audit hooks do not see. Then each stage's `deps` must cover every module and data file
it touched and its `params` every key it read; and each entry must be used, so none is stale.
"""

from __future__ import annotations

import ast
import ctypes
import json
import os
import select
import struct
import subprocess
import sys
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from pipeline_project import ROOT, STAGES, copy_photos, env, make_project

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify is Linux's"),
]

TRACER = Path(__file__).with_name("trace_stage.py")
IGNORED_DIRS = {".git", ".dvc"}  # DVC's and git's own files, not the stages' inputs
# params.yaml is audited key by key; DVCLive reads the ignore files of git and DVC
IGNORED_FILES = ["params.yaml", ".gitignore", ".dvcignore"]
IN_OPEN, IN_Q_OVERFLOW, IN_ISDIR = 0x20, 0x4000, 0x40000000
EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len (then the name)


@dataclass(frozen=True)
class Used:
    """What one stage run touched: project-relative files (modules as their .py) and params keys."""

    files: frozenset[str]
    keys: frozenset[str]


class OpenWatch:
    """Every file under `root` that any process opens between `start` and `stop` (Linux inotify).

    Directories made after `start` are not watched: what a stage reads there it wrote itself.
    """

    def __init__(self, root: Path):
        self.root = root
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self.folders: dict[int, Path] = {}
        for folder, subdirs, _ in os.walk(root):
            subdirs[:] = [d for d in subdirs if d not in IGNORED_DIRS]
            wd = self.libc.inotify_add_watch(self.fd, os.fsencode(folder), IN_OPEN)
            if wd < 0:
                raise OSError(ctypes.get_errno(), f"inotify_add_watch {folder}")
            self.folders[wd] = Path(folder)
        self.opened: set[Path] = set()
        self.overflowed = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while True:
            stopping = self._stop.is_set()
            ready, _, _ = select.select([self.fd], [], [], 0.05)
            if ready:
                self._parse(os.read(self.fd, 1 << 16))
            elif stopping:  # one last empty poll after stop(): the queue is drained
                return

    def _parse(self, data: bytes) -> None:
        offset = 0
        while offset < len(data):
            wd, mask, _, length = EVENT.unpack_from(data, offset)
            name = data[offset + EVENT.size : offset + EVENT.size + length].rstrip(b"\0")
            offset += EVENT.size + length
            if mask & IN_Q_OVERFLOW:
                self.overflowed = True
            elif mask & IN_OPEN and not mask & IN_ISDIR and name and wd in self.folders:
                self.opened.add(self.folders[wd] / os.fsdecode(name))

    def stop(self) -> set[Path]:
        self._stop.set()
        self._thread.join()
        os.close(self.fd)
        assert not self.overflowed, "inotify's queue overflowed: some opens were not seen"
        return self.opened


def project_files(root: Path) -> set[Path]:
    files = set()
    for folder, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in IGNORED_DIRS]
        files.update(Path(folder) / n for n in names)
    return files


def as_source(path: Path) -> Path:
    """A compiled module (`pkg/__pycache__/mod.cpython-311.pyc`) as its source file."""
    if path.parent.name == "__pycache__":
        return path.parent.parent / (path.name.split(".")[0] + ".py")
    return path


def is_package_marker(path: Path) -> bool:
    """An `__init__.py` of only a docstring and constants (`__version__`): it runs no code."""
    if path.name != "__init__.py":
        return False
    body = ast.parse(path.read_text(encoding="utf-8")).body
    return all(
        isinstance(node, ast.Expr | ast.Assign) and isinstance(node.value, ast.Constant)
        for node in body
    )


def trace_stage(root: Path, stage: str, report: Path) -> Used:
    """Run `stages/<stage>.py` in `root` under the tracer and the open watch."""
    before = project_files(root)
    watch = OpenWatch(root)
    try:
        result = subprocess.run(
            [sys.executable, str(TRACER), str(report), f"stages/{stage}.py"],
            cwd=root,
            env={**env(), "PYTHONPATH": str(root / "src")},  # the project's copy of the package
            capture_output=True,
            text=True,
            timeout=900,
        )
    finally:
        opened = watch.stop()
    assert result.returncode == 0, f"{stage} failed:\n{result.stdout}\n{result.stderr}"
    traced = json.loads(report.read_text())
    modules = {Path(m) for m in traced["modules"]}
    touched = {as_source(p) for p in opened | modules}
    files = {
        p.relative_to(root).as_posix()
        for p in touched
        if p in before and p.is_relative_to(root) and not is_package_marker(p)
    }
    return Used(frozenset(files), frozenset(traced["params"]))


def covered(name: str, entries: Iterable[str], sep: str = "/") -> bool:
    """Whether a path is one of `entries` or lies in one of them (`data/raw` covers
    `data/raw/train.parquet`); with `sep="."`, the same for params keys (`train` covers `train.lr`)."""
    return any(name == e or name.startswith(e.rstrip(sep) + sep) for e in entries)


def outs_of(stage: dict) -> list[str]:
    listed = [*stage.get("outs", []), *stage.get("metrics", []), *stage.get("plots", [])]
    return [next(iter(o)) if isinstance(o, dict) else o for o in listed]


def audit(dvc: dict, stage: str, used: Used, external: Iterable[str] = ()) -> list[str]:
    """What is wrong with `stage`'s entry in the parsed dvc.yaml, given what its run used.

    `external` are files a params value names (an image folder source, a weights file): their
    params are their dependency, since dvc.yaml cannot name a path that params choose.
    """
    spec = dvc["stages"][stage]
    deps = [str(d) for d in spec.get("deps", [])]
    params = [p for p in spec.get("params", []) if isinstance(p, str)]
    skip = [*outs_of(spec), *IGNORED_FILES, *external]
    files = [f for f in sorted(used.files) if not covered(f, skip)]
    problems = [
        f"{stage}: reads {f}, which its deps do not cover" for f in files if not covered(f, deps)
    ]
    problems += [
        f"{stage}: reads params key {k}, which its params do not cover"
        for k in sorted(used.keys)
        if not covered(k, params, ".")
    ]
    problems += [
        f"{stage}: deps list {d}, which it does not read"
        for d in deps
        if not any(covered(f, [d]) for f in files)
    ]
    problems += [
        f"{stage}: params list {p}, which it does not read"
        for p in params
        if not any(covered(k, [p], ".") for k in used.keys)
    ]
    return problems


@pytest.fixture(scope="module")
def traced(tmp_path_factory) -> tuple[Path, dict[str, Used]]:
    """The tiny project after every stage ran once, in order, and what each one used."""
    base = tmp_path_factory.mktemp("dependencies")
    # a frozen, augmented prefix, so the features stage computes (and reads) everything it can
    cached = {"train.freeze": "1", "train.augment": "true", "train.augment_views": "2"}
    photos = copy_photos(base / "photos", train=6, test=3, classes=3)
    root = make_project(base / "project", photos, cached)
    return root, {s: trace_stage(root, s, base / f"{s}.json") for s in STAGES}


def external_inputs(root: Path) -> list[str]:
    from siamese_cv.config.params import load_params

    params = load_params(root / "params.yaml", check=False)
    return [params.data.source, params.model.weights]


def test_dvc_yaml_lists_every_file_and_params_key_each_stage_reads(traced):
    root, used = traced
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    assert list(dvc["stages"]) == STAGES
    problems = [p for s in STAGES for p in audit(dvc, s, used[s], external_inputs(root))]
    assert not problems, "dvc.yaml is out of step with the stages:\n" + "\n".join(problems)


@pytest.mark.parametrize(
    ("stage", "target"),
    [
        ("export_gallery", "src/siamese_cv/models/siamese.py"),
        ("baseline", "src/siamese_cv/inference/hardware.py"),
        ("preprocess", "src/siamese_cv/data/parquet.py"),
        ("baseline", "data/raw/classes.json"),
        ("evaluate", "data/processed/train.parquet"),
        ("index_gallery", "stages/index_gallery.py"),
        ("features", "evaluate.engine"),
        ("train", "data/features/card.json"),
        ("evaluate", "evaluate.recall_at"),
    ],
)
def test_the_audit_reports_a_dependency_removed_from_dvc_yaml(traced, stage, target):
    """Remove every entry that covers `target` from a copy of dvc.yaml in the tiny project."""
    root, used = traced
    dvc = yaml.safe_load((root / "dvc.yaml").read_text())
    spec = dvc["stages"][stage]
    kind, sep = ("deps", "/") if "/" in target else ("params", ".")
    assert covered(target, spec[kind], sep), "the target is listed to begin with"
    assert not audit(dvc, stage, used[stage], external_inputs(root))
    spec[kind] = [e for e in spec[kind] if not covered(target, [e], sep)]
    edited = root / "dvc.edited.yaml"
    edited.write_text(yaml.safe_dump(dvc, sort_keys=False))
    problems = audit(yaml.safe_load(edited.read_text()), stage, used[stage], external_inputs(root))
    what = "params key " if kind == "params" else ""
    assert f"{stage}: reads {what}{target}, which its {kind} do not cover" in problems, problems


def test_the_audit_reports_a_stale_entry(traced):
    root, used = traced
    dvc = yaml.safe_load((root / "dvc.yaml").read_text())
    dvc["stages"]["index_gallery"]["deps"].append("data/triplets")
    dvc["stages"]["index_gallery"]["params"].append("train.lr")
    assert audit(dvc, "index_gallery", used["index_gallery"], external_inputs(root)) == [
        "index_gallery: deps list data/triplets, which it does not read",
        "index_gallery: params list train.lr, which it does not read",
    ]
