"""Stage `baseline`: the same test metrics for the frozen pretrained backbone (no training)
-> metrics/baseline.json (the keys of metrics/test.json), metrics/per_class/baseline.tsv.

It is its own stage so that an edit of a training parameter does not recompute it: the
baseline depends only on the data, the starting weights and the evaluation settings.
"""

from __future__ import annotations

try:  # `dvc repro` runs the `python` on PATH: without the venv, say what to do in one line
    import siamese_cv  # noqa: F401
except ModuleNotFoundError as missing:
    raise SystemExit(f"{missing}: run `source .venv/bin/activate` or `make repro`") from None

import functools
import logging
from collections.abc import Sequence

import numpy as np

from siamese_cv.config.stage import run_stage, stage_params
from siamese_cv.core import paths
from siamese_cv.evaluation import scoring
from siamese_cv.evaluation.copy_detection import copy_detection_metrics, copy_queries, embed_copies
from siamese_cv.inference.embedder import Embedder
from siamese_cv.inference.hardware import resolve_device, resolve_precision
from siamese_cv.inference.prefix_maps import from_maps_or_images, frozen_tail_embedder, ids_digest
from siamese_cv.models.pretrained import load_pretrained, preprocessing_of
from siamese_cv.models.siamese import EmbeddingNet

log = logging.getLogger(__name__)

STAGE = "baseline"


def main(argv: Sequence[str] | None = None) -> int:
    params = stage_params(argv, __doc__)
    backbone, card = load_pretrained(paths.PRETRAINED)
    model = EmbeddingNet(backbone, "identity", backbone.feature_dim)
    settings, splits = params.evaluate, list(params.export.splits)
    precision = resolve_precision(settings.precision, resolve_device("auto"))
    prep = preprocessing_of(params.preprocess, card)

    @functools.cache  # only when the stored prefix maps cannot stand in for the images
    def embedder() -> Embedder:
        return Embedder(model, prep, precision, settings.batch_size, engine=settings.engine)

    tail = frozen_tail_embedder(
        paths.PREFIX_MAPS, model, prep, precision, settings.batch_size, settings.engine, STAGE
    )
    test = scoring.load_test_set()
    test_emb = from_maps_or_images(
        tail,
        "test",
        {"ids": ids_digest(scoring.split_column(["test"], "id"))},
        STAGE,
        lambda: scoring.embed_splits(embedder(), ["test"])[0],
    )
    gallery_ids = ids_digest(scoring.split_column(splits, "id"))
    gallery_emb = from_maps_or_images(
        tail,
        "gallery",
        {"ids": gallery_ids},
        STAGE,
        lambda: scoring.embed_splits(embedder(), splits)[0],
    )
    gallery_labels = np.asarray(scoring.split_column(splits, "label"), np.int64)
    scores = scoring.score_embeddings(
        test_emb, test, gallery_emb, gallery_labels, settings.recall_at
    )
    # the backbone it started from, alone: its one embedding answers the copy question too
    copies = copy_queries(scoring.split_images(splits), params.copies.queries, params.copies.seed)
    found = None
    if copies:
        about = {"gallery_ids": gallery_ids, "queries": params.copies.queries}
        embedded = from_maps_or_images(
            tail,
            "copies",
            {**about, "seed": params.copies.seed},
            STAGE,
            lambda: embed_copies(embedder(), copies, f"{STAGE}: copies"),
        )
        found = copy_detection_metrics(
            embedded, [c.source for c in copies], [c.edit for c in copies], test_emb, gallery_emb
        )
    figures = scoring.write_scores(scores, paths.METRICS / "baseline.json", found)
    log.info(
        f"baseline, {card['backbone']} ({card['weights']}) frozen, pooled "
        f"{backbone.feature_dim}-d: "
        + ", ".join(f"{k} {v:.4f}" for k, v in figures.items())
        + scoring.skipped_note(scores)
    )
    return 0


if __name__ == "__main__":
    run_stage(main)
