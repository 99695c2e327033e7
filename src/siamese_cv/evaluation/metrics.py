"""Retrieval and triplet metrics on L2-normalised embeddings, as plain JSON-ready numbers.

The numbers follow pytorch-metric-learning's definitions (Precision@1, R-precision, MAP@R) so
they are comparable with published results, but are computed here with a chunked matrix product
and a stable ranking: PML's `AccuracyCalculator` needs the full N x N similarity matrix (or faiss)
and breaks ties arbitrarily, so two runs on the same embeddings could disagree. Here ties are
broken by row index (the lower index ranks first), so the same embeddings always give the same
numbers, and 50k rows never need more than a slab of the similarity matrix at once.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from siamese_cv.core.errors import UserError

# Elements of one similarity slab (query chunk x reference rows): 2**25 float32 = 128 MiB.
_SLAB_ELEMENTS = 2**25
# How far a row norm may stray from 1 before we refuse to treat dot products as cosines.
_NORM_TOLERANCE = 1e-3


def _check_embeddings(embeddings: np.ndarray, name: str = "embeddings") -> np.ndarray:
    """Return `embeddings` as a C-contiguous float32 [N, D] array, refusing what is not unit rows.

    Cosine similarity is computed as a plain dot product, which is only right for unit rows (or
    all-zero rows, which F.normalize leaves at zero); a NaN (a diverged training run) would
    otherwise rank arbitrarily without any error.
    """
    array = np.ascontiguousarray(embeddings, dtype=np.float32)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D [rows, dims] array, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise UserError(
            f"{name} contain NaN or infinite values: the model diverged or its weights are "
            "corrupt; retrain with a lower learning rate or re-export the model"
        )
    if len(array):
        norms = np.linalg.norm(array, axis=1)
        # An all-zero row is what F.normalize makes of a zero vector: cosine 0 to everything.
        off = np.where(norms == 0.0, 0.0, np.abs(norms - 1.0))
        worst = float(off.max())
        if worst > _NORM_TOLERANCE:
            raise ValueError(
                f"{name} must be L2-normalised rows (a row norm is off by {worst:.3g}); "
                "divide each row by its norm first"
            )
    return array


def _check_labels(labels: np.ndarray, n_rows: int, name: str = "labels") -> np.ndarray:
    """Return `labels` as an int64 vector with one entry per embedding row."""
    array = np.asarray(labels)
    if array.ndim != 1 or len(array) != n_rows:
        raise ValueError(
            f"{name} must be a 1-D array with one label per row ({n_rows}), got shape {array.shape}"
        )
    if len(array) and not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name} must be integer class ids, got dtype {array.dtype}")
    return array.astype(np.int64, copy=False)


def _check_recall_at(recall_at: Sequence[int]) -> tuple[int, ...]:
    """Return the K values of Recall@K, refusing ones that cannot rank anything."""
    ks = tuple(int(k) for k in recall_at)
    if any(k < 1 for k in ks):
        raise ValueError(f"recall_at values must be >= 1, got {list(ks)}")
    return ks


def _stable_topk(sims: torch.Tensor, k: int) -> torch.Tensor:
    """Indices [rows, k] of the k largest entries per row, ties broken by lower column index.

    `torch.topk` is fast but its order among equal values is unspecified, so the top-k is taken
    with it and then re-sorted stably by (-value, index). Only a row whose tie straddles the k-th
    place could have picked the wrong member of the tie; such rows (rare for float embeddings)
    are redone with a full stable sort.
    """
    values, indices = torch.topk(sims, k, dim=1, largest=True, sorted=False)
    indices, order = indices.sort(dim=1)
    values = values.gather(1, order)
    _, order = values.sort(dim=1, descending=True, stable=True)
    indices = indices.gather(1, order)
    kth = values.gather(1, order[:, -1:])
    straddling = torch.nonzero((sims >= kth).sum(dim=1) > k).flatten()
    for row in straddling.tolist():
        indices[row] = torch.sort(sims[row], descending=True, stable=True).indices[:k]
    return indices


def _ranked_chunks(
    query: np.ndarray, reference: np.ndarray, k: int, exclude_self: bool
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (first query row, reference indices [chunk, k]) ranked by cosine similarity.

    With `exclude_self` the query set is the reference set and each row's own index is never
    returned (excluded by index, not by value, so duplicate images still find each other).
    """
    for start, sims in similarity_slabs(query, reference):
        if exclude_self:
            rows = torch.arange(len(sims))
            sims[rows, rows + start] = float("-inf")
        yield start, _stable_topk(sims, k)


