"""Stage `index_gallery`: the search index of the exported gallery -> data/index.

`search.index: exact` (the default) records only which vectors it serves: one matrix product is
the fastest search below a few hundred thousand vectors. `ivf` trains FAISS IVF-SQ8 here, once,
so that `siamese-search` loads it in seconds instead of re-running k-means for every query, and
an edit of `search.*` rebuilds the index without re-embedding the gallery.
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
from siamese_cv.core.errors import UserError
from siamese_cv.retrieval.gallery import load_gallery
from siamese_cv.retrieval.index import build_index, save_index

log = logging.getLogger(__name__)


def main(argv: Sequence[str] | None = None) -> int:
    params = stage_params(argv, __doc__)
    search = params.search
    gallery = load_gallery(paths.GALLERY)
    try:
        index = build_index(gallery.vectors, search.index, search.nlist or None, seed=search.seed)
    except ImportError as error:
        raise UserError(str(error)) from None
    if search.index == "ivf" and search.nprobe:
        index.default_nprobe = min(search.nprobe, index.nlist)
    save_index(index, paths.INDEX, gallery.vectors)
    log.info(f"index_gallery: {index.describe()}")
    return 0


if __name__ == "__main__":
    run_stage(main)
