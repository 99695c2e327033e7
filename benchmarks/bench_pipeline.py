"""The pipeline as a whole: `dvc repro` from empty, a no-op `dvc repro`, and the rerun after an edit.

A fresh `git clone` of this repository's HEAD in a temporary folder gets the offline profile on
food10 (`make repro-offline` without the set-up: the clone uses this checkout's .venv, with its
own `src/` first on the path). Three `dvc repro` runs are timed there:

1. from empty (the baseline the other two are compared with);
2. straight after, with nothing changed: DVC should only hash and skip;
3. after `train.lr` is halved: DVC should rerun train and what depends on it (export_gallery,
   index_gallery, evaluate) and skip download, preprocess, sample_triplets and baseline.

Time to target, from run 1's `models/config.json`: how far into the train stage validation
MAP@R first came within 0.01 of the best it reached, against the whole stage.

Each stage prints "<stage>: done in X s", which gives the per-stage split of run 1. With --quick
the data are 30 photos per class and split, and training is 2 epochs: it checks that the
benchmark runs, not how fast the pipeline is.

Run: python benchmarks/bench_pipeline.py [--quick] [--keep] [--no-edit]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import yaml
from _common import FOOD10, ROOT, Row, print_table

STAGE_DONE = re.compile(r"^(\w+): done in ([\d.]+) s$", re.MULTILINE)
RAN = re.compile(r"Running stage '(\w+)'")


def environment(clone: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{ROOT / '.venv' / 'bin'}{os.pathsep}{env['PATH']}"
    env["PYTHONPATH"] = str(clone / "src")
    # "from empty" includes the ONNX exports: a cache of the clone's own, filled by run 1
    env["SIAMESE_CV_CACHE"] = str(clone.parent / "cache")
    return env


def timed(command: Sequence[str], clone: Path) -> tuple[float, str]:
    start = time.perf_counter()
    result = subprocess.run(
        command, cwd=clone, env=environment(clone), capture_output=True, text=True, check=False
    )
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        sys.stderr.write(result.stdout + result.stderr)
        raise SystemExit(f"{' '.join(command)} failed with status {result.returncode}")
    return seconds, result.stdout + result.stderr


def quick_source(folder: Path, per_class: int) -> Path:
    """A small ImageFolder of symlinks to the first photos of each food10 class and split."""
    for split in ("train", "test"):
        for class_dir in sorted((FOOD10 / split).iterdir()):
            if class_dir.is_dir():
                target = folder / split / class_dir.name
                target.mkdir(parents=True)
                for photo in sorted(class_dir.glob("*.jpg"))[:per_class]:
                    (target / photo.name).symlink_to(photo)
    return folder


def _metrics_line(title: str, metrics: dict) -> str:
    return f"{title}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())


def time_to_target(config: dict, train_stage_s: float, within: float = 0.01) -> list[dict]:
    """When training got there, for each member of the model (one unless `train.members` > 1):
    seconds into the train stage at which its validation MAP@R first came within `within` of its
    best (the target), and at which its kept epoch ended.

    The stage's seconds before the first epoch (loading, filling the frozen-prefix cache) count:
    they are part of the wait, and so do the earlier members' epochs. `history[i]["seconds"]` is
    cumulative from the member's first epoch.
    """
    before = train_stage_s - config["train_seconds"]
    reached = []
    for member in config.get("members", [config]):
        history = member["history"]
        best = max(h["val_map_at_r"] for h in history)
        hit = next(h for h in history if h["val_map_at_r"] >= best - within)
        kept = next(h for h in history if h["epoch"] == member["best_epoch"])
        reached.append(
            {
                "setup_s": before,
                "target": best - within,
                "target_epoch": hit["epoch"],
                "target_s": before + hit["seconds"],
                "kept_epoch": kept["epoch"],
                "kept_s": before + kept["seconds"],
                "epochs": len(history),
            }
        )
        before += member["train_seconds"]
    return reached


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="30 photos a class and split, 2 epochs"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary clone")
    parser.add_argument(
        "--no-edit", action="store_true", help="skip run 3 (the rerun after the train.lr edit)"
    )
    args = parser.parse_args(argv)
    if not (FOOD10 / "train").is_dir():
        raise SystemExit(f"food10 not found at {FOOD10}; set SIAMESE_CV_FOOD10 to its folder")
    work = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    try:
        clone = work / "repo"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        source = quick_source(work / "photos", 30) if args.quick else FOOD10
        overrides = ["--set", f"data.source={source}"]
        if args.quick:
            overrides += ["--set", "train.epochs=2"]
        timed(["siamese-params", "apply", "profiles/offline.yaml", *overrides], clone)

        full_s, full_log = timed(["dvc", "repro"], clone)
        first = json.loads((clone / "metrics" / "test.json").read_text())
        baseline = json.loads((clone / "metrics" / "baseline.json").read_text())
        train_s = float(dict(STAGE_DONE.findall(full_log))["train"])
        reached = time_to_target(
            json.loads((clone / "models" / "config.json").read_text()), train_s
        )
        noop_s, noop_log = timed(["dvc", "repro"], clone)
        lr = float(yaml.safe_load((clone / "params.yaml").read_text())["train"]["lr"])
        edit = None
        if not args.no_edit:
            timed(["siamese-params", "apply", "--set", f"train.lr={lr / 2}"], clone)
            edit_s, edit_log = timed(["dvc", "repro"], clone)
            edit = edit_s, edit_log, json.loads((clone / "metrics" / "test.json").read_text())
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    rows = [Row("no-op dvc repro vs from empty", noop_s, full_s, "s", higher_is_better=False)]
    rows.append(
        Row(
            "train: time to target vs the whole train stage",
            reached[-1]["target_s"],
            train_s,
            "s",
            higher_is_better=False,
        )
    )
    if edit:
        rows.append(
            Row(
                "rerun after train.lr edit vs from empty",
                edit[0],
                full_s,
                "s",
                higher_is_better=False,
            )
        )
    stages = ", ".join(f"{name} {float(s):.1f} s" for name, s in STAGE_DONE.findall(full_log))
    notes = [
        f"from empty: {full_s:.1f} s in all ({'30 photos a class and split, 2 epochs' if args.quick else 'food10, offline profile'}); stages: {stages}",
        f"no-op: ran {RAN.findall(noop_log) or 'nothing'}",
        *(
            f"time to target{f' (member {k})' if len(reached) > 1 else ''}: validation MAP@R "
            f"first within 0.01 of its best (>= {r['target']:.4f}) at epoch {r['target_epoch']} of "
            f"{r['epochs']}, {r['target_s']:.0f} s into the train stage (it started "
            f"{r['setup_s']:.0f} s in: loading, filling the cache, earlier members); the kept "
            f"epoch {r['kept_epoch']} ended at {r['kept_s']:.0f} s"
            for k, r in enumerate(reached, start=1)
        ),
        _metrics_line("test metrics from empty", first),
        _metrics_line("frozen baseline", baseline),
    ]
    if edit:
        notes += [
            f"after the train.lr edit: ran {', '.join(RAN.findall(edit[1]))}",
            _metrics_line(f"test metrics after the edit (train.lr {lr} -> {lr / 2})", edit[2]),
        ]
    notes.append(f"clone kept at {work}" if args.keep else "temporary clone removed")
    print_table("dvc repro wall time (project: the run; baseline: the run from empty)", rows, notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
