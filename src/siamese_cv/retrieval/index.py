"""Nearest-neighbour indexes over a gallery's L2-normalised vectors: exact, or FAISS IVF.

A gallery of a few thousand photos is searched fastest by one matrix product (`exact`). Past a
few hundred thousand vectors that product reads the whole float32 matrix per query, so `ivf`
clusters the vectors into `nlist` inverted lists, stores them as 8-bit scalar-quantised codes
(a quarter of the memory) and scans only the `nprobe` lists nearest each query. FAISS builds it
from its factory string (`IVF<nlist>,SQ8`, inner product), which `index.json` records.

Decisions:

- Scores are cosine similarities: vectors and queries are L2-normalised here, so an index never
  depends on its caller having done it (a gallery is already normalised; that costs no copy).
- `nprobe` travels with each call (`faiss.SearchParametersIVF`), never by setting the shared
  index's field, so one call cannot change what a later or concurrent call returns.
- FAISS marks "fewer than k found" with id -1 when the probed lists hold fewer than k vectors.
  Those ids never reach the caller: the short rows are searched again with twice the lists
  until full (all lists at the end, which holds every vector), so every row has min(k, n)
  real hits. Results only grow past the asked-for nprobe, never shrink.
- Training (k-means) runs on a seeded sample, so the same vectors and seed give the same index.
"""

from __future__ import annotations

import hashlib
import json
import math
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import numpy as np

from siamese_cv.config.choices import INDEX_KINDS as KINDS
from siamese_cv.core.atomic import atomic_path
from siamese_cv.core.errors import UserError

INDEX_META = "index.json"
IVF_FILE = "ivf.faiss"  # FAISS's own serialisation (faiss.write_index), not a pickle
IVF_FACTORY = "IVF{nlist},SQ8"  # faiss.index_factory: inverted lists over 8-bit scalar codes
# IVF lists per query by default: 1/128 of them, at least 8. On 1,000,000 clustered vectors
# (benchmarks/bench_search.py, 4,000 lists) recall@10 was 0.964 from nprobe 4 up to 250: what
# it loses is SQ8 rounding among near-tied neighbours, not unprobed lists, while latency grew
# from 0.6 ms (nprobe 4) to 1.4 ms (32) and 17 ms (250).
_DEFAULT_PROBE_SHARE = 128
_MIN_DEFAULT_PROBES = 8
# K-means sample: FAISS asks for at least 39 points per centroid; 40 keeps training quick on
# a million vectors (more points per centroid barely moves the centroids).
_TRAIN_POINTS_PER_LIST = 40


