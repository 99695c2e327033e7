"""What every source shares: records, the listing entry, the validation hold-out, file reads."""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from siamese_cv.config.params import SPLITS
from siamese_cv.core.errors import UserError

SPLIT_ALIASES = {
    "train": "train",
    "val": "validation",
    "valid": "validation",
    "validation": "validation",
    "test": "test",
}


@dataclass(frozen=True)
class Record:
    """One image of the source, with its bytes or the reason they could not be read."""

    id: str
    split: str
    label: int
    label_name: str
    source: str
    image: bytes | None
    error: str | None

    def row(self) -> dict:
        """The record as a row of data/raw/<split>.parquet (`parquet.RAW_SCHEMA`)."""
        return {f: getattr(self, f) for f in self.__dataclass_fields__}


@dataclass(frozen=True)
class SourceInfo:
    """What the source is, its classes (label = index), and a fingerprint that changes with it.

    `validation` says where the validation split comes from: the source's own, or `train`
    (held out of it by `data.val_fraction`).
    """

    kind: str
    location: str
    class_names: list[str]
    fingerprint: dict
    validation: str = "source"


@dataclass(frozen=True)
class _Entry:
    """A listed file: everything but its bytes, which are read only when the record is yielded."""

    id: str
    split: str
    label_name: str
    path: str  # the file-system path (may hold surrogate escapes); the display form is in `source`
    error: str | None = None
    size: int = -1
    mtime_ns: int = -1


def stratified_holdout(items: Iterable[tuple[str, int]], fraction: float, seed: int) -> set[str]:
    """Choose the ids to move from train to validation, per class, by a seeded hash of the id.

    A class lends whole photos, 2 or more or none: one validation photo could never be a query
    with an answer, nor anchor a triplet.

    Args:
        items: (id, label) pairs of the train candidates.
        fraction: Share of each class to hold out; 0 holds out nothing.
        seed: Seed of the choice.

    Returns:
        The held-out ids (`holdout_count` per class), the first of the class's ids ranked by
        sha256 of `f"{seed}\\0{id}"`.
    """
    by_label: dict[int, list[str]] = defaultdict(list)
    for item_id, label in items:
        by_label[label].append(item_id)
    held: set[str] = set()
    for ids in by_label.values():
        count = holdout_count(len(ids), fraction)
        ranked = sorted(ids, key=lambda i: hashlib.sha256(f"{seed}\0{i}".encode()).digest())
        held.update(ranked[:count])
    return held


def holdout_count(n: int, fraction: float) -> int:
    """How many of a class's `n` photos go to validation: `round(fraction * n)`, 2 or none.

    Training keeps 2 (a positive pair): where the fraction asks for one photo, the class lends
    2 if it can, else none and keeps all its photos for training.
    """
    if fraction <= 0 or n < 4:
        return 0
    count = min(n - 2, max(1, int(fraction * n + 0.5)))
    return max(count, 2)


def _validation_from(sliced: bool) -> str:
    return "train" if sliced else "source"


def _display(name: str) -> str:
    """A file-system name as valid text: undecodable bytes become `\\xNN`."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def _unique_ids(entries: list[_Entry]) -> list[_Entry]:
    """Append `#2`, `#3`... to an id that escaping made equal to an earlier one."""
    seen: set[str] = set()
    out = []
    for entry in entries:
        new_id, n = entry.id, 1
        while new_id in seen:
            n += 1
            new_id = f"{entry.id}#{n}"
        seen.add(new_id)
        out.append(entry if new_id == entry.id else _replace(entry, id=new_id))
    return out


def _replace(entry: _Entry, **changes: Any) -> _Entry:
    return _Entry(**{**entry.__dict__, **changes})


def _os_reason(error: OSError, path: str | None = None) -> str:
    """A short, stable reason for an OSError (no paths, no errno numbers)."""
    code = error.errno
    if code in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if code == errno.ELOOP:
        return "symlink loop"
    if code == errno.ENOENT:
        return "broken symlink" if path and os.path.islink(path) else "file vanished"
    if code == errno.EISDIR:
        return "not a file"
    return (error.strerror or type(error).__name__).lower()


def _stat_entry(entry: _Entry) -> _Entry:
    """Fill size and mtime (following symlinks), or the reason the file cannot be used."""
    try:
        info = os.stat(entry.path)
    except OSError as error:
        return _replace(entry, error=_os_reason(error, entry.path))
    if not stat.S_ISREG(info.st_mode):
        return _replace(entry, error="not a regular file")
    return _replace(entry, size=info.st_size, mtime_ns=info.st_mtime_ns)


def _read_bytes(path: str) -> tuple[bytes | None, str | None]:
    """Read a whole file; non-blocking open so a FIFO renamed .jpg cannot hang the stage."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as error:
        return None, _os_reason(error, path)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None, "not a regular file"
        with os.fdopen(fd, "rb", closefd=False) as handle:
            return handle.read(), None
    except OSError as error:
        return None, _os_reason(error, path)
    finally:
        os.close(fd)


def _listing_fingerprint(entries: Sequence[_Entry]) -> dict:
    """Count, total bytes and a hash of the sorted (id, size, mtime_ns) listing."""
    digest = hashlib.sha256()
    for entry in sorted(entries, key=lambda e: e.id):
        digest.update(f"{entry.id}\0{entry.size}\0{entry.mtime_ns}\n".encode())
    total = sum(max(entry.size, 0) for entry in entries)
    return {"files": len(entries), "bytes": total, "sha256": digest.hexdigest()}


def _assign_validation(
    entries: list[_Entry], labels: dict[str, int], fraction: float, seed: int, pool: str
) -> list[_Entry]:
    """Move a stratified share of the `pool` split's readable entries to validation."""
    candidates = [(e.id, labels[e.label_name]) for e in entries if e.split == pool and not e.error]
    held = stratified_holdout(candidates, fraction, seed)
    return [_replace(e, split="validation") if e.id in held else e for e in entries]


def _require_test(entries: Sequence[_Entry], where: str, fix: str) -> None:
    if not any(entry.split == "test" for entry in entries):
        raise UserError(f"{where}: no test split; {fix}")


def _stream_entries(entries: list[_Entry], labels: dict[str, int]) -> Iterator[Record]:
    """Records in split order then id order, reading each file's bytes only when yielded."""
    order = {split: index for index, split in enumerate(SPLITS)}
    for entry in sorted(entries, key=lambda e: (order[e.split], e.id)):
        image, error = (None, entry.error) if entry.error else _read(entry.path)
        yield Record(
            id=entry.id,
            split=entry.split,
            label=labels[entry.label_name],
            label_name=entry.label_name,
            source=_display(entry.path),
            image=image,
            error=error,
        )


def _read(path: str) -> tuple[bytes | None, str | None]:
    """`_read_bytes`, looked up on the package at each call.

    `siamese_cv.data.sources._read_bytes` is the seam that tests patch to watch reads happen
    lazily; going through the package keeps such a patch effective for every source module.
    """
    from siamese_cv.data import sources

    return sources._read_bytes(path)
