"""Near-duplicate search: is this photo, or an edited copy of it, already in the gallery?

Training pulls every photo of a class into one clump, so the trained embedding cannot tell the
query's own original from another photo of the same dish. A second descriptor answers that
question: the frozen pretrained backbone (models/pretrained), GeM-pooled over its last feature
map, which keeps the photo-level detail the class loss discards. The copy_gallery stage stores
it for every gallery photo in data/copies/ (the layout of data/gallery) with the rule below.

The descriptor is PCA-whitened on the gallery's own photos (`retrieval/whitening.py`).

The rule (DISC21-style score normalisation): a gallery photo is a copy of the query when its
copy score (cosine) beats the mean copy score of the query's next `BACKGROUND` photos by at
least `margin`. An absolute cosine cannot decide it: a strongly edited copy scores below an
unedited photo of the same dish, but it stands out from the query's other neighbours. The mean
of several neighbours (not the second best alone) leaves a photo that is in the gallery twice
flagged twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from siamese_cv.core.errors import UserError

if TYPE_CHECKING:
    from siamese_cv.retrieval.whitening import Whitening

BACKGROUND = 10  # neighbours after the best whose mean score a copy must beat


@dataclass(frozen=True)
class CopyRule:
    """Flag a hit when its copy score >= mean of the query's next BACKGROUND scores + margin."""

    margin: float
    descriptor: str  # what computes the copy scores, for people reading a result

    def describe(self) -> str:
        return (
            f"copy score ({self.descriptor}) at least {self.margin:.3f} above the mean of the "
            f"query's next {BACKGROUND} photos"
        )

    def to_dict(self) -> dict[str, Any]:
        return {"margin": self.margin, "background": BACKGROUND, "descriptor": self.descriptor}


def find_copies(
    queries: np.ndarray, gallery: np.ndarray, rule: CopyRule
) -> list[list[tuple[int, float]]]:
    """Per query row, the gallery rows the rule calls copies and their copy scores, best first.

    Only the best 1 + BACKGROUND photos can be flagged: the rule compares each with the mean of
    the BACKGROUND after the best. A one-photo gallery flags nothing (there is no background).
    """
    from siamese_cv.retrieval.index import top_k  # here: the stages that store copies never search

    if len(gallery) < 2:
        return [[] for _ in range(len(np.atleast_2d(queries)))]
    rows, scores = top_k(gallery, queries, 1 + BACKGROUND)
    lift = lifts(scores)
    return [
        [(int(r), float(s)) for r, s, up in zip(row, score, ups, strict=True) if up >= rule.margin]
        for row, score, ups in zip(rows, scores, lift, strict=True)
    ]


def lifts(top: np.ndarray) -> np.ndarray:
    """How far each of a query's best scores (`top` [q, k], best first) beats the mean of the
    BACKGROUND scores after its best: what the rule compares with the margin (zeros when there
    is no background)."""
    if top.shape[1] < 2:
        return np.zeros(top.shape)
    return top - top[:, 1 : 1 + BACKGROUND].mean(axis=1, keepdims=True)


def choose_margin(background_lift: np.ndarray, false_flags: float) -> float:
    """The smallest margin that flags at most `false_flags` of queries with no copy.

    Args:
        background_lift: each no-copy query's best score minus the mean of its next BACKGROUND.
    """
    lifts = np.sort(np.asarray(background_lift, np.float64))[::-1]
    if not len(lifts):
        raise UserError(
            "copies.margin: auto needs validation photos to choose it; set data.val_fraction "
            "above 0 or give copies.margin a number (0.1 suits the frozen EfficientNet-Lite2)"
        )
    allowed = int(np.floor(false_flags * len(lifts)))  # queries that may stay flagged
    # just above the first lift that must not be flagged
    return float(np.nextafter(lifts[allowed], np.inf)) if allowed < len(lifts) else 0.0


def copy_descriptor(pretrained: Path, whitening: Whitening | None = None):
    """The frozen pretrained backbone, GeM-pooled where its pooling can be swapped, with
    `whitening` as its head when given.

    Returns:
        (the module, the pretrained card, a name for people: backbone, weights, pooling and
        whitening).
    """
    from siamese_cv.models.pretrained import load_pretrained
    from siamese_cv.models.siamese import EmbeddingNet

    backbone, card = load_pretrained(pretrained)
    pooling = "GeM-pooled" if backbone.pool_attr is not None else "its own pooling"
    if backbone.pool_attr is not None:
        backbone.set_pooling("gem")
    name = f"frozen {card['backbone']} ({card['weights']}), {pooling}"
    net = EmbeddingNet(backbone, "identity", backbone.feature_dim)
    if whitening is not None:
        net.head, net.embedding_dim = whitening, whitening.dims
        name += f", PCA-whitened to {whitening.dims} dims"
    return net, card, name


