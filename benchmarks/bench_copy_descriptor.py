"""The copy descriptor on validation photos: GeM pooling against the backbone's own average pooling.

Both are the frozen pretrained backbone of a built project (models/pretrained), scored as the
copy_gallery stage chooses its margin (`calibrate_margin`): half the validation photos are
copied into the gallery with every edit and searched for, the other half are searched as
photos with no copy, and the margin is the one that flags `copies.false_flags` of those. Project:
GeM pooling (`copy_descriptor`, what copy_gallery stores); baseline: the same weights with
average pooling (the frozen baseline stage's descriptor). Validation only: the test split, on
which evaluate scores copies, is never read.

Run from a project after `dvc repro copy_gallery`: python benchmarks/bench_copy_descriptor.py
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from _common import Row, print_table

from siamese_cv.config.params import load_params
from siamese_cv.core import paths
from siamese_cv.evaluation.copy_calibration import calibrate_margin
from siamese_cv.inference.embedder import Embedder
from siamese_cv.inference.hardware import resolve_device, resolve_precision
from siamese_cv.models.pretrained import load_pretrained, preprocessing_of
from siamese_cv.models.siamese import EmbeddingNet
from siamese_cv.retrieval.copies import copy_embedder
from siamese_cv.retrieval.gallery_export import embed_splits_in_order


def average_pooled(params) -> Embedder:
    """The frozen backbone with its own pooling, as copy_embedder builds the GeM one."""
    backbone, card = load_pretrained(paths.PRETRAINED)
    net = EmbeddingNet(backbone, "identity", backbone.feature_dim)
    export = params.export
    precision = resolve_precision(export.precision, resolve_device("auto"))
    prep = preprocessing_of(params.preprocess, card)
    return Embedder(net, prep, precision, export.batch_size, engine=export.engine)


def score(embedder: Embedder, name: str, params) -> tuple[dict, float]:
    started = time.perf_counter()
    rows, vectors = embed_splits_in_order(embedder, list(params.export.splits), name)
    auto = params.copies.model_copy(update={"margin": "auto"})
    margin, report = calibrate_margin(embedder, name, vectors, rows.splits, paths.PROCESSED, auto)
    return {**report, "margin": margin}, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", type=Path, default=Path("."), help="a built project")
    os.chdir(parser.parse_args().project)
    params = load_params()
    gem, _, _ = copy_embedder(
        paths.PRETRAINED,
        params.preprocess,
        params.export.engine,
        params.export.precision,
        params.export.batch_size,
    )
    project, project_s = score(gem, "GeM", params)
    baseline, baseline_s = score(average_pooled(params), "average", params)
    if "copies" not in project:
        raise SystemExit("no validation photos to copy: set data.val_fraction above 0")
    print_table(
        "copy descriptor on validation (project: GeM pooling; baseline: average pooling)",
        [
            Row(
                "copies flagged at the false-flag budget",
                project["flagged_right"],
                baseline["flagged_right"],
                "share",
            ),
            Row(
                "photos with no copy flagged",
                project["false_flags"],
                baseline["false_flags"],
                "share",
                higher_is_better=False,
            ),
            Row("µAP (copies and photos with no copy)", project["uap"], baseline["uap"], "µAP"),
            Row("embedding and scoring time", project_s, baseline_s, "s", higher_is_better=False),
        ],
        [
            f"{project['copies']} validation copies, {project['photos_without_copy']} validation "
            f"photos with no copy; copies.false_flags {params.copies.false_flags}",
            f"margins chosen: GeM {project['margin']:.4f}, average {baseline['margin']:.4f}",
        ],
    )


if __name__ == "__main__":
    main()
