"""Raw splits -> resized, re-encoded parquet splits, in parallel, with a report of what was skipped.

With `preprocess.shards: N` > 1 each split's rows are cut into N contiguous ranges; the shard
workers (see `siamese_cv.core.shards`) write the resized rows of range i of every split as piece i,
and the pieces are concatenated in shard order into the same `<split>.parquet` files, row groups
and bytes, that one shard writes.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor
from pathlib import Path
from typing import Any

from siamese_cv.config.params import SPLITS, PreprocessParams
from siamese_cv.core.atomic import atomic_path
from siamese_cv.core.logs import progress
from siamese_cv.core.shards import (
    SHARDS_ROOT,
    Nodes,
    ShardStore,
    code_digest,
    fingerprint_files,
    make_key,
    run_shards,
    shard_range,
    work_shards,
)
from siamese_cv.data.images import ImageError, prepare_image
from siamese_cv.data.parquet import (
    PROCESSED_SCHEMA,
    count_rows,
    iter_batches,
    iter_row_range,
    write_rows,
)

log = logging.getLogger(__name__)

STORE = SHARDS_ROOT / "preprocess"


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


def _process_rows(
    batches: Iterator, params: PreprocessParams, pool: Executor | None, manifest: dict, bar
) -> Iterator[dict]:
    """Resize each row of `batches`; count kept rows and list skipped ones in `manifest`."""
    size = params.image_size
    for batch in batches:
        rows = batch.to_pylist()
        todo = [r for r in rows if r["image"] is not None]
        jobs = [(r["image"], size, params.resize, params.format, params.quality) for r in todo]
        chunk = max(1, len(jobs) // (4 * (pool._max_workers if pool else 1)))  # type: ignore[attr-defined]
        results = pool.map(_prepare, jobs, chunksize=chunk) if pool else map(_prepare, jobs)
        outcome = {id(r): res for r, res in zip(todo, results, strict=True)}
        for r in rows:
            image, reason = outcome.get(id(r), (None, r["error"] or "no image bytes"))
            if image is None:
                manifest["skipped"][r["split"]].append(
                    {"id": r["id"], "split": r["split"], "source": r["source"], "reason": reason}
                )
                continue
            kept = manifest["kept"][r["split"]]
            kept[r["label_name"]] = kept.get(r["label_name"], 0) + 1
            yield {
                "id": r["id"],
                "label": r["label"],
                "label_name": r["label_name"],
                "image": image,
                "width": size,
                "height": size,
            }
        bar.update(len(rows))


def preprocess_range(
    raw_dir: Path,
    out_dir: Path,
    params: PreprocessParams,
    pool: Executor | None,
    index: int = 0,
    count: int = 1,
) -> dict[str, Any]:
    """Write `out_dir/<split>.parquet` from rows of shard `index` of `count` of each raw split.

    Returns:
        The piece's manifest: kept images per split and class, skipped files per split.
    """
    columns = ["id", "split", "label", "label_name", "source", "image", "error"]
    manifest: dict[str, Any] = {"kept": {s: {} for s in SPLITS}, "skipped": {s: [] for s in SPLITS}}
    for split in SPLITS:
        raw = raw_dir / f"{split}.parquet"
        started = time.perf_counter()
        if count == 1:
            total = count_rows(raw)
            batches = iter_batches(raw, columns, params.row_group_size)
        else:
            start, stop = shard_range(count_rows(raw), index, count)
            total = stop - start
            batches = iter_row_range(raw, columns, start, stop, params.row_group_size)
        # shards run side by side: their bars would overwrite one another
        desc = f"preprocess: decoding {split}"
        with progress(total=total, desc=desc, unit="img", enabled=count == 1) as bar:
            rows = _process_rows(batches, params, pool, manifest, bar)
            write_rows(out_dir / f"{split}.parquet", PROCESSED_SCHEMA, rows, params.row_group_size)
        log.log(
            logging.INFO if count == 1 else logging.DEBUG,
            "preprocess: %s: kept %d, skipped %d of %d images in %.1f s",
            split,
            sum(manifest["kept"][split].values()),
            len(manifest["skipped"][split]),
            total,
            time.perf_counter() - started,
        )
    return manifest


def shard_key(raw_dir: Path, params: PreprocessParams) -> str:
    """The key of the pieces: raw contents, output parameters, code and library versions."""
    import PIL
    import pyarrow

    from siamese_cv.data import images, parquet

    output = {k: v for k, v in params.__dict__.items() if k != "workers"}
    return make_key(
        {
            "stage": "preprocess",
            "raw": fingerprint_files([raw_dir / f"{s}.parquet" for s in SPLITS]),
            "params": output,
            "code": code_digest(sys.modules[__name__], images, parquet),
            "versions": [PIL.__version__, pyarrow.__version__],
        }
    )


def preprocess_worker(raw_dir: Path, params: PreprocessParams, key: str, workers: int) -> list[int]:
    """Be one shard worker (`stages/preprocess.py --shard-key`), with `workers` decoding
    processes: write the pieces of the shards it takes under `key`; returns those shards."""
    store = ShardStore(STORE, params.shards)
    pool = _executor(workers)

    def run(index: int) -> str:
        manifest: dict[str, Any] = {}
        with store.write(index, key, manifest) as tmp:
            manifest.update(preprocess_range(raw_dir, tmp, params, pool, index, params.shards))
        kept = sum(sum(c.values()) for c in manifest["kept"].values())
        return f"kept {kept}, skipped {sum(map(len, manifest['skipped'].values()))}"

    try:
        return work_shards("preprocess", store, key, run)
    finally:
        if pool is not None:
            pool.shutdown()


def preprocess_splits(
    raw_dir: Path,
    out_dir: Path,
    params: PreprocessParams,
    worker: Callable[[int], list[str]] | None = None,
    nodes: Nodes | None = None,
) -> dict[str, Any] | None:
    """Write `out_dir/<split>.parquet` for each split of `raw_dir`; return the data report.

    The report's `problems` lists each split left empty (validation may be) or with no class of
    two images: the caller writes the report first, then stops, so the reasons are there to
    read. Its `warnings` lists each class left with a single image in a split.

    Args:
        worker: with `params.shards` > 1, the argv after `python` of a shard worker with n
            decoding processes (`stages/preprocess.py --workers n`; see `run_shards`).
        nodes: the machines that share the shards (default: this one); only node 0 merges.

    Returns:
        The report; None on a node other than 0, once its shards are done.

    Raises:
        UserError: a shard worker failed; the finished shards are kept for the next run.
    """
    workers = params.workers or available_cores()
    nodes = nodes or Nodes()
    nodes.require_shards("preprocess", params.shards)
    if params.shards == 1:
        pool = _executor(workers)
        try:
            with atomic_path(out_dir) as tmp:
                tmp.mkdir()
                manifests = [preprocess_range(raw_dir, tmp, params, pool)]
        finally:
            if pool is not None:
                pool.shutdown()
        ShardStore(STORE, 1).remove()  # pieces of an earlier, unfinished sharded run
    else:
        if worker is None:
            raise ValueError("preprocess.shards > 1 needs the command of a shard worker")
        manifests = _run_sharded(raw_dir, out_dir, params, workers, worker, nodes)
        if manifests is None:
            return None
    return _report(manifests, params, workers, raw_dir)


def _run_sharded(
    raw_dir: Path,
    out_dir: Path,
    params: PreprocessParams,
    workers: int,
    worker: Callable[[int], list[str]],
    nodes: Nodes,
) -> list[dict[str, Any]] | None:
    count = params.shards
    store = ShardStore(STORE, count)
    key = shard_key(raw_dir, params)
    if not run_shards("preprocess", store, key, worker, nodes, workers):
        return None  # another machine merges
    manifests = [store.manifest(i) for i in range(count)]
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        for split in SPLITS:
            pieces = [store.piece(i) / f"{split}.parquet" for i in range(count)]
            write_rows(
                tmp / f"{split}.parquet",
                PROCESSED_SCHEMA,
                _concat_rows(pieces, params.row_group_size),
                params.row_group_size,
            )
    store.remove()
    return manifests


def _concat_rows(pieces: list[Path], batch_size: int) -> Iterator[dict]:
    columns = PROCESSED_SCHEMA.names
    for piece in pieces:
        for batch in iter_batches(piece, columns, batch_size):
            yield from batch.to_pylist()


def _report(
    manifests: list[dict[str, Any]], params: PreprocessParams, workers: int, raw_dir: Path
) -> dict:
    """The data report of the whole dataset from the pieces' manifests, in shard order."""
    kept: Counter = Counter()
    skipped: list[dict] = []
    problems: list[str] = []
    warnings: list[str] = []
    for split in SPLITS:
        for manifest in manifests:
            kept.update({(split, c): n for c, n in manifest["kept"][split].items()})
            skipped.extend(manifest["skipped"][split])
        errors, notes = _split_problems(split, kept, skipped)
        problems.extend(errors)
        warnings.extend(notes)
    per_split = {s: {c: n for (sp, c), n in sorted(kept.items()) if sp == s} for s in SPLITS}
    reasons = Counter(item["reason"].split(":")[0] for item in skipped)
    return {
        "kept": {"total": sum(kept.values()), **{s: sum(v.values()) for s, v in per_split.items()}},
        "per_class": per_split,
        "validation": _validation_report(raw_dir, per_split),
        "problems": problems,
        "warnings": warnings,
        "skipped_queries": {s: sum(n for n in v.values() if n < 2) for s, v in per_split.items()},
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
            "shards": params.shards,
        },
    }


