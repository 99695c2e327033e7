"""Stage `baseline`: the same test metrics for the frozen pretrained backbone (no training).

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
from siamese_cv.core.atomic import write_json
from siamese_cv.evaluation.scoring import embed_splits, load_test_set, score_embeddings
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
    test = load_test_set()
    test_emb, _ = embed_splits(embedder, ["test"])
    gallery_emb, gallery_labels = embed_splits(embedder, list(params.export.splits))
    metrics = score_embeddings(
        test_emb, test, gallery_emb, gallery_labels, params.evaluate.recall_at
    )
    metrics["model"] = (
        f"{card['backbone']} ({card['weights']}), frozen, pooled {backbone.feature_dim}-d"
    )
    write_json(paths.METRICS / "baseline.json", metrics)
    log.info(
        f"baseline: triplet accuracy {metrics['triplet_accuracy']:.4f}, precision@1 "
        f"{metrics['precision_at_1']:.4f}, MAP@R {metrics['map_at_r']:.4f}"
    )
    return 0


if __name__ == "__main__":
    run_stage(main)
