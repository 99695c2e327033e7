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

import logging
from collections.abc import Sequence

from siamese_cv.config.stage import run_stage, stage_params
from siamese_cv.core import paths
from siamese_cv.evaluation import scoring
from siamese_cv.evaluation.copy_detection import copy_detection_metrics, copy_queries, embed_copies
from siamese_cv.inference.embedder import Embedder
from siamese_cv.inference.hardware import resolve_device, resolve_precision
from siamese_cv.models.pretrained import load_pretrained, preprocessing_of
from siamese_cv.models.siamese import EmbeddingNet

log = logging.getLogger(__name__)


def main(argv: Sequence[str] | None = None) -> int:
    params = stage_params(argv, __doc__)
    backbone, card = load_pretrained(paths.PRETRAINED)
    model = EmbeddingNet(backbone, "identity", backbone.feature_dim)
    precision = resolve_precision(params.evaluate.precision, resolve_device("auto"))
    embedder = Embedder(
        model,
        preprocessing_of(params.preprocess, card),
        precision,
        params.evaluate.batch_size,
        engine=params.evaluate.engine,
    )
    test = scoring.load_test_set()
    test_emb, _ = scoring.embed_splits(embedder, ["test"])
    gallery_emb, gallery_labels = scoring.embed_splits(embedder, list(params.export.splits))
    scores = scoring.score_embeddings(
        test_emb, test, gallery_emb, gallery_labels, params.evaluate.recall_at
    )
    # the backbone it started from, alone: its one embedding answers the copy question too
    copies = copy_queries(
        scoring.split_images(list(params.export.splits)), params.copies.queries, params.copies.seed
    )
    found = None
    if copies:
        found = copy_detection_metrics(
            embed_copies(embedder, copies, "baseline: copies"),
            [c.source for c in copies],
            [c.edit for c in copies],
            test_emb,
            gallery_emb,
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
