"""Turn `data.source` (an image folder, a CSV manifest or a Hugging Face dataset) into records.

`open_source` does everything that can fail for a user-fixable reason up front: it lists the
folder or CSV (names and sizes only) or downloads the hub dataset, so a bad source is one
`UserError` line before any output is written. The records then stream: image bytes are read
one file (or one arrow batch) at a time.

Decisions:

- Ids are stable across runs and machines: the path relative to the source root, with the
  on-disk split folder (`train/apple_pie/1005649.jpg`, `val/...`), the path as written in a CSV
  manifest, or `hf/<hub split>/<row:06d>` for a hub dataset. Bytes that are not UTF-8 in a file
  name are written as `\\xNN`; should that collide with a real name, `#2`, `#3`... is appended.
- A file that is listed but cannot be read (permission denied, symlink loop, broken symlink,
  not a regular file, a folder that cannot be listed) becomes a record with `image=None` and
  `error=<reason>`, so preprocess can report it instead of it vanishing.
- A source without a validation split gets one: per class, `round(val_fraction * n)` images
  (2 or none, never all of them: `holdout_count`) chosen by a seeded hash of the id, so the
  choice depends only on the seed and the ids, not on file-system order, and adding images does
  not reshuffle the existing ones. `val_fraction: 0` makes no validation split.
- A test split is required for every kind: the pipeline's evaluation has nothing to run on
  without one.
"""

# Not public, but package attributes on purpose: `_read_bytes` is looked up here at each read
# (see `_common._read`), and tests patch `sources._read_bytes` and `sources.os.open`.
import os  # noqa: F401

from ._common import SPLIT_ALIASES, Record, SourceInfo, holdout_count, stratified_holdout
from ._common import _read_bytes as _read_bytes
from ._open import open_source
from .folder import IMAGE_EXTENSIONS
from .hub import DEFAULT_HF_REVISION

__all__ = [
    "DEFAULT_HF_REVISION",
    "IMAGE_EXTENSIONS",
    "SPLIT_ALIASES",
    "Record",
    "SourceInfo",
    "open_source",
    "holdout_count",
    "stratified_holdout",
]
