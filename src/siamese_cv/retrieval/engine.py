"""The one query path: load a project's model, gallery and index once, then answer queries.

    engine = SearchEngine.load(".")              # models/, data/gallery, data/index
    hits = engine.search(Path("photo.jpg"), top=10)
    more = engine.similar(hits[0].id)

`siamese-search` (one query per process) and `siamese-serve` (many, concurrently) both use it.

Decisions:

- A query is embedded exactly as export_gallery embedded the gallery: the engine (torch or
  onnxruntime), precision and input sizes come from the gallery's `meta.json`, not from flags,
  so a gallery photo's stored image embeds to its own vector.
- The model and gallery must belong together (the model fingerprint in `meta.json`), and a saved
  index must be this gallery's; anything else is a `UserError` naming the stage to rerun.
- With an IVF index the engine keeps FAISS's compressed codes and drops the float32 matrix; a
  gallery photo's stored vector (`similar`) is read from its parquet row group when asked for.
- Copies come first: with data/copies (the copy_gallery stage) a query is also described by the
  frozen pretrained backbone, and the gallery photos its rule calls copies of the query lead the
  hits, marked `copy` with their copy score; the merely similar photos follow, by the trained
  embedding. Without data/copies the search is the trained embedding's alone.
- The engine is immutable after `load`: a newer project state is a new engine (the server swaps
  whole engines), so concurrent queries never see half of an update.
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from threading import Lock
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from siamese_cv.core import paths
from siamese_cv.core.errors import UserError
from siamese_cv.models.pretrained import CARD_FILE, WEIGHTS_FILE
from siamese_cv.retrieval.copies import (
    CopyGallery,
    copy_embedder_of,
    find_copies,
    load_copy_gallery,
)
from siamese_cv.retrieval.gallery import EMBEDDINGS, META, load_gallery
from siamese_cv.retrieval.index import (
    INDEX_META,
    IVF_FILE,
    ExactIndex,
    Index,
    build_index,
    load_index,
    normalize_rows,
)

__all__ = ["Hit", "Query", "SearchEngine", "outputs_fingerprint"]

logger = logging.getLogger(__name__)

_REEXPORT = "run `dvc repro export_gallery`"
_CACHED_ROW_GROUPS = 4  # image row groups kept decoded-from-parquet (bytes, not pixels)


@dataclass(frozen=True)
class Hit:
    rank: int
    id: str
    label_name: str
    score: float  # the trained embedding's cosine to the query
    copy: bool = False  # the copy rule calls this photo a copy of the query
    copy_score: float | None = None  # the copy descriptor's cosine, for a copy


@dataclass(frozen=True)
class Query:
    """One query, embedded for both questions."""

    vector: np.ndarray  # the trained embedding [dim]
    copy_vector: np.ndarray | None = None  # the copy descriptor [copy dim]; None without copies


@dataclass(frozen=True)
class _Layout:
    model: Path
    gallery: Path
    index: Path
    processed: Path
    copies: Path
    pretrained: Path

    def files(self) -> list[Path]:
        return [
            self.model / "config.json",
            self.model / "model.safetensors",
            self.gallery / META,
            self.gallery / EMBEDDINGS,
            self.index / INDEX_META,
            self.index / IVF_FILE,
            self.copies / META,
            self.copies / EMBEDDINGS,
            self.pretrained / CARD_FILE,
            self.pretrained / WEIGHTS_FILE,
        ]


def outputs_fingerprint(
    project_dir: str | Path = ".",
    *,
    model_dir: str | Path | None = None,
    gallery_dir: str | Path | None = None,
    index_dir: str | Path | None = None,
) -> tuple:
    """What the outputs an engine reads look like on disk now (name, inode, size, mtime).

    Cheap enough to poll every second: a `dvc repro` or `dvc checkout` that replaces any of them
    changes it (both write new files and rename them into place).
    """
    return _files_fingerprint(
        _layout(Path(project_dir), model_dir, gallery_dir, index_dir, None, None)
    )


def _files_fingerprint(layout: _Layout) -> tuple:
    stamp = []
    for path in layout.files():
        try:
            st = os.stat(path)
        except OSError:
            stamp.append((str(path), None))
            continue
        stamp.append((str(path), st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(stamp)


def _layout(root: Path, model, gallery, index, processed, copies) -> _Layout:
    """The folders an engine reads; the pretrained weights are those beside the model's."""
    model_dir = Path(model) if model else root / paths.MODEL
    return _Layout(
        model_dir,
        Path(gallery) if gallery else root / paths.GALLERY,
        Path(index) if index else root / paths.INDEX,
        Path(processed) if processed else root / paths.PROCESSED,
        Path(copies) if copies else root / paths.COPIES,
        model_dir / paths.PRETRAINED.name,
    )


