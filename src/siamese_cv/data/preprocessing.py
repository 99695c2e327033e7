"""Raw splits -> resized, re-encoded parquet splits, in parallel, with a report of what was skipped."""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Executor, ProcessPoolExecutor
from pathlib import Path
from typing import Any

from siamese_cv.data.images import ImageError, prepare_image
from siamese_cv.data.parquet import PROCESSED_SCHEMA, iter_batches, write_rows
from siamese_cv.io import atomic_path
from siamese_cv.params import SPLITS, PreprocessParams


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def _prepare(job: tuple[bytes, int, str, str, int]) -> tuple[bytes | None, str | None]:
    data, size, mode, fmt, quality = job
    try:
        return prepare_image(data, size, mode, fmt, quality), None
    except ImageError as error:
        return None, str(error)


def _die_with_parent(parent: int) -> None:
    """Pool initializer: a worker must not outlive a killed stage.

    Orphaned workers sleep forever and keep the stage's stdout open, so `dvc repro` (which reads
    it to the end) would hang after an OOM kill or SIGKILL of the stage.
    """
    if sys.platform == "linux":
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    else:

        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(1.0)
            os._exit(1)

        threading.Thread(target=watch, daemon=True).start()
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)


def _executor(workers: int) -> Executor | None:
    if workers <= 1:
        return None
    method = "fork" if sys.platform == "linux" else "spawn"
    return ProcessPoolExecutor(
        workers,
        mp_context=multiprocessing.get_context(method),
        initializer=_die_with_parent,
        initargs=(os.getpid(),),
    )


def _process_split(
    raw: Path, params: PreprocessParams, pool: Executor | None, skipped: list[dict], kept: Counter
) -> Iterator[dict]:
    columns = ["id", "split", "label", "label_name", "source", "image", "error"]
    size = params.image_size
    for batch in iter_batches(raw, columns, params.row_group_size):
        rows = batch.to_pylist()
        todo = [r for r in rows if r["image"] is not None]
        jobs = [(r["image"], size, params.resize, params.format, params.quality) for r in todo]
        chunk = max(1, len(jobs) // (4 * (pool._max_workers if pool else 1)))  # type: ignore[attr-defined]
        results = pool.map(_prepare, jobs, chunksize=chunk) if pool else map(_prepare, jobs)
        outcome = {id(r): res for r, res in zip(todo, results, strict=True)}
        for r in rows:
            image, reason = outcome.get(id(r), (None, r["error"] or "no image bytes"))
            if image is None:
                skipped.append(
                    {"id": r["id"], "split": r["split"], "source": r["source"], "reason": reason}
                )
                continue
            kept[(r["split"], r["label_name"])] += 1
            yield {
                "id": r["id"],
                "label": r["label"],
                "label_name": r["label_name"],
                "image": image,
                "width": size,
                "height": size,
            }


def preprocess_splits(raw_dir: Path, out_dir: Path, params: PreprocessParams) -> dict[str, Any]:
    """Write `out_dir/<split>.parquet` for each split of `raw_dir`; return the data report.

    The report's `problems` lists each split left empty and each class left with a single image:
    the caller writes the report first, then stops, so the reasons are there to read.
    """
    skipped: list[dict] = []
    kept: Counter = Counter()
    problems: list[str] = []
    workers = params.workers or available_cores()
    pool = _executor(workers)
    try:
        with atomic_path(out_dir) as tmp:
            tmp.mkdir()
            for split in SPLITS:
                rows = _process_split(raw_dir / f"{split}.parquet", params, pool, skipped, kept)
                write_rows(tmp / f"{split}.parquet", PROCESSED_SCHEMA, rows, params.row_group_size)
                problems.extend(_split_problems(split, kept, skipped))
    finally:
        if pool is not None:
            pool.shutdown()
    per_split = {s: {c: n for (sp, c), n in sorted(kept.items()) if sp == s} for s in SPLITS}
    reasons = Counter(item["reason"].split(":")[0] for item in skipped)
    return {
        "kept": {"total": sum(kept.values()), **{s: sum(v.values()) for s, v in per_split.items()}},
        "per_class": per_split,
        "problems": problems,
        "skipped": {
            "total": len(skipped),
            "by_reason": dict(sorted(reasons.items())),
            "files": skipped,
        },
        "preprocess": {
            "image_size": params.image_size,
            "resize": params.resize,
            "format": params.format,
            "workers": workers,
        },
    }


def _split_problems(split: str, kept: Counter, skipped: list[dict]) -> list[str]:
    counts = {c: n for (s, c), n in kept.items() if s == split}
    if not counts:
        lost = sum(1 for item in skipped if item["split"] == split)
        return [f"split {split!r} has no readable images ({lost} skipped); check data.source"]
    return [
        f"split {split!r}: class {c!r} has only 1 readable image, too few for a triplet; add images "
        "of it or remove the class from data.source"
        for c, n in sorted(counts.items())
        if n < 2
    ]