@dataclass
class CopyGallery:
    """data/copies: every gallery photo's copy descriptor, in gallery order, and the rule."""

    vectors: np.ndarray  # float32 [n, dim], unit rows
    rule: CopyRule
    meta: dict[str, Any]
    whitening: Whitening | None = None  # the descriptor's head, fitted on this gallery


def copy_embedder(
    pretrained: Path,
    size: Any,
    engine: str,
    precision: str,
    batch_size: int,
    whitening: Whitening | None = None,
):
    """The copy descriptor's `Embedder`: (embedder, pretrained card, descriptor name).

    Args:
        size: what gives the input size and resize (`preprocess` params or a `Preprocessing`).
        engine, precision: as export.engine and export.precision (or a gallery's record).
        whitening: the descriptor's head (`retrieval/whitening.py`); None embeds unwhitened.
    """
    from siamese_cv.inference.embedder import Embedder

    model, card, name, prep, resolved = copy_network(pretrained, size, precision, whitening)
    return Embedder(model, prep, resolved, batch_size, engine=engine), card, name


def copy_network(pretrained: Path, size: Any, precision: str, whitening: Whitening | None = None):
    """The copy descriptor and how it embeds: (network, pretrained card, name, its
    `Preprocessing`, its resolved `Precision`); arguments as `copy_embedder`'s."""
    from siamese_cv.inference.hardware import resolve_device, resolve_precision
    from siamese_cv.models.pretrained import preprocessing_of

    model, card, name = copy_descriptor(pretrained, whitening)
    resolved = resolve_precision(precision, resolve_device("auto"))
    return model, card, name, preprocessing_of(size, card), resolved


def copy_descriptor_of(copies: CopyGallery, pretrained: Path):
    """The network that made `copies` and how it ran: (network, `Preprocessing`, `Precision`,
    engine), to embed queries alike.

    Raises:
        UserError: models/pretrained now holds other weights than the ones that made it.
    """
    from siamese_cv.models.siamese import Preprocessing

    meta = copies.meta
    prep = Preprocessing.from_dict(meta["preprocessing"])
    model, card, _, prep, resolved = copy_network(
        pretrained, prep, meta["precision"], copies.whitening
    )
    if card["fingerprint"] != meta["pretrained_fingerprint"]:
        raise UserError(
            f"{pretrained} holds other weights than the copy gallery's; "
            "run `dvc repro copy_gallery`"
        )
    return model, prep, resolved, meta["engine"]


def copy_embedder_of(
    copies: CopyGallery, pretrained: Path, batch_size: int = 64, engine: str | None = None
):
    """The embedder that made `copies`, to embed queries alike (`engine` overrides its engine).

    Raises:
        UserError: models/pretrained now holds other weights than the ones that made it.
    """
    from siamese_cv.inference.embedder import Embedder

    model, prep, precision, made_with = copy_descriptor_of(copies, pretrained)
    return Embedder(model, prep, precision, batch_size, engine=engine or made_with)


def write_copy_gallery(
    directory: Path,
    rows: Any,
    vectors: np.ndarray,
    meta: dict,
    arrays: dict[str, np.ndarray] | None = None,
) -> None:
    """Write data/copies in data/gallery's layout (`rows`: a `Gallery` for ids and labels), with
    `arrays` beside it (the evaluation's queries: evaluation/copy_queries.py)."""
    from siamese_cv.retrieval.gallery import gallery_table, write_gallery

    table = gallery_table(rows.ids, rows.splits, rows.labels, rows.label_names, vectors)
    write_gallery(
        directory, table, {**meta, "count": len(vectors), "dim": vectors.shape[1]}, arrays
    )


def load_copy_gallery(directory: Path, gallery_ids: list[str]) -> CopyGallery | None:
    """data/copies for the gallery whose ids are `gallery_ids`; None when there is none.

    Raises:
        UserError: it describes another gallery's photos.
    """
    from siamese_cv.retrieval.gallery import EMBEDDINGS, load_gallery
    from siamese_cv.retrieval.whitening import load_whitening

    if not (directory / EMBEDDINGS).is_file():
        return None
    copies = load_gallery(directory)
    if copies.ids != gallery_ids:
        raise UserError(
            f"{directory} describes other photos than the gallery; run `dvc repro copy_gallery`"
        )
    rule = copies.meta["rule"]
    return CopyGallery(
        copies.vectors,
        CopyRule(rule["margin"], rule["descriptor"]),
        copies.meta,
        load_whitening(directory),
    )
