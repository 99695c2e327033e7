"""Single-query search latency: exact numpy and FAISS IVF against the original's Python loop.

Galleries of 5,000 and 1,000,000 (100,000 with --quick) synthetic 1280-d vectors (`--dim`),
L2-normalised and clustered around seeded directions, 100 vectors to a direction (as the
photos of one class or one product are); queries are fresh draws from the same mixture. Project: `siamese_cv.retrieval.index`
(`exact`: one matrix product + partial sort; `ivf`: FAISS IVF-SQ8 with its default nlist and
nprobe). Baseline: the original's search, a Python loop computing one cosine per gallery
vector, then a sort. On a large gallery that loop takes seconds per query, so it is timed on a
slice and scaled to the full gallery (it is linear in the gallery size); the output says so.

Run: python benchmarks/bench_search.py [--quick]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence

import numpy as np
from _common import Row, percentile, print_table

from siamese_cv.retrieval.index import Index, build_index

DIM = 1280  # the offline profile: Lite2's pooled features, no projection head
PER_CENTRE = 100
SPREAD = 0.6  # noise norm relative to the unit centre: cosine to its centre about 0.86
K = 10
QUERIES = 100
LOOP_QUERIES = 20
LOOP_SLICE = 50_000


def clustered(n: int, rng: np.random.Generator, centre: np.ndarray) -> np.ndarray:
    """`n` normalised vectors around random rows of `centre`, made in chunks (no float64 copy)."""
    dim = centre.shape[1]
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, 100_000):
        m = min(100_000, n - start)
        noise = rng.standard_normal((m, dim), dtype=np.float32) * np.float32(SPREAD / np.sqrt(dim))
        block = centre[rng.integers(0, len(centre), m)] + noise
        out[start : start + m] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def naive_search(gallery: np.ndarray, query: np.ndarray, k: int) -> list[int]:
    """The original's search: one cosine per gallery vector in Python, then a full sort."""
    scores = []
    for i, vector in enumerate(gallery):
        cosine = np.dot(query, vector) / (np.linalg.norm(query) * np.linalg.norm(vector))
        scores.append((float(cosine), i))
    scores.sort(reverse=True)
    return [i for _, i in scores[:k]]


def latencies(search: Callable[[np.ndarray], object], queries: np.ndarray) -> list[float]:
    """Milliseconds per single-query call, after two untimed warm-up calls."""
    for query in queries[:2]:
        search(query)
    times = []
    for query in queries:
        start = time.perf_counter()
        search(query)
        times.append((time.perf_counter() - start) * 1000.0)
    return times


def recall_at_k(exact: np.ndarray, approx: np.ndarray) -> float:
    hits = [len(set(a) & set(b)) / len(a) for a, b in zip(exact, approx, strict=True)]
    return float(np.mean(hits))


def bench_gallery(n: int, seed: int, dim: int = DIM) -> tuple[list[Row], list[str]]:
    rng = np.random.default_rng(seed)
    centre = rng.standard_normal((max(1, n // PER_CENTRE), dim), dtype=np.float32)
    centre /= np.linalg.norm(centre, axis=1, keepdims=True)
    gallery = clustered(n, rng, centre)
    queries = clustered(QUERIES, rng, centre)

    rows_looped = min(n, LOOP_SLICE)
    scale = n / rows_looped
    part = gallery[:rows_looped]
    loop_ms = latencies(lambda q: naive_search(part, q, K), queries[:LOOP_QUERIES])
    loop_ms = [t * scale for t in loop_ms]

    exact = build_index(gallery, "exact")
    exact_ms = latencies(lambda q: exact.search(q, K), queries)
    truth, _ = exact.search(queries, K)
    # Built after the exact timings: FAISS's OpenMP threads would otherwise still be spinning.
    start = time.perf_counter()
    ivf = build_index(gallery, "ivf", seed=seed)
    build_s = time.perf_counter() - start
    ivf_ms = latencies(lambda q: ivf.search(q, K), queries)
    found, _ = ivf.search(queries, K)
    label = f"{n:,}"
    rows = [
        Row(
            f"{label}: exact p50 vs loop p50",
            percentile(exact_ms, 50),
            percentile(loop_ms, 50),
            "ms",
            higher_is_better=False,
        ),
        Row(
            f"{label}: exact p95 vs loop p95",
            percentile(exact_ms, 95),
            percentile(loop_ms, 95),
            "ms",
            higher_is_better=False,
        ),
        Row(
            f"{label}: ivf p50 vs loop p50",
            percentile(ivf_ms, 50),
            percentile(loop_ms, 50),
            "ms",
            higher_is_better=False,
        ),
        Row(
            f"{label}: ivf p95 vs loop p95",
            percentile(ivf_ms, 95),
            percentile(loop_ms, 95),
            "ms",
            higher_is_better=False,
        ),
        Row(
            f"{label}: ivf p50 vs exact p50",
            percentile(ivf_ms, 50),
            percentile(exact_ms, 50),
            "ms",
            higher_is_better=False,
        ),
    ]
    loop_how = (
        "the whole gallery"
        if scale == 1
        else f"the first {rows_looped:,} vectors, scaled x{scale:g} to {n:,} (extrapolated)"
    )
    notes = [
        f"{label}: ivf recall@{K} vs exact over {QUERIES} queries: {recall_at_k(truth, found):.3f};"
        f" {_describe(ivf)}; built in {build_s:.1f} s (k-means on a seeded sample + adding all)",
        f"{label}: loop timed over {LOOP_QUERIES} queries on {loop_how}",
    ]
    if scale == 1:
        agrees = all(
            naive_search(gallery, q, K) == list(t)
            for q, t in zip(queries[:5], truth[:5], strict=True)
        )
        notes.append(f"{label}: loop top-{K} equals exact top-{K} on 5 queries: {agrees}")
    return rows, notes


def _describe(index: Index) -> str:
    return index.describe().replace(" index of", " of")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100,000 vectors instead of 1,000,000")
    parser.add_argument(
        "--dim", type=int, default=DIM, help=f"vector width (default {DIM}; 512 with a linear head)"
    )
    args = parser.parse_args(argv)
    rows, notes = [], []
    for seed, n in enumerate((5_000, 100_000 if args.quick else 1_000_000)):
        more_rows, more_notes = bench_gallery(n, seed, args.dim)
        rows += more_rows
        notes += more_notes
    notes.append(
        f"{args.dim}-d vectors, {PER_CENTRE} around each seeded direction; single-query "
        f"calls, top-{K}; ms = milliseconds per query; ratio = times faster"
    )
    print_table("bench_search: single-query latency", rows, notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
