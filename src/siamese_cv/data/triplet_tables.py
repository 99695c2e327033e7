"""The sample_triplets stage's tables: row indices into data/processed/<split>.parquet.

- train.parquet: `epoch, anchor, positive, negative` (random sampler) or `epoch, step, row` (pk);
- validation.parquet: `anchor, positive, negative`, one draw;
- test.parquet: `draw, anchor, positive, negative`, `triplets.test_draws` draws.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from siamese_cv.config.params import TripletParams
from siamese_cv.core.atomic import atomic_path
from siamese_cv.data.parquet import read_labels
from siamese_cv.data.triplets import pk_batches, pk_notes, random_triplets, rng_for

_ABC = ("anchor", "positive", "negative")


def _triplet_table(triplets: np.ndarray, **extra: np.ndarray) -> pa.Table:
    columns = {k: pa.array(v.astype(np.int32)) for k, v in extra.items()}
    columns.update({name: pa.array(triplets[:, i].astype(np.int32)) for i, name in enumerate(_ABC)})
    return pa.table(columns)


def write_triplet_tables(
    processed: Path, out_dir: Path, params: TripletParams, epochs: int
) -> dict:
    """Draw and write every split's triplets; returns counts for the stage's summary line."""
    _, train_labels = read_labels(processed / "train.parquet")
    _, val_labels = read_labels(processed / "validation.parquet")
    _, test_labels = read_labels(processed / "test.parquet")
    seed = params.seed
    if params.sampler == "random":
        parts = [
            random_triplets(train_labels, rng_for(seed, "train", e), "train") for e in range(epochs)
        ]
        train = _triplet_table(
            np.concatenate(parts), epoch=np.repeat(np.arange(epochs), [len(p) for p in parts])
        )
    else:
        epochs_rows = [
            pk_batches(
                train_labels,
                params.classes_per_batch,
                params.samples_per_class,
                rng_for(seed, "pk", e),
            )
            for e in range(epochs)
        ]
        train = _pk_table(epochs_rows)
    validation = _triplet_table(_validation_triplets(val_labels, seed))
    draws = [
        random_triplets(test_labels, rng_for(seed, "test", d), "test")
        for d in range(params.test_draws)
    ]
    test = _triplet_table(
        np.concatenate(draws),
        draw=np.repeat(np.arange(params.test_draws), [len(d) for d in draws]),
    )
    meta = {
        "sampler": params.sampler,
        "epochs": epochs,
        "seed": seed,
        "test_draws": params.test_draws,
        "classes_per_batch": params.classes_per_batch,
        "samples_per_class": params.samples_per_class,
    }
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        for name, table in (("train", train), ("validation", validation), ("test", test)):
            pq.write_table(table, tmp / f"{name}.parquet", compression="zstd")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    summary = {
        "sampler": params.sampler,
        "train rows": train.num_rows,
        "validation triplets": validation.num_rows,
        "test triplets": f"{params.test_draws} x {len(draws[0])}",
    }
    if params.sampler == "pk":
        notes = pk_notes(train_labels, params.classes_per_batch, params.samples_per_class)
        summary |= {"notes": "; ".join(notes)} if notes else {}
    return summary


def _pk_table(epochs_rows: list[list[np.ndarray]]) -> pa.Table:
    """`epoch, step, row`: every epoch's batches, flattened in order."""
    epoch, step = [], []
    for e, batches in enumerate(epochs_rows):
        for b, rows in enumerate(batches):
            epoch.append(np.full(len(rows), e))
            step.append(np.full(len(rows), b))
    rows = [r for batches in epochs_rows for r in batches]
    return pa.table(
        {
            "epoch": pa.array(np.concatenate(epoch).astype(np.int32)),
            "step": pa.array(np.concatenate(step).astype(np.int32)),
            "row": pa.array(np.concatenate(rows).astype(np.int32)),
        }
    )


def _validation_triplets(labels: np.ndarray, seed: int) -> np.ndarray:
    """One draw of validation triplets; none when there is no validation split."""
    if len(labels) == 0:
        return np.empty((0, 3), dtype=np.int64)
    return random_triplets(labels, rng_for(seed, "validation", 0), "validation")


def read_schedule(out_dir: Path, batch_size: int) -> tuple[list[list[np.ndarray]], bool]:
    """Per-epoch steps for training: rows of each step, and whether they are flattened triplets.

    Triplets are cut into steps of `batch_size` (a train parameter, so changing it needs no resampling).
    """
    meta = json.loads((out_dir / "meta.json").read_text())
    table = pq.read_table(out_dir / "train.parquet")
    epoch = table.column("epoch").to_numpy()
    epochs: list[list[np.ndarray]] = []
    if meta["sampler"] == "pk":
        step, row = table.column("step").to_numpy(), table.column("row").to_numpy().astype(np.int64)
        for e in range(meta["epochs"]):
            sel = epoch == e
            s, r = step[sel], row[sel]
            bounds = np.flatnonzero(np.diff(s)) + 1
            epochs.append(np.split(r, bounds))
        return epochs, False
    abc = np.stack([table.column(c).to_numpy() for c in _ABC], axis=1).astype(np.int64)
    return [_triplet_steps(abc[epoch == e], batch_size) for e in range(meta["epochs"])], True


def _triplet_steps(triplets: np.ndarray, batch_size: int) -> list[np.ndarray]:
    return [triplets[i : i + batch_size].T.ravel() for i in range(0, len(triplets), batch_size)]


def read_triplets(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """A validation or test table as an [n, 3] array, and its draw column when it has one."""
    table = pq.read_table(path)
    abc = np.stack([table.column(c).to_numpy() for c in _ABC], axis=1).astype(np.int64)
    draw = table.column("draw").to_numpy() if "draw" in table.column_names else None
    return abc, draw