class SearchEngine:
    """A loaded model, gallery and index; thread-safe for concurrent queries.

    Make one with `SearchEngine.load`; the constructor is internal.
    """

    def __init__(
        self,
        *,
        embedder: Any,
        index: Index,
        ids: list[str],
        splits: list[str],
        label_names: list[str],
        vectors: np.ndarray | None,
        meta: dict[str, Any],
        layout: _Layout,
        fingerprint: tuple,
        copies: CopyGallery | None = None,
        copy_embedder: Any = None,
    ):
        self._embedder = embedder
        self.copies = copies  # None: no data/copies, the search answers by similarity alone
        self._copy_embedder = copy_embedder
        self.index = index
        self.ids = ids
        self.splits = splits
        self.label_names = label_names
        self._vectors = vectors  # None with an ivf index: read rows from the gallery file
        self.meta = meta
        self.prep = embedder.prep
        self.layout = layout
        self.fingerprint = fingerprint
        self.loaded_at = time.time()
        self._row = {photo_id: i for i, photo_id in enumerate(ids)}
        self.classes = sorted(set(label_names))
        self._by_label = {
            name: np.flatnonzero(np.asarray(label_names, dtype=object) == name)
            for name in self.classes
        }
        self._images: dict[str, tuple[Path, list[int], np.ndarray]] = {}
        self._image_cache: OrderedDict[tuple[str, int], list[bytes]] = OrderedDict()
        self._image_lock = Lock()

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(
        cls,
        project_dir: str | Path = ".",
        *,
        model_dir: str | Path | None = None,
        gallery_dir: str | Path | None = None,
        index_dir: str | Path | None = None,
        processed_dir: str | Path | None = None,
        copies_dir: str | Path | None = None,
        index_kind: str | None = None,
        engine: str | None = None,
        threads: int | None = None,
    ) -> SearchEngine:
        """Load `project_dir`'s models/, data/gallery, data/index and data/copies (each folder
        overridable; without data/copies no hit is marked a copy).

        Args:
            index_kind: None: the saved index (exact search when none was saved); "exact";
                or "ivf" (the saved one, else built now, which takes a while on large galleries).
            engine: override the gallery's recorded engine (`torch`, `onnxruntime`); None keeps
                it, which is what makes queries embed like the gallery.
            threads: CPU threads for the network (None: torch's default).

        Raises:
            UserError: a missing output, a model and gallery that do not belong together, or an
                index of another gallery; the message names the `dvc repro` that fixes it. A
                stale data/copies only turns the copy marks off, with a warning.
        """
        import torch

        from siamese_cv.inference.embedder import Embedder
        from siamese_cv.inference.hardware import resolve_device
        from siamese_cv.models.siamese import Preprocessing, load_checkpoint

        root = Path(project_dir)
        layout = _layout(root, model_dir, gallery_dir, index_dir, processed_dir, copies_dir)
        fingerprint = _files_fingerprint(layout)
        started = time.perf_counter()
        gallery = load_gallery(layout.gallery)
        model, config = load_checkpoint(layout.model)
        if config.get("fingerprint") != gallery.meta.get("model_fingerprint"):
            raise UserError(
                f"{layout.gallery} was embedded by another model than {layout.model}; {_REEXPORT}"
            )
        prep = Preprocessing.from_dict(gallery.meta.get("preprocessing", config["preprocessing"]))
        if prep != Preprocessing.from_dict(config["preprocessing"]):
            raise UserError(
                f"{layout.gallery}: its preprocessing differs from {layout.model}'s; {_REEXPORT}"
            )
        engine_name = engine or gallery.meta.get("engine", "torch")
        precision = _precision(gallery.meta.get("precision", "auto"), resolve_device("auto"))
        if threads:
            torch.set_num_threads(threads)
        embedder = Embedder(model, prep, precision, batch_size=64, engine=engine_name)
        index = _choose_index(gallery.vectors, layout.index, index_kind)
        vectors = index.vectors if isinstance(index, ExactIndex) else None
        copies, copy_embedder = _load_copies(layout, gallery.ids, prep, engine)
        engine_obj = cls(
            embedder=embedder,
            index=index,
            ids=gallery.ids,
            splits=gallery.splits,
            label_names=gallery.label_names,
            vectors=vectors,
            meta={**gallery.meta, "backbone": config.get("backbone")},
            layout=layout,
            fingerprint=fingerprint,
            copies=copies,
            copy_embedder=copy_embedder,
        )
        del gallery  # with an ivf index, the float32 matrix goes here
        logger.info(
            "search engine: %s, %s embedder (%s), model %s, copies: %s; loaded in %.1f s",
            index.describe(),
            engine_name,
            embedder.precision.name,
            config.get("fingerprint"),
            copies.rule.describe() if copies else f"none marked (no {layout.copies})",
            time.perf_counter() - started,
        )
        return engine_obj

    # ------------------------------------------------------------------ queries

    def prepare(self, image: Image.Image | bytes | str | Path) -> Image.Image:
        """Decode and resize a query exactly like the dataset (`load_rgb`).

        Raises:
            ImageError: not a usable image (`siamese_cv.data.images`).
        """
        from siamese_cv.data.images import load_rgb, resize_image

        prep = self.prep
        if isinstance(image, Image.Image):
            return resize_image(image.convert("RGB"), prep.image_size, prep.resize)
        return load_rgb(image, prep.image_size, prep.resize)

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Embed prepared images (`prepare`) in one batch: float32 [n, dim], L2-normalised."""
        return self._embedder.embed_images(list(images))

    def embed_queries(self, images: Sequence[Image.Image]) -> list[Query]:
        """Embed prepared images (`prepare`) for both questions, each network in one batch."""
        vectors = self.embed(images)
        if self._copy_embedder is None:
            return [Query(v) for v in vectors]
        copy_vectors = self._copy_embedder.embed_images(list(images))
        return [Query(v, c) for v, c in zip(vectors, copy_vectors, strict=True)]

    def search(
        self,
        image: Image.Image | bytes | str | Path,
        top: int = 20,
        label: str | None = None,
        nprobe: int | None = None,
    ) -> list[Hit]:
        """The gallery's `top` photos most similar to `image` (a path, bytes or PIL image),
        its copies first.

        Raises:
            ImageError: `image` is not a usable image.
            UserError: an unknown `label`, or `top` below 1.
        """
        return self.search_query(self.embed_queries([self.prepare(image)])[0], top, label, nprobe)

    def similar(self, gallery_id: str, top: int = 20, label: str | None = None) -> list[Hit]:
        """The photos most similar to gallery photo `gallery_id`, by its stored vectors (the
        photo itself, and any duplicates of it, are its copies).

        Raises:
            KeyError: no gallery photo has that id.
        """
        copy_vector = self.copies.vectors[self._row[gallery_id]] if self.copies else None
        return self.search_query(Query(self.vector(gallery_id), copy_vector), top, label)

    def search_query(
        self, query: Query, top: int = 20, label: str | None = None, nprobe: int | None = None
    ) -> list[Hit]:
        """The `top` hits for one embedded query: the copies the rule flags first (within
        `label`, if given), then the most similar of the other photos."""
        if self.copies is None or query.copy_vector is None:
            return self.search_vectors(query.vector[None], top, label, nprobe)[0]
        found = find_copies(query.copy_vector[None], self.copies.vectors, self.copies.rule)[0]
        if label is not None:
            found = [(row, score) for row, score in found if self.label_names[row] == label]
        found = found[:top]
        similar = self.search_vectors(query.vector[None], top + len(found), label, nprobe)[0]
        copy_rows = {row for row, _ in found}
        vector = normalize_rows(query.vector)[0]
        hits = [
            Hit(0, self.ids[row], self.label_names[row], float(self._stored(row) @ vector),
                copy=True, copy_score=score)
            for row, score in found
        ]  # fmt: skip
        hits += [h for h in similar if self._row[h.id] not in copy_rows]
        return [replace(h, rank=rank) for rank, h in enumerate(hits[:top], start=1)]

    def copy_rule(self) -> str | None:
        """The rule that marks a hit a copy, in words; None when no hit can be one."""
        return self.copies.rule.describe() if self.copies else None

    def search_vectors(
        self,
        vectors: np.ndarray,
        top: int = 20,
        label: str | None = None,
        nprobe: int | None = None,
    ) -> list[list[Hit]]:
        """The `top` most similar for each row of `vectors` [q, dim], optionally within one
        `label`, by the trained embedding alone (no copies marked)."""
        if top < 1:
            raise UserError(f"top: {top} must be at least 1")
        vectors = normalize_rows(vectors)
        if label is None:
            rows, scores = self.index.search(vectors, top, nprobe=nprobe)
        else:
            rows, scores = self._search_label(vectors, top, label, nprobe)
        return [
            [
                Hit(r + 1, self.ids[i], self.label_names[i], float(s))
                for r, (i, s) in enumerate(zip(row, score, strict=True))
            ]
            for row, score in zip(rows, scores, strict=True)
        ]

    def _search_label(self, vectors: np.ndarray, top: int, label: str, nprobe: int | None):
        members = self._by_label.get(label)
        if members is None:
            raise UserError(f"label: {label!r} is not a class of this gallery; see /api/info")
        if self._vectors is not None:  # exact: score the label's rows only
            scores = vectors @ self._vectors[members].T
            k = min(top, len(members))
            order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
            return members[order], np.take_along_axis(scores, order, axis=1)
        # ivf: ask for more until `top` of them carry the label (or every vector was returned)
        wanted = min(top, len(members))
        allowed = np.zeros(len(self.ids), dtype=bool)
        allowed[members] = True
        out_rows, out_scores = [], []
        for query in vectors:
            k = min(self.index.ntotal, 4 * top)
            while True:
                rows, scores = self.index.search(query[None], k, nprobe=nprobe)
                keep = allowed[rows[0]]
                if keep.sum() >= wanted or k >= self.index.ntotal:
                    break
                k = min(self.index.ntotal, 2 * k)
            out_rows.append(rows[0][keep][:wanted])
            out_scores.append(scores[0][keep][:wanted])
        return out_rows, out_scores

    # ------------------------------------------------------------------ gallery rows

    def has(self, gallery_id: str) -> bool:
        return gallery_id in self._row

    def row(self, gallery_id: str) -> int:
        """The gallery row of `gallery_id`. Raises KeyError when there is none."""
        return self._row[gallery_id]

    def vector(self, gallery_id: str) -> np.ndarray:
        """The stored (export_gallery) vector of a gallery photo. Raises KeyError."""
        return self._stored(self._row[gallery_id])

    def _stored(self, row: int) -> np.ndarray:
        if self._vectors is not None:
            return self._vectors[row]
        file = pq.ParquetFile(self.layout.gallery / EMBEDDINGS)
        group, offset = _locate(file, row)
        column = file.read_row_group(group, columns=["vector"]).column("vector")
        return np.asarray(column[offset].as_py(), dtype=np.float32)

    def image_bytes(self, gallery_id: str) -> bytes:
        """The stored photo (data/processed) of a gallery id, as the gallery embedded it.

        Raises:
            KeyError: no gallery photo has that id.
            UserError: data/processed does not hold it (run `dvc repro preprocess`).
        """
        split = self.splits[self._row[gallery_id]]
        path, starts, ids = self._split_ids(split)
        at = np.flatnonzero(ids == gallery_id)
        if not at.size:
            raise UserError(f"{path}: no photo {gallery_id!r}; run `dvc repro preprocess`")
        position = int(at[0])
        group = int(np.searchsorted(starts, position, side="right") - 1)
        key = (split, group)
        with self._image_lock:
            images = self._image_cache.get(key)
            if images is not None:
                self._image_cache.move_to_end(key)
        if images is None:
            table = pq.ParquetFile(path).read_row_group(group, columns=["image"])
            images = table.column("image").to_pylist()
            with self._image_lock:
                self._image_cache[key] = images
                while len(self._image_cache) > _CACHED_ROW_GROUPS:
                    self._image_cache.popitem(last=False)
        return images[position - starts[group]]

    def _split_ids(self, split: str) -> tuple[Path, list[int], np.ndarray]:
        with self._image_lock:
            found = self._images.get(split)
        if found is not None:
            return found
        path = self.layout.processed / f"{split}.parquet"
        if not path.is_file():
            raise UserError(f"{path}: no processed images; run `dvc repro preprocess`")
        file = pq.ParquetFile(path)
        starts = [0]
        for i in range(file.metadata.num_row_groups):
            starts.append(starts[-1] + file.metadata.row_group(i).num_rows)
        ids = np.asarray(file.read(columns=["id"]).column("id").to_pylist(), dtype=object)
        found = (path, starts, ids)
        with self._image_lock:
            self._images[split] = found
        return found

    # ------------------------------------------------------------------ description

    def info(self) -> dict[str, Any]:
        """What is being served: model, embedder, gallery and index, for /api/info and logs."""
        return {
            "model_fingerprint": self.meta.get("model_fingerprint"),
            "backbone": self.meta.get("backbone"),
            "embedding_dim": int(self.index.dim),
            "gallery_size": len(self.ids),
            "index_kind": self.index.kind,
            "classes": self.classes,
            "engine": self._embedder.engine,
            "precision": self._embedder.precision.name,
            "image_size": self.prep.image_size,
            "input_sizes": list(self.prep.sizes),
            "splits": sorted(set(self.splits)),
            "copy_rule": self.copy_rule(),
        }


def _load_copies(layout: _Layout, gallery_ids: list[str], prep: Any, engine: str | None):
    """data/copies and the embedder of its descriptor; (None, None) when there is none, or when
    it is stale (a warning names the stage to rerun): similarity search goes on without it."""
    try:
        copies = load_copy_gallery(layout.copies, gallery_ids)
        if copies is None:
            return None, None
        embedder = copy_embedder_of(copies, layout.pretrained, engine=engine)
        if (embedder.prep.image_size, embedder.prep.resize) != (prep.image_size, prep.resize):
            raise UserError(
                f"{layout.copies} was made at another image size than {layout.gallery}; "
                "run `dvc repro copy_gallery`"
            )
    except UserError as error:
        logger.warning("no hit is marked a copy: %s", error)
        return None, None
    return copies, embedder


def _precision(recorded: str, device):
    """The precision export_gallery recorded, on this machine (fp16 needs a GPU: then auto)."""
    from siamese_cv.inference.hardware import resolve_precision

    try:
        return resolve_precision(recorded, device)
    except UserError as error:
        logger.warning("gallery precision %s cannot run here (%s); using auto", recorded, error)
        return resolve_precision("auto", device)


def _choose_index(vectors: np.ndarray, index_dir: Path, kind: str | None) -> Index:
    saved = load_index(index_dir, vectors)
    if saved is not None and kind in (None, saved.kind):
        return saved
    if kind in (None, "exact"):
        return ExactIndex(normalize_rows(vectors))
    logger.warning(
        "no saved ivf index in %s; building one now (save it: set search.index: ivf and run "
        "`dvc repro index_gallery`)",
        index_dir,
    )
    try:
        return build_index(vectors, "ivf")
    except ImportError as error:
        raise UserError(str(error)) from None


def _locate(file: pq.ParquetFile, row: int) -> tuple[int, int]:
    start = 0
    for group in range(file.metadata.num_row_groups):
        rows = file.metadata.row_group(group).num_rows
        if row < start + rows:
            return group, row - start
        start += rows
    raise KeyError(row)
