"""Stage `evaluate`: the trained model's test metrics -> metrics/test.json, metrics/per_class/model.tsv.

Test triplet accuracy is the mean and standard deviation over the fixed draws of sample_triplets;
retrieval metrics rank the whole test split, and the gallery metrics search the exported gallery.
"""

from __future__ import annotations

try:  # `dvc repro` runs the `python` on PATH: without the venv, say what to do in one line
    import siamese_cv  # noqa: F401
except ModuleNotFoundError as missing:
    raise SystemExit(f"{missing}: run `source .venv/bin/activate` or `make repro`") from None

import functools
import logging
from collections.abc import Callable, Sequence

from siamese_cv.config.stage import run_stage, stage_params
from siamese_cv.core import paths
from siamese_cv.core.atomic import read_json
from siamese_cv.core.errors import UserError
from siamese_cv.data.parquet import read_table
from siamese_cv.evaluation import scoring
from siamese_cv.evaluation.copy_detection import copy_detection_metrics, copy_queries, embed_copies
from siamese_cv.evaluation.copy_queries import describe_queries, queries_about, stored_queries
from siamese_cv.evaluation.copy_queries import gallery_images as gallery_images_of
from siamese_cv.evaluation.report import write_figures
from siamese_cv.inference.embedder import Embedder
from siamese_cv.inference.hardware import resolve_device, resolve_precision
from siamese_cv.inference.prefix_maps import (
    TailEmbedder,
    from_maps_or_images,
    frozen_tail_embedder,
    ids_digest,
    tail_embedder,
)
from siamese_cv.models.siamese import Preprocessing, load_checkpoint
from siamese_cv.retrieval.copies import copy_descriptor_of, load_copy_gallery
from siamese_cv.retrieval.gallery import load_gallery
from siamese_cv.retrieval.index import top_k

log = logging.getLogger(__name__)

STAGE = "evaluate"


def main(argv: Sequence[str] | None = None) -> int:
    params = stage_params(argv, __doc__)
    model, config = load_checkpoint(paths.MODEL)
    settings = params.evaluate
    precision = resolve_precision(settings.precision, resolve_device("auto"))

    @functools.cache  # only when the stored prefix maps cannot stand in for the images
    def embedder() -> Embedder:
        prep = Preprocessing.from_dict(config["preprocessing"])
        return Embedder(model, prep, precision, settings.batch_size, engine=settings.engine)

    tail = tail_embedder(
        paths.PREFIX_MAPS, model, config, precision, settings.batch_size, settings.engine, STAGE
    )
    test = scoring.load_test_set()
    test_ids = ids_digest(scoring.split_column(["test"], "id"))
    test_emb = from_maps_or_images(
        tail,
        "test",
        {"ids": test_ids},
        STAGE,
        lambda: scoring.embed_splits(embedder(), ["test"])[0],
    )
    gallery = load_gallery(paths.GALLERY)
    scores = scoring.score_embeddings(
        test_emb, test, gallery.vectors, gallery.labels, params.evaluate.recall_at
    )
    gallery_images = gallery_images_of(gallery.ids, gallery.splits)
    found = _copy_search(params, embedder, tail, gallery, gallery_images, test_emb, test_ids)
    figures = scoring.write_scores(scores, paths.TEST_METRICS, found)
    test_images = (
        read_table(paths.PROCESSED / "test.parquet", ["image"]).column("image").to_pylist()
    )
    write_figures(
        paths.PLOTS,
        test_emb,
        test,
        test_images,
        gallery.vectors,
        gallery_images,
        gallery.label_names,
        top=min(10, params.evaluate.top_k),
    )
    base = read_json(paths.METRICS / "baseline.json")
    log.info(
        "evaluate, model (baseline): "
        + ", ".join(f"{k} {v:.4f} ({base[k]:.4f})" for k, v in figures.items())
        + scoring.skipped_note(scores)
    )
    return 0


def _copy_search(
    params,
    embedder: Callable[[], Embedder],
    tail: TailEmbedder | None,
    gallery,
    gallery_images: list[bytes],
    test_emb,
    test_ids: str,
) -> dict | None:
    """Copy detection as the search answers it: the copy descriptor (data/copies) flags copies,
    shown first; any other query shows the trained embedding's best photo first."""
    copies = copy_queries(gallery_images, params.copies.queries, params.copies.seed)
    if not copies:
        return None
    copy_gallery = load_copy_gallery(paths.COPIES, gallery.ids)
    if copy_gallery is None:
        raise UserError(f"{paths.COPIES}: no copy gallery there; run `dvc repro copy_gallery`")
    sources, edits = [c.source for c in copies], [c.edit for c in copies]
    about = {
        "gallery_ids": ids_digest(gallery.ids),
        "queries": params.copies.queries,
        "seed": params.copies.seed,
    }
    trained = from_maps_or_images(
        tail, "copies", about, STAGE, lambda: embed_copies(embedder(), copies, f"{STAGE}: copies")
    )
    similar_first = top_k(gallery.vectors, trained, 1)[0][:, 0]
    queries = queries_about(gallery.ids, test_ids, params.copies)
    stored = stored_queries(paths.COPIES, copy_gallery.meta, queries)
    described, distractors = stored or _describe_queries(params, copy_gallery, copies, queries)
    alone = copy_detection_metrics(trained, sources, edits, test_emb, gallery.vectors)
    found = copy_detection_metrics(
        described,
        sources,
        edits,
        distractors,
        copy_gallery.vectors,
        rule=copy_gallery.rule,
        similar_first=similar_first,
    )
    log.info(
        f"evaluate: copies found first {found['recall@1']:.1%} (the trained embedding alone "
        f"{alone['recall@1']:.1%}), µAP {found['uap']:.3f} ({alone['uap']:.3f}); flagged "
        f"{found['flagged']:.1%} of copies and {found['false_flags']:.1%} of test photos; "
        f"rule: {copy_gallery.rule.describe()}"
    )
    return found


def _describe_queries(params, copy_gallery, copies, queries: dict):
    """The copy descriptor's vectors of the queries, embedded here (copy_gallery stored none)."""
    network, prep, precision, engine = copy_descriptor_of(copy_gallery, paths.PRETRAINED)
    batch = params.evaluate.batch_size
    name = f"{STAGE}: copy descriptor"
    frozen = frozen_tail_embedder(paths.PREFIX_MAPS, network, prep, precision, batch, engine, name)

    @functools.cache
    def describer() -> Embedder:
        return Embedder(network, prep, precision, batch, engine=engine)

    return describe_queries(copies, queries, frozen, describer, name)


if __name__ == "__main__":
    run_stage(main)