def similarity_slabs(
    query: np.ndarray, reference: np.ndarray
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (first query row, dot products [chunk, len(reference)]), one slab in memory at a time.

    Both must be C-contiguous float32 (`_check_embeddings`); for unit rows these are cosines.
    """
    ref = torch.from_numpy(reference)
    chunk = max(1, _SLAB_ELEMENTS // max(1, len(reference)))
    for start in range(0, len(query), chunk):
        yield start, torch.from_numpy(query[start : start + chunk]) @ ref.T


def triplet_accuracy(
    embeddings: np.ndarray, anchor: np.ndarray, positive: np.ndarray, negative: np.ndarray
) -> float:
    """Share of triplets whose anchor is strictly closer (cosine) to the positive than the negative.

    Strictly greater, so a collapsed model (all embeddings equal) scores 0, not 1.

    Args:
        embeddings: [N, D] L2-normalised float32 rows.
        anchor, positive, negative: equal-length integer index arrays into `embeddings`.

    Returns:
        The accuracy in [0, 1] as a Python float.

    Raises:
        ValueError: the index arrays are empty, differ in length or point outside `embeddings`.
    """
    emb = _check_embeddings(embeddings)
    a, p, n = (np.asarray(x, dtype=np.int64) for x in (anchor, positive, negative))
    if not (a.ndim == p.ndim == n.ndim == 1 and len(a) == len(p) == len(n)):
        raise ValueError("anchor, positive and negative must be 1-D index arrays of equal length")
    if len(a) == 0:
        raise ValueError("no triplets to score: sample at least one (anchor, positive, negative)")
    for idx in (a, p, n):
        if idx.min() < 0 or idx.max() >= len(emb):
            raise ValueError(
                f"triplet indices must lie in [0, {len(emb)}), got {idx.min()}..{idx.max()}"
            )
    sim_pos = np.einsum("ij,ij->i", emb[a], emb[p])
    sim_neg = np.einsum("ij,ij->i", emb[a], emb[n])
    return float(np.mean(sim_pos > sim_neg))


def triplet_accuracy_draws(
    embeddings: np.ndarray, triplets: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]]
) -> dict[str, float | int]:
    """Triplet accuracy over several seeded draws of triplets, with its spread.

    One draw of random triplets is noisy; the std over draws says how much of a difference
    between two models is sampling noise.

    Args:
        embeddings: [N, D] L2-normalised float32 rows.
        triplets: one (anchor, positive, negative) index-array tuple per draw.

    Returns:
        `triplet_accuracy` (mean over draws), `triplet_accuracy_std` (population std, ddof=0),
        `n_triplets` (triplets per draw; the rounded mean if draws differ) and `n_draws`.

    Raises:
        ValueError: `triplets` is empty or a draw is malformed (see `triplet_accuracy`).
    """
    if len(triplets) == 0:
        raise ValueError(
            "no triplet draws to score: pass at least one (anchor, positive, negative) tuple"
        )
    accuracies = np.array([triplet_accuracy(embeddings, a, p, n) for a, p, n in triplets])
    sizes = [len(a) for a, _, _ in triplets]
    return {
        "triplet_accuracy": float(accuracies.mean()),
        "triplet_accuracy_std": float(accuracies.std(ddof=0)),
        "n_triplets": int(round(float(np.mean(sizes)))),
        "n_draws": len(triplets),
    }


def expected_triplet_accuracy(embeddings: np.ndarray, labels: np.ndarray) -> float:
    """The triplet accuracy that random draws estimate, computed exactly: no sampling noise.

    `random_triplets` makes every image the anchor once, with a uniform other member of its class
    as the positive and a uniform member of a uniformly chosen other class as the negative. This
    is the mean of `triplet_accuracy` over all such draws: for each anchor, every (positive,
    negative) pair weighted by its chance of being drawn, with the same strict comparison. One
    draw of 1,250 triplets has a standard deviation of about 0.5 point; this has none, so two
    models can be compared on the same photos without drawing many times.

    Args:
        embeddings: [N, D] L2-normalised float32 rows.
        labels: [N] integer class ids.

    Returns:
        The accuracy in [0, 1], over the anchors whose class has another member.

    Raises:
        ValueError: fewer than two classes, or no class with two members.
    """
    emb = _check_embeddings(embeddings)
    lab = _check_labels(labels, len(emb))
    classes, class_of, counts = np.unique(lab, return_inverse=True, return_counts=True)
    if len(classes) < 2 or counts.max() < 2:
        raise ValueError(
            "expected triplet accuracy needs two classes and a class with two images, "
            f"got {len(classes)} classes of at most {counts.max() if len(counts) else 0} images"
        )
    ref = torch.from_numpy(emb)
    class_of_t = torch.from_numpy(class_of)
    # chance of drawing row n as the negative of an anchor of another class
    neg_weight = torch.from_numpy(1.0 / ((len(classes) - 1) * counts[class_of])).double()
    chunk = max(1, _SLAB_ELEMENTS // max(1, len(emb)))
    per_anchor = []
    for start in range(0, len(emb), chunk):
        stop = min(start + chunk, len(emb))
        rows = torch.arange(start, stop)
        sims = ref[start:stop] @ ref.T
        same = class_of_t[rows, None] == class_of_t[None, :]
        positive = same.clone()
        positive[torch.arange(stop - start), rows] = False
        weight = torch.where(same, 0.0, neg_weight[None, :])
        sorted_sims, order = sims.sort(dim=1, stable=True)
        below = torch.cat(
            [torch.zeros(stop - start, 1, dtype=torch.float64), weight.gather(1, order).cumsum(1)],
            dim=1,
        )
        # the negative weight strictly below each similarity: strict, as in triplet_accuracy
        won = below.gather(1, torch.searchsorted(sorted_sims, sims, side="left"))
        n_pos = positive.sum(dim=1)
        keep = n_pos > 0
        per_anchor.append((won * positive).sum(dim=1)[keep] / n_pos[keep])
    return float(torch.cat(per_anchor).mean())


def retrieval_metrics(
    embeddings: np.ndarray,
    labels: np.ndarray,
    recall_at: Sequence[int] = (1, 5, 10),
    class_names: list[str] | None = None,
) -> dict:
    """Leave-one-out retrieval: every row queries all other rows by cosine similarity.

    Definitions follow pytorch-metric-learning's `AccuracyCalculator` (micro-averaged over
    queries). For a query with R other items of its class:
    Precision@1 is 1 if the nearest other item shares its class; Recall@K is 1 if any of the top K
    does (the metric-learning Recall@K, not the IR one); R-precision is the share of the top R that
    do; MAP@R is (1/R) * sum over ranks i <= R of precision@i at the ranks i that are hits. The
    ranking is computed to depth max R (and max K), never less, because a shallower ranking makes
    MAP@R and R-precision silently wrong. Ties rank the lower row index first.

    Queries whose class has no other member (R = 0) are excluded from every number, as in PML;
    `n_queries` says how many were counted, `n_skipped` how many were not (they still rank as
    other queries' answers).

    Args:
        embeddings: [N, D] L2-normalised float32 rows.
        labels: [N] integer class ids (indices into `class_names` when given).
        recall_at: the K values of Recall@K; K beyond N - 1 counts all other rows.
        class_names: names for `per_class` keys; str(label) is used without them.

    Returns:
        `precision_at_1`, `recall_at_{k}` per k, `r_precision`, `map_at_r`, `n_queries`,
        `n_skipped`, and
        `per_class` = {name: {"precision_at_1", "map_at_r", "n"}} for classes with counted queries.

    Raises:
        ValueError: mismatched shapes, non-integer labels, labels outside `class_names`, or no
            class with at least two members.
    """
    emb = _check_embeddings(embeddings)
    lab = _check_labels(labels, len(emb))
    ks = _check_recall_at(recall_at)
    if class_names is not None and len(lab) and (lab.min() < 0 or lab.max() >= len(class_names)):
        raise ValueError(
            f"labels must index class_names (0..{len(class_names) - 1}), got "
            f"{lab.min()}..{lab.max()}"
        )

    classes, inverse, counts = np.unique(lab, return_inverse=True, return_counts=True)
    r_per_row = counts[inverse] - 1
    if len(lab) == 0 or r_per_row.max() < 1:
        raise ValueError(
            "retrieval needs a class with at least two rows; every class here has "
            "at most one, so no query has a correct answer to find"
        )
    depth = min(len(emb) - 1, max(int(r_per_row.max()), max(ks, default=1)))

    p_at_1 = np.zeros(len(lab))
    r_prec = np.zeros(len(lab))
    map_r = np.zeros(len(lab))
    recall = {k: np.zeros(len(lab)) for k in ks}
    lab_t = torch.from_numpy(lab)
    r_t = torch.from_numpy(r_per_row)
    ranks = torch.arange(1, depth + 1, dtype=torch.float64)
    for start, nn_idx in _ranked_chunks(emb, emb, depth, exclude_self=True):
        stop = start + len(nn_idx)
        hits = lab_t[nn_idx] == lab_t[start:stop, None]
        r = r_t[start:stop].clamp(min=1)
        within_r = ranks[None, :] <= r[:, None]
        hits_r = hits & within_r
        precision_at_i = hits_r.cumsum(dim=1).double() / ranks
        p_at_1[start:stop] = hits[:, 0].double().numpy()
        r_prec[start:stop] = (hits_r.sum(dim=1).double() / r).numpy()
        map_r[start:stop] = ((precision_at_i * hits_r).sum(dim=1) / r).numpy()
        for k in ks:
            recall[k][start:stop] = hits[:, : min(k, depth)].any(dim=1).double().numpy()

    counted = r_per_row > 0
    result: dict = {
        "precision_at_1": float(p_at_1[counted].mean()),
        **{f"recall_at_{k}": float(recall[k][counted].mean()) for k in ks},
        "r_precision": float(r_prec[counted].mean()),
        "map_at_r": float(map_r[counted].mean()),
        "n_queries": int(counted.sum()),
        "n_skipped": int((~counted).sum()),
    }
    per_class: dict[str, dict[str, float | int]] = {}
    for i, label in enumerate(classes.tolist()):
        rows = counted & (inverse == i)
        if not rows.any():
            continue
        name = class_names[label] if class_names is not None else str(label)
        per_class[name] = {
            "precision_at_1": float(p_at_1[rows].mean()),
            "map_at_r": float(map_r[rows].mean()),
            "n": int(rows.sum()),
        }
    result["per_class"] = per_class
    return result


def gallery_metrics(
    query_emb: np.ndarray,
    query_labels: np.ndarray,
    gallery_emb: np.ndarray,
    gallery_labels: np.ndarray,
    recall_at: Sequence[int] = (1, 5, 10),
) -> dict[str, float | int]:
    """Queries search a separate gallery (e.g. test images against the exported train gallery).

    Nothing is self-excluded: the query set and the gallery are different images. Queries whose
    class has no image in the gallery cannot be answered and are excluded (as in PML);
    `n_queries` says how many were counted. Ties rank the lower gallery index first.

    Args:
        query_emb: [Q, D] L2-normalised float32 rows.
        query_labels: [Q] integer class ids.
        gallery_emb: [G, D] L2-normalised float32 rows.
        gallery_labels: [G] integer class ids.
        recall_at: the K values of Recall@K; K beyond G counts the whole gallery.

    Returns:
        `precision_at_1`, `recall_at_{k}` per k (share of queries with a same-class item in the
        top K) and `n_queries`.

    Raises:
        ValueError: mismatched shapes or dimensions, an empty gallery, or no query whose class is
            in the gallery.
    """
    q = _check_embeddings(query_emb, "query_emb")
    g = _check_embeddings(gallery_emb, "gallery_emb")
    q_lab = _check_labels(query_labels, len(q), "query_labels")
    g_lab = _check_labels(gallery_labels, len(g), "gallery_labels")
    ks = _check_recall_at(recall_at)
    if len(g) == 0:
        raise ValueError("the gallery is empty: export at least one image to search")
    if q.shape[1] != g.shape[1]:
        raise ValueError(
            f"query and gallery embeddings differ in size ({q.shape[1]} vs "
            f"{g.shape[1]}): embed both with the same model"
        )
    counted = np.isin(q_lab, g_lab)
    if not counted.any():
        raise ValueError(
            "no query's class is in the gallery, so no query has a correct answer; "
            "check that both were labelled with the same class list"
        )
    q, q_lab = q[counted], q_lab[counted]
    depth = min(len(g), max(ks, default=1))
    p_at_1 = np.zeros(len(q))
    recall = {k: np.zeros(len(q)) for k in ks}
    g_lab_t = torch.from_numpy(g_lab)
    q_lab_t = torch.from_numpy(q_lab)
    for start, nn_idx in _ranked_chunks(q, g, depth, exclude_self=False):
        stop = start + len(nn_idx)
        hits = g_lab_t[nn_idx] == q_lab_t[start:stop, None]
        p_at_1[start:stop] = hits[:, 0].double().numpy()
        for k in ks:
            recall[k][start:stop] = hits[:, : min(k, depth)].any(dim=1).double().numpy()
    return {
        "precision_at_1": float(p_at_1.mean()),
        **{f"recall_at_{k}": float(recall[k].mean()) for k in ks},
        "n_queries": len(q),
    }


def neighbour_confusion(embeddings: np.ndarray, labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Count, per true class, which class each row's nearest other row belongs to.

    The off-diagonal cells name the class pairs the model confuses, which a single accuracy
    number hides. Every row counts, including rows whose class has no other member.

    Args:
        embeddings: [N, D] L2-normalised float32 rows, N >= 2.
        labels: [N] integer class ids in [0, n_classes).
        n_classes: size of the matrix.

    Returns:
        int64 [n_classes, n_classes]: row = true class, column = class of the nearest other row.

    Raises:
        ValueError: fewer than two rows, mismatched shapes, or labels outside [0, n_classes).
    """
    emb = _check_embeddings(embeddings)
    lab = _check_labels(labels, len(emb))
    if len(emb) < 2:
        raise ValueError("neighbour confusion needs at least two rows")
    if lab.min() < 0 or lab.max() >= n_classes:
        raise ValueError(f"labels must lie in [0, {n_classes}), got {lab.min()}..{lab.max()}")
    nearest = np.empty(len(emb), dtype=np.int64)
    for start, nn_idx in _ranked_chunks(emb, emb, 1, exclude_self=True):
        nearest[start : start + len(nn_idx)] = nn_idx[:, 0].numpy()
    matrix = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(matrix, (lab, lab[nearest]), 1)
    return matrix
