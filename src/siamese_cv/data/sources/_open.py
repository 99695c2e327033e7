"""`open_source`: tell which kind of source `data.source` names and open it."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

from siamese_cv.core.errors import UserError

from ._common import Record, SourceInfo
from .csv_manifest import _open_csv
from .folder import FOLDER_LAYOUT, _open_folder
from .hub import _open_hf

_SOURCE_HELP = f"give an image folder ({FOLDER_LAYOUT}), a CSV manifest, or hf:<dataset id>"


def open_source(
    source: str,
    *,
    val_fraction: float,
    seed: int,
    retries: int,
    base_dir: Path,
    sleep: Callable[[float], None] = time.sleep,
    streaming: bool = False,
) -> tuple[SourceInfo, Iterator[Record]]:
    """Open `data.source` and return its description and a stream of its records.

    Args:
        source: `hf:<dataset id>[@revision]` (or `hf:<local dir>` laid out as a hub parquet
            conversion), an image folder, or a CSV manifest.
        val_fraction: Share of each train class held out when there is no validation split
            (0: none).
        seed: Seed of that hold-out choice.
        retries: How many times a transient hub error is retried (backoff 1 s, 2 s, 4 s...).
        base_dir: Folder that relative paths are resolved against (the project root).
        sleep: Called with each backoff delay; tests pass a recorder instead of waiting.
        streaming: Hub sources only: read the files as a stream (`datasets` streaming mode)
            instead of downloading and caching the whole dataset first. Other sources always
            stream.

    Returns:
        The source's `SourceInfo`, and an iterator of `Record`s ordered by split (train,
        validation, test) then by id (hub datasets: row order).

    Raises:
        UserError: The source does not exist, has the wrong layout, a bad CSV row, no test
            split, or the hub cannot be reached or has no such dataset.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"data.val_fraction: {val_fraction} is not in [0, 1): use 0 for none")
    text = source.strip()
    if text.startswith("hf:"):
        return _open_hf(text[3:], val_fraction, seed, retries, base_dir, sleep, streaming)
    if not text:
        raise UserError(f"data.source is empty: {_SOURCE_HELP}")
    path = Path(text).expanduser()
    path = path if path.is_absolute() else base_dir / path
    if path.is_dir():
        return _open_folder(path.resolve(), val_fraction, seed)
    if path.is_file() and path.suffix.lower() == ".csv":
        return _open_csv(path.resolve(), val_fraction, seed)
    if path.exists():
        raise UserError(
            f"data.source: {path} is neither a folder nor a .csv manifest: {_SOURCE_HELP}"
        )
    raise UserError(f"data.source: no such folder or CSV file {path}: {_SOURCE_HELP}")
