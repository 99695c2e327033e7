"""Stage `copy_gallery`: the copy descriptor of every gallery photo, and the rule that flags
copies -> data/copies/ (data/gallery's layout; meta.json holds the rule and how it was chosen).

The descriptor is the frozen pretrained backbone, PCA-whitened on the gallery's own photos
(`retrieval/whitening.py`; its arrays are stored beside the vectors), so an edit of a training
parameter does not rerun this stage; search and evaluate read it beside data/gallery
(`retrieval/copies.py`). It also describes evaluate's copy-detection queries, the edited
copies and the test photos, once (`evaluation/copy_queries.py`).
"""

from __future__ import annotations

try:  # `dvc repro` runs the `python` on PATH: without the venv, say what to do in one line
    import siamese_cv  # noqa: F401
except ModuleNotFoundError as missing:
    raise SystemExit(f"{missing}: run `source .venv/bin/activate` or `make repro`") from None

import logging
from collections.abc import Sequence

import numpy as np

from siamese_cv.config.stage import run_stage, stage_params
from siamese_cv.core import paths
from siamese_cv.data.parquet import read_table
from siamese_cv.evaluation.copy_calibration import calibrate_margin
from siamese_cv.evaluation.copy_detection import copy_queries
from siamese_cv.evaluation.copy_queries import (
    META_KEY,
    describe_queries,
    gallery_images,
    queries_about,
    query_arrays,
)
from siamese_cv.inference.embedder import Embedder
from siamese_cv.inference.prefix_maps import from_maps_or_images, frozen_tail_embedder, ids_digest
from siamese_cv.retrieval.copies import CopyRule, copy_embedder, copy_network, write_copy_gallery
from siamese_cv.retrieval.gallery_export import embed_splits_in_order, gallery_rows
from siamese_cv.retrieval.whitening import SHRINKAGE, fit_whitening

log = logging.getLogger(__name__)

STAGE = "copy_gallery"


def main(argv: Sequence[str] | None = None) -> int:
    params = stage_params(argv, __doc__)
    export = params.export
    splits = list(export.splits)
    rows = gallery_rows(splits)
    raw = _unwhitened_gallery(params, rows, splits)
    fitted_on = np.asarray(rows.splits) != "validation"  # calibration stands in for validation
    whitening = fit_whitening(raw[fitted_on], params.copies.whitening, STAGE)
    embedder, card, name = copy_embedder(
        paths.PRETRAINED,
        params.preprocess,
        export.engine,
        export.precision,
        export.batch_size,
        whitening,
    )
    vectors = raw if whitening is None else whitening.apply(raw)
    tail = _frozen_tail(embedder.model, embedder.prep, embedder.precision, export)
    margin, chosen = calibrate_margin(
        embedder, name, vectors, rows.splits, paths.PROCESSED, params.copies
    )
    rule = CopyRule(margin, name)
    meta = {
        "descriptor": name,
        "pretrained_fingerprint": card["fingerprint"],
        "preprocessing": embedder.prep.to_dict(),
        "engine": export.engine,
        "precision": embedder.precision.name,
        "splits": list(export.splits),
        "metric": "cosine",
        "normalized": True,
        "rule": rule.to_dict(),
        "calibration": chosen,
        "whitening": None
        if whitening is None
        else {"dims": whitening.dims, "photos": int(fitted_on.sum()), "shrinkage": SHRINKAGE},
    }
    arrays = {} if whitening is None else whitening.arrays()
    test = paths.PROCESSED / "test.parquet"
    copies = copy_queries(
        gallery_images(rows.ids, rows.splits), params.copies.queries, params.copies.seed
    )
    if copies and test.is_file():
        test_ids = ids_digest(read_table(test, ["id"]).column("id").to_pylist())
        meta[META_KEY] = queries_about(rows.ids, test_ids, params.copies)
        arrays |= query_arrays(
            *describe_queries(copies, meta[META_KEY], tail, lambda: embedder, STAGE)
        )
    write_copy_gallery(paths.COPIES, rows, vectors, meta, arrays)
    found = (
        f"; on validation it flagged {chosen['flagged_right']:.1%} of {chosen['copies']} copies "
        f"rightly and {chosen['false_flags']:.1%} of {chosen['photos_without_copy']} photos "
        "with no copy"
        if "copies" in chosen
        else ""
    )
    log.info(
        f"copy_gallery: {len(vectors)} photos -> {paths.COPIES}; rule: {rule.describe()}{found}"
    )
    return 0


def _unwhitened_gallery(params, rows, splits: list[str]) -> np.ndarray:
    """The gallery's copy descriptors before whitening (what it is fitted on): from the stored
    prefix maps where they apply, else from the images."""
    export = params.export
    model, _, _, prep, precision = copy_network(
        paths.PRETRAINED, params.preprocess, export.precision
    )
    return from_maps_or_images(
        _frozen_tail(model, prep, precision, export),
        "gallery",
        {"ids": ids_digest(rows.ids)},
        STAGE,
        lambda: embed_splits_in_order(
            Embedder(model, prep, precision, export.batch_size, engine=export.engine),
            splits,
            STAGE,
        )[1],
    )


def _frozen_tail(model, prep, precision, export):
    return frozen_tail_embedder(
        paths.PREFIX_MAPS, model, prep, precision, export.batch_size, export.engine, STAGE
    )


if __name__ == "__main__":
    run_stage(main)