def top_k(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine top-k of each query row against normalised `vectors`.

    Returns:
        (indices [q, k'], scores [q, k']) best first, k' = min(k, len(vectors)); ties by index.
    """
    queries = np.atleast_2d(queries).astype(np.float32, copy=False)
    k = min(k, len(vectors))
    scores = queries @ vectors.T
    if k < len(vectors):
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    else:
        part = np.tile(np.arange(len(vectors)), (len(queries), 1))
    part_scores = np.take_along_axis(scores, part, axis=1)
    order = np.lexsort((part, -part_scores), axis=1)
    best = np.take_along_axis(part, order, axis=1)
    return best, np.take_along_axis(scores, best, axis=1)


def normalize_rows(vectors: np.ndarray) -> np.ndarray:
    """Float32, C-contiguous, unit-length rows; returns `vectors` itself when it already is."""
    array = np.ascontiguousarray(np.atleast_2d(vectors), dtype=np.float32)
    norms = np.linalg.norm(array, axis=1, keepdims=True)
    if np.allclose(norms, 1.0, atol=1e-4):
        return array
    return array / np.maximum(norms, np.finfo(np.float32).tiny)


class Index(ABC):
    """A searchable set of `ntotal` vectors of dimension `dim`; scores are cosines."""

    kind: str

    def __init__(self, ntotal: int, dim: int):
        self.ntotal = ntotal
        self.dim = dim

    def search(
        self, queries: np.ndarray, k: int, nprobe: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The `k` most similar vectors to each query row.

        Args:
            queries: [q, dim] or [dim]; normalised here.
            k: hits per query; more than `ntotal` gives `ntotal`.
            nprobe: IVF lists to scan for this call only (ivf; default `default_nprobe`).

        Returns:
            (indices int64 [q, k'], scores float32 [q, k']), best first, k' = min(k, ntotal);
            every index is a real row number (never -1).

        Raises:
            ValueError: k or nprobe below 1, nprobe on an exact index, or queries of the wrong
                dimension or not finite.
        """
        if k < 1:
            raise ValueError(f"k: {k} must be at least 1")
        if nprobe is not None and nprobe < 1:
            raise ValueError(f"nprobe: {nprobe} must be at least 1")
        queries = normalize_rows(queries)
        if not np.isfinite(queries).all():
            raise ValueError("queries hold NaN or infinite values; check the query embedding")
        if queries.shape[1] != self.dim:
            raise ValueError(
                f"queries have dimension {queries.shape[1]}, the index holds "
                f"{self.dim}-d vectors; embed them with the gallery's model"
            )
        return self._search(queries, min(k, self.ntotal), nprobe)

    @abstractmethod
    def _search(
        self, queries: np.ndarray, k: int, nprobe: int | None
    ) -> tuple[np.ndarray, np.ndarray]: ...

    def describe(self) -> str:
        return f"{self.kind} index of {self.ntotal} x {self.dim}"


class ExactIndex(Index):
    """Every vector scored by one matrix product; exact, and fastest for small galleries."""

    kind = "exact"

    def __init__(self, vectors: np.ndarray):
        super().__init__(*vectors.shape)
        self.vectors = vectors

    def _search(
        self, queries: np.ndarray, k: int, nprobe: int | None
    ) -> tuple[np.ndarray, np.ndarray]:
        if nprobe is not None:
            raise ValueError(
                "nprobe: an exact index has no lists to probe; drop nprobe or build "
                "the index with kind='ivf'"
            )
        index, score = top_k(self.vectors, queries, k)
        return index.astype(np.int64, copy=False), score.astype(np.float32, copy=False)


class IVFIndex(Index):
    """FAISS IVF with 8-bit scalar-quantised vectors, inner product on normalised vectors."""

    kind = "ivf"

    def __init__(self, faiss_index: Any, ntotal: int, dim: int, nlist: int, default_nprobe: int):
        super().__init__(ntotal, dim)
        self.faiss_index = faiss_index
        self.nlist = nlist
        self.default_nprobe = default_nprobe

    def _search(
        self, queries: np.ndarray, k: int, nprobe: int | None
    ) -> tuple[np.ndarray, np.ndarray]:
        probe = min(nprobe or self.default_nprobe, self.nlist)
        scores, ids = self._faiss_search(queries, k, probe)
        short = np.flatnonzero((ids < 0).any(axis=1))
        while short.size and probe < self.nlist:
            probe = min(2 * probe, self.nlist)
            more_scores, more_ids = self._faiss_search(queries[short], k, probe)
            scores[short], ids[short] = more_scores, more_ids
            short = short[(more_ids < 0).any(axis=1)]
        if short.size:  # all lists scanned yet short: only if FAISS lost vectors
            raise RuntimeError(f"ivf index returned fewer than {k} of its {self.ntotal} vectors")
        return ids.astype(np.int64, copy=False), scores.astype(np.float32, copy=False)

    def _faiss_search(
        self, queries: np.ndarray, k: int, nprobe: int
    ) -> tuple[np.ndarray, np.ndarray]:
        import faiss

        # The SWIG entry point directly: pytorch-metric-learning imports faiss.contrib.torch_utils,
        # which replaces `Index.search` with a wrapper that drops the `params` argument.
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        scores = np.empty((len(queries), k), dtype=np.float32)
        ids = np.empty((len(queries), k), dtype=np.int64)
        self.faiss_index.search_c(
            len(queries),
            faiss.swig_ptr(queries),
            k,
            faiss.swig_ptr(scores),
            faiss.swig_ptr(ids),
            faiss.SearchParametersIVF(nprobe=nprobe),
        )
        return scores, ids

    def describe(self) -> str:
        return f"{super().describe()}, {self.nlist} lists, nprobe {self.default_nprobe} by default"


def default_nlist(n: int) -> int:
    """About 4 * sqrt(n) lists: the usual balance of list-scan cost against centroid cost."""
    return max(1, min(n, round(4 * math.sqrt(n))))


def build_index(
    vectors: np.ndarray, kind: str = "exact", nlist: int | None = None, *, seed: int = 0
) -> Index:
    """Index the rows of `vectors` for cosine search.

    Args:
        vectors: [n, dim]; normalised here if they are not already.
        kind: "exact" (matrix product) or "ivf" (FAISS IVF + SQ8, approximate, for large n).
        nlist: ivf only: inverted lists (default about 4 * sqrt(n), at most n).
        seed: ivf only: seeds the k-means training sample and initialisation.

    Raises:
        ValueError: unknown kind, no vectors, nlist given for an exact index, or nlist < 1.
        ImportError: kind "ivf" without faiss-cpu installed (the message says how to fix it).
    """
    if kind not in KINDS:
        raise ValueError(f"index kind {kind!r} is not one of {', '.join(KINDS)}")
    vectors = normalize_rows(vectors)
    if vectors.ndim != 2 or len(vectors) == 0:
        raise ValueError("no vectors to index; export a gallery first (`dvc repro export_gallery`)")
    if kind == "exact":
        if nlist is not None:
            raise ValueError("nlist: an exact index has no lists; drop nlist or use kind='ivf'")
        return ExactIndex(vectors)
    return _build_ivf(vectors, nlist, seed)


def _build_ivf(vectors: np.ndarray, nlist: int | None, seed: int) -> IVFIndex:
    try:
        import faiss
    except ImportError:
        raise ImportError(
            "the ivf index needs faiss-cpu (pinned in requirements.txt): run "
            "`make setup`, or use the exact index"
        ) from None
    n, dim = vectors.shape
    if nlist is not None and nlist < 1:
        raise ValueError(f"nlist: {nlist} must be at least 1")
    nlist = min(nlist or default_nlist(n), n)
    factory = IVF_FACTORY.format(nlist=nlist)
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    clustering = faiss.extract_index_ivf(index).cp
    sample_size = min(n, _TRAIN_POINTS_PER_LIST * nlist)
    rng = np.random.default_rng(seed)
    sample = vectors
    if sample_size < n:
        sample = vectors[np.sort(rng.choice(n, sample_size, replace=False))]
    clustering.seed = seed
    clustering.min_points_per_centroid = 1  # small galleries: fewer points per list is expected
    clustering.max_points_per_centroid = _TRAIN_POINTS_PER_LIST  # we sampled already
    index.train(sample)
    index.add(vectors)
    probes = min(nlist, max(_MIN_DEFAULT_PROBES, math.ceil(nlist / _DEFAULT_PROBE_SHARE)))
    return IVFIndex(index, n, dim, nlist, probes)


def vectors_fingerprint(vectors: np.ndarray) -> str:
    """A content hash of a gallery's vectors: ties a saved index to the vectors it indexes."""
    array = np.ascontiguousarray(vectors, dtype=np.float32)
    digest = hashlib.sha256(f"{array.shape}".encode())
    digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()[:16]


def save_index(index: Index, directory: str | Path, vectors: np.ndarray) -> dict[str, Any]:
    """Write `index` (built from `vectors`) to `directory` atomically; returns its description.

    An exact index is only its description (the gallery holds the vectors); an IVF index adds
    FAISS's file, so a search loads it in seconds instead of re-running k-means.
    """
    meta: dict[str, Any] = {
        "kind": index.kind,
        "ntotal": index.ntotal,
        "dim": index.dim,
        "vectors_fingerprint": vectors_fingerprint(vectors),
    }
    with atomic_path(directory) as tmp:
        tmp.mkdir()
        if isinstance(index, IVFIndex):
            import faiss

            factory = IVF_FACTORY.format(nlist=index.nlist)
            meta |= {"nlist": index.nlist, "nprobe": index.default_nprobe, "factory": factory}
            faiss.write_index(index.faiss_index, str(tmp / IVF_FILE))
        (tmp / INDEX_META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return meta


def load_index(directory: str | Path, vectors: np.ndarray) -> Index | None:
    """The index saved in `directory` for these gallery `vectors`; None if none was saved.

    Raises:
        UserError: the saved index was built from other vectors (a newer gallery), or is
            unreadable; the message names the stage that rebuilds it.
    """
    directory = Path(directory)
    meta_path = directory / INDEX_META
    if not meta_path.is_file():
        return None
    rebuild = "run `dvc repro index_gallery` (or `dvc pull`)"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        kind = meta["kind"]
    except (OSError, ValueError, KeyError) as error:
        raise UserError(f"{meta_path}: unreadable index description ({error}); {rebuild}") from None
    if meta.get("vectors_fingerprint") != vectors_fingerprint(vectors):
        raise UserError(f"{directory}: the index was built from another gallery; {rebuild}")
    if kind == "exact":
        return ExactIndex(normalize_rows(vectors))
    import faiss

    try:
        faiss_index = faiss.read_index(str(directory / IVF_FILE))
    except RuntimeError as error:
        first = str(error).strip().splitlines()[0][:120]
        raise UserError(
            f"{directory / IVF_FILE}: cannot read the index ({first}); {rebuild}"
        ) from None
    return IVFIndex(faiss_index, meta["ntotal"], meta["dim"], meta["nlist"], meta["nprobe"])
