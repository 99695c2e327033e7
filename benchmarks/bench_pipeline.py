"""The edit loop: `dvc repro` from empty, a no-op `dvc repro`, and the reruns after an edit.

A fresh `git clone` of this repository's HEAD in a temporary folder gets the offline profile on
food10 (`make repro-offline` without the set-up: the clone uses this checkout's .venv, with its
own `src/` first on the path). These `dvc repro` runs are timed there, one after another:

1. from empty (the baseline the others are compared with);
2. straight after, with nothing changed: DVC should only hash and skip;
3. after `train.lr` is halved: train and what depends on it (export_gallery, index_gallery,
   evaluate) rerun; download, preprocess, sample_triplets, features, prefix_maps, baseline and
   copy_gallery do not;
4. after `train.epochs` is raised by one (from the lr edit's state): sample_triplets draws the
   steps again, then train and what follows; features and prefix_maps still do not rerun.

Each stage prints "<stage>: done in X s", which gives the per-stage split of every run; which
stages ran is read from DVC's own lines. Time to target, from run 1's `models/config.json`: how
far into the train stage validation MAP@R first came within 0.01 of the best it reached.

Every run appends its figures to benchmarks/results/bench_pipeline.json, keyed by commit and
CPU; the table then shows the latest earlier commit's figures from the same CPU beside them.
With --quick the data are 30 photos per class and split, and training is 2 epochs: it checks
that the benchmark runs, not how fast the pipeline is.

Run: python benchmarks/bench_pipeline.py [--quick] [--keep] [--edits lr,epochs | --edits none]
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
from _common import FOOD10, ROOT, Row, cpu_model, print_table

STAGE_DONE = re.compile(r"^(\w+): done in ([\d.]+) s$", re.MULTILINE)
RAN = re.compile(r"Running stage '(\w+)'")
HISTORY = ROOT / "benchmarks" / "results" / "bench_pipeline.json"
EDITS = ("lr", "epochs")


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


def edited(name: str, params: dict) -> tuple[str, str]:
    """The `--set` of edit `name` on the current params, and its description."""
    if name == "lr":
        lr = float(params["train"]["lr"])
        return f"train.lr={lr / 2}", f"train.lr {lr} -> {lr / 2}"
    epochs = int(params["train"]["epochs"])
    return f"train.epochs={epochs + 1}", f"train.epochs {epochs} -> {epochs + 1}"


def run_record(seconds: float, log: str) -> dict:
    return {
        "seconds": round(seconds, 1),
        "ran": RAN.findall(log),
        "stages": {name: float(s) for name, s in STAGE_DONE.findall(log)},
    }


def commit_of(folder: Path) -> str:
    return subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=folder, capture_output=True, text=True
    ).stdout.strip()


def previous(history: list[dict], record: dict) -> dict | None:
    """The latest record from the same CPU and data for another commit."""
    same = [
        h
        for h in history
        if h["cpu"] == record["cpu"]
        and h["quick"] == record["quick"]
        and h["commit"] != record["commit"]
    ]
    return same[-1] if same else None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="30 photos a class and split, 2 epochs"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary clone")
    parser.add_argument(
        "--edits",
        default=",".join(EDITS),
        help="which edits to rerun after, in order: lr, epochs (default both), or none",
    )
    args = parser.parse_args(argv)
    edits = [e for e in args.edits.split(",") if e and e != "none"]
    if unknown := set(edits) - set(EDITS):
        raise SystemExit(f"--edits: {', '.join(sorted(unknown))} not one of {', '.join(EDITS)}")
    if not (FOOD10 / "train").is_dir():
        raise SystemExit(f"food10 not found at {FOOD10}; set SIAMESE_CV_FOOD10 to its folder")
    work = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    record = {"commit": commit_of(ROOT), "cpu": cpu_model(), "quick": args.quick,
              "date": time.strftime("%Y-%m-%d")}  # fmt: skip
    try:
        clone = work / "repo"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        source = quick_source(work / "photos", 30) if args.quick else FOOD10
        overrides = ["--set", f"data.source={source}"]
        if args.quick:
            overrides += ["--set", "train.epochs=2"]
        timed(["siamese-params", "apply", "profiles/offline.yaml", *overrides], clone)

        full_s, full_log = timed(["dvc", "repro"], clone)
        record["from_empty"] = run_record(full_s, full_log)
        record["metrics"] = json.loads((clone / "metrics" / "test.json").read_text())
        baseline = json.loads((clone / "metrics" / "baseline.json").read_text())
        train_s = record["from_empty"]["stages"]["train"]
        reached = time_to_target(
            json.loads((clone / "models" / "config.json").read_text()), train_s
        )
        record["noop"] = run_record(*timed(["dvc", "repro"], clone))
        record["edits"] = {}
        for name in edits:
            params = yaml.safe_load((clone / "params.yaml").read_text())
            setting, described = edited(name, params)
            timed(["siamese-params", "apply", "--set", setting], clone)
            status = timed(["dvc", "status"], clone)[1]
            rerun = run_record(*timed(["dvc", "repro"], clone))
            rerun |= {
                "edit": described,
                "status_named": sorted(set(re.findall(r"^(\w+):", status, re.MULTILINE))),
                "metrics": json.loads((clone / "metrics" / "test.json").read_text()),
            }
            record["edits"][name] = rerun
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    history = json.loads(HISTORY.read_text()) if HISTORY.is_file() else []
    before = previous(history, record)
    HISTORY.parent.mkdir(parents=True, exist_ok=True)
    HISTORY.write_text(json.dumps([*history, record], indent=1) + "\n")
    print_table(
        "dvc repro wall time (project: the run; baseline: the run from empty)",
        rows_of(record, reached, train_s),
        notes_of(record, reached, baseline, before, args, work),
    )
    return 0


def rows_of(record: dict, reached: list[dict], train_s: float) -> list[Row]:
    full_s = record["from_empty"]["seconds"]
    rows = [
        Row("no-op dvc repro vs from empty", record["noop"]["seconds"], full_s, "s",
            higher_is_better=False),
        Row("train: time to target vs the whole train stage", reached[-1]["target_s"], train_s,
            "s", higher_is_better=False),
    ]  # fmt: skip
    for name, rerun in record["edits"].items():
        rows.append(
            Row(f"rerun after the {name} edit vs from empty", rerun["seconds"], full_s, "s",
                higher_is_better=False)
        )  # fmt: skip
    return rows


def _stages_line(run: dict) -> str:
    return ", ".join(f"{name} {s:.1f} s" for name, s in run["stages"].items())


def notes_of(record, reached, baseline, before, args, work) -> list[str]:
    full = record["from_empty"]
    data = "30 photos a class and split, 2 epochs" if args.quick else "food10, offline profile"
    notes = [
        f"commit {record['commit']}, {record['cpu']}",
        f"from empty: {full['seconds']:.1f} s in all ({data}); stages: {_stages_line(full)}",
        f"no-op: ran {record['noop']['ran'] or 'nothing'}",
        *(
            f"time to target{f' (member {k})' if len(reached) > 1 else ''}: validation MAP@R "
            f"first within 0.01 of its best (>= {r['target']:.4f}) at epoch {r['target_epoch']} of "
            f"{r['epochs']}, {r['target_s']:.0f} s into the train stage (it started "
            f"{r['setup_s']:.0f} s in: loading, earlier members); the kept epoch "
            f"{r['kept_epoch']} ended at {r['kept_s']:.0f} s"
            for k, r in enumerate(reached, start=1)
        ),
        _metrics_line("test metrics from empty", record["metrics"]),
        _metrics_line("frozen baseline", baseline),
    ]
    for name, rerun in record["edits"].items():
        notes += [
            f"after the {name} edit ({rerun['edit']}): dvc status named "
            f"{', '.join(rerun['status_named'])}; ran {', '.join(rerun['ran'])}: "
            f"{_stages_line(rerun)}",
            _metrics_line(f"test metrics after the {name} edit", rerun["metrics"]),
        ]
    if before:
        notes.append(
            f"the same CPU at {before['commit']} ({before['date']}): from empty "
            f"{before['from_empty']['seconds']:.1f} s ({_stages_line(before['from_empty'])}); "
            + "; ".join(f"{name} rerun {r['seconds']:.1f} s" for name, r in before["edits"].items())
        )
    else:
        notes.append("no earlier commit's figures from this CPU in " + HISTORY.name)
    notes.append(f"clone kept at {work}" if args.keep else "temporary clone removed")
    return notes


if __name__ == "__main__":
    raise SystemExit(main())
