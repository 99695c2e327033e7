"""Which rows of a training step each of several processes trains on.

Every process reads the same schedule and takes its own share of each step, so no sampler has to
know about processes. A P x K step is split by whole classes (each process gets P / world of
them with all K images each), so online mining inside a share still has positives and negatives.
A step of fixed triplets is split into contiguous slices; each share carries a weight that makes
DDP's gradient average equal the mean over the whole step even when the slices are uneven.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from siamese_cv.core.errors import UserError


@dataclass(frozen=True)
class Share:
    """One process's rows of a step and the factor its mean loss is multiplied by.

    With `world` processes and DDP averaging gradients, a share of n of the step's N triplets
    gets weight n * world / N; a process whose slice would be empty trains on one triplet with
    weight 0, because every process must run forward and backward for the gradient all-reduce.
    """

    rows: np.ndarray
    weight: float = 1.0


def share_of(
    rows: np.ndarray, labels: np.ndarray, triplets: bool, rank: int, world: int, equal: bool = False
) -> Share:
    """This process's share of one step's rows.

    Args:
        rows: the step's row indices: flattened (anchors, positives, negatives) or P x K rows.
        labels: integer labels of the whole training split, indexed by row.
        triplets: whether `rows` are flattened fixed triplets.
        rank, world: this process and how many there are.
        equal: P x K shares must hold the same number of classes (cross-rank negatives
            all-gather every share, which needs equal sizes).

    Raises:
        UserError: a P x K step holds fewer classes than there are processes, or `equal` and
            its classes do not split evenly.
    """
    rows = np.asarray(rows, dtype=np.int64)
    if world == 1:
        return Share(rows)
    if triplets:
        return _triplet_share(rows, rank, world)
    return Share(_class_share(rows, labels, rank, world, equal))


def _triplet_share(rows: np.ndarray, rank: int, world: int) -> Share:
    abc = rows.reshape(3, -1).T
    mine = np.array_split(np.arange(len(abc)), world)[rank]
    if len(mine) == 0:
        return Share(abc[:1].T.ravel(), 0.0)
    return Share(abc[mine].T.ravel(), len(mine) * world / len(abc))


def _class_share(
    rows: np.ndarray, labels: np.ndarray, rank: int, world: int, equal: bool
) -> np.ndarray:
    step_labels = labels[rows]
    _, first = np.unique(step_labels, return_index=True)
    classes = step_labels[np.sort(first)]  # in the order the step lists them
    if len(classes) < world:
        raise UserError(
            f"a P x K step holds {len(classes)} classes, fewer than the {world} "
            "training processes; lower train.devices x train.nodes or use more classes"
        )
    if equal and len(classes) % world:
        raise UserError(
            f"train.cross_rank_negatives: a P x K step holds {len(classes)} classes, "
            f"which do not split evenly over {world} processes (fewer classes in the "
            "data than triplets.classes_per_batch?); set train.cross_rank_negatives: "
            f"false or use a multiple of {world} classes"
        )
    parts = np.array_split(classes, world)
    if equal and len({int(np.isin(step_labels, part).sum()) for part in parts}) > 1:
        raise UserError(
            "train.cross_rank_negatives: a P x K step's shares differ in size (a class has "
            "fewer than triplets.samples_per_class training images); set "
            "train.cross_rank_negatives: false or lower triplets.samples_per_class"
        )
    return rows[np.isin(step_labels, parts[rank])]
