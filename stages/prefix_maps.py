"""Stage `prefix_maps`: the frozen prefix's feature maps of the gallery, the test photos and the
copies, at every inference size -> data/prefix_maps/.

With `train.freeze` set, a trained network's first stages are the pretrained ones, so their
outputs for the photos embedded after training are computed here once; `export_gallery` and
`evaluate` then run only the trained rest on them (`inference/prefix_maps.py`), and an edit of a
training parameter reruns neither this stage nor the frozen prefix's share of inference.

Nothing frozen: it writes only data/prefix_maps/card.json saying so, and those stages embed the
images as before.
"""

from __future__ import annotations

try:  # `dvc repro` runs the `python` on PATH: without the venv, say what to do in one line
    import siamese_cv  # noqa: F401
except ModuleNotFoundError as missing:
    raise SystemExit(f"{missing}: run `source .venv/bin/activate` or `make repro`") from None

import logging
from collections.abc import Sequence

from siamese_cv.config.params import Params, every_inference_size, parse_freeze
from siamese_cv.config.stage import run_stage, stage_params
from siamese_cv.core import paths
from siamese_cv.core.atomic import atomic_path, write_json
from siamese_cv.data.parquet import read_table
from siamese_cv.evaluation.copy_detection import copy_queries, embed_copies
from siamese_cv.inference.hardware import resolve_device, resolve_precision
from siamese_cv.inference.prefix_maps import (
    CARD,
    PhotoSet,
    ids_digest,
    prefix_fingerprint,
    write_prefix_maps,
)
from siamese_cv.models.pretrained import load_pretrained, preprocessing_of
from siamese_cv.models.siamese import EmbeddingNet

log = logging.getLogger(__name__)


def main(argv: Sequence[str] | None = None) -> int:
    params = stage_params(argv, __doc__)
    n_frozen = parse_freeze(params.train.freeze)
    why = f"train.freeze: {params.train.freeze}: nothing is frozen" if not n_frozen else None
    if n_frozen:
        backbone, card = load_pretrained(paths.PRETRAINED)
        backbone.set_pooling(params.model.pooling)  # part of the prefix when everything is frozen
        model = EmbeddingNet(backbone, "identity", 1)
        model.freeze(n_frozen)
        parts = model.split_frozen()
        why = None if parts else f"{card['backbone']} cannot be cut after its frozen stages"
    if why is not None:
        with atomic_path(paths.PREFIX_MAPS) as tmp:
            tmp.mkdir()
            write_json(tmp / CARD, {"stored": False, "why": why})
        log.info(f"prefix_maps: nothing to store ({why}) -> {paths.PREFIX_MAPS}/{CARD}")
        return 0
    export = params.export
    written = write_prefix_maps(
        paths.PREFIX_MAPS,
        parts[0],
        prefix_fingerprint(parts[0]),
        preprocessing_of(params.preprocess, card),
        every_inference_size(params),
        photo_sets(params),
        resolve_precision(export.precision, resolve_device("auto")),
        export.batch_size,
        export.engine,
        {"frozen_stages": model.frozen_stages, "pretrained_fingerprint": card["fingerprint"]},
    )
    if not written["stored"]:
        log.info(f"prefix_maps: nothing stored ({written['why']}) -> {paths.PREFIX_MAPS}/{CARD}")
        return 0
    counts = ", ".join(f"{n} {name}" for name, n in _counts(written).items())
    log.info(
        f"prefix_maps: {counts} photos at {', '.join(map(str, written['sizes']))} px: "
        f"{written['bytes'] / 2**20:.0f} MiB on disk, filled in {written['fill_seconds']:.1f} s "
        f"({written['precision']}, {written['engine']}) -> {paths.PREFIX_MAPS}"
    )
    return 0


def photo_sets(params: Params) -> list[PhotoSet]:
    """The gallery (`export.splits` in its order), the test photos and the copies of the
    copy-detection evaluation, as export_gallery and evaluate embed them."""
    ids: list[str] = []
    images: list[bytes] = []
    for split in params.export.splits:
        table = read_table(paths.PROCESSED / f"{split}.parquet", ["id", "image"])
        ids += table.column("id").to_pylist()
        images += table.column("image").to_pylist()
    test = read_table(paths.PROCESSED / "test.parquet", ["id", "image"])
    gallery_ids = ids_digest(ids)
    sets = [
        PhotoSet.stored("gallery", images, {"ids": gallery_ids}),
        PhotoSet.stored(
            "test", test.column("image").to_pylist(), {"ids": ids_digest(test["id"].to_pylist())}
        ),
    ]
    copies = copy_queries(images, params.copies.queries, params.copies.seed)
    if copies:
        about = {"gallery_ids": gallery_ids, "queries": params.copies.queries}
        sets.append(
            PhotoSet(
                "copies",
                len(copies),
                lambda embedder, label: embed_copies(embedder, copies, label),
                {**about, "seed": params.copies.seed},
            )
        )
    return sets


def _counts(card: dict) -> dict[str, int]:
    return {name: s["count"] for name, s in card["sets"].items()}


if __name__ == "__main__":
    run_stage(main)
