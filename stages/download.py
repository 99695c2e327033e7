"""Stage `download`: the dataset into data/raw/, the backbone's starting weights into models/pretrained/.

data/raw/<split>.parquet keeps each image's original bytes (or why it could not be read, for
preprocess to report); classes.json and source.json record the class names and the source's
fingerprint, so a changed upstream dataset changes this stage's output.
"""

from __future__ import annotations

try:  # `dvc repro` runs the `python` on PATH: without the venv, say what to do in one line
    import siamese_cv  # noqa: F401
except ModuleNotFoundError as missing:
    raise SystemExit(f"{missing}: run `source .venv/bin/activate` or `make repro`") from None

import json
import logging
from collections.abc import Sequence
from pathlib import Path

from siamese_cv.config.params import SPLITS
from siamese_cv.config.stage import run_stage, stage_params
from siamese_cv.core import paths
from siamese_cv.core.atomic import atomic_path
from siamese_cv.data.parquet import RAW_SCHEMA, write_splits
from siamese_cv.data.sources import open_source
from siamese_cv.models.pretrained import resolve_pretrained

log = logging.getLogger(__name__)


def main(argv: Sequence[str] | None = None) -> int:
    params = stage_params(argv, __doc__)
    info, records = open_source(
        params.data.source,
        val_fraction=params.data.val_fraction,
        seed=params.data.seed,
        retries=params.data.retries,
        base_dir=Path.cwd(),
        streaming=params.data.streaming,
    )
    rows = (r.row() for r in records)
    with atomic_path(paths.RAW) as tmp:
        tmp.mkdir()
        counts = write_splits(tmp, RAW_SCHEMA, rows, 256, SPLITS)
        (tmp / "classes.json").write_text(json.dumps(info.class_names, indent=2) + "\n")
        source = {
            "kind": info.kind,
            "location": info.location,
            "fingerprint": info.fingerprint,
            "counts": counts,
            "validation": {"from": info.validation}
            | ({"val_fraction": params.data.val_fraction} if info.validation == "train" else {}),
        }
        (tmp / "source.json").write_text(json.dumps(source, indent=2, sort_keys=True) + "\n")
    card = resolve_pretrained(params.model, paths.PRETRAINED, params.data.seed)
    log.info(
        f"download: {sum(counts.values())} images ({', '.join(f'{s} {n}' for s, n in counts.items())}) "
        f"in {len(info.class_names)} classes from {info.kind} {info.location}; "
        f"{card['backbone']} weights: {card['weights']}"
    )
    return 0


if __name__ == "__main__":
    run_stage(main)