def _validation_report(raw_dir: Path, per_split: dict[str, dict[str, int]]) -> dict:
    """Where validation came from, the photos each class lent to it, and the classes without."""
    path = raw_dir / "source.json"
    source = json.loads(path.read_text()).get("validation", {}) if path.exists() else {}
    lent = per_split["validation"]
    return {
        **source,
        "photos": dict(lent),
        "classes_without": sorted(set(per_split["train"]) - set(lent)),
    }


def _split_problems(split: str, kept: Counter, skipped: list[dict]) -> tuple[list[str], list[str]]:
    """(what stops the pipeline, what only leaves photos out as anchors and queries) in a split.

    A class with one photo in a split cannot anchor a triplet there nor be a query with an answer,
    but it is still a negative and a gallery photo; a split with no class of two photos has no
    triplet at all. An empty validation split means no validation (training keeps its last
    epoch).
    """
    counts = {c: n for (s, c), n in kept.items() if s == split}
    if not counts:
        lost = sum(1 for item in skipped if item["split"] == split)
        if split == "validation" and not lost:
            return [], ["no validation photos: training keeps its last epoch"]
        return [f"split {split!r} has no readable images ({lost} skipped); check data.source"], []
    singles = sorted(c for c, n in counts.items() if n < 2)
    if len(singles) == len(counts):
        return [
            f"split {split!r}: no class has 2 readable images, so no triplet or query can be drawn; "
            "add a second image to some classes in data.source"
        ], []
    return [], [
        f"split {split!r}: class {c!r} has only 1 readable image: it is left out as an anchor and "
        "a query there, and stays a negative and a gallery photo"
        for c in singles
    ]
