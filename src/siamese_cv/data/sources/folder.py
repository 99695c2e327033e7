"""An image folder: `train/ [val/] test/`, one sub-folder per class, listed up front."""

from __future__ import annotations

import os
import stat
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

from siamese_cv.core.errors import UserError

from ._common import (
    SPLIT_ALIASES,
    Record,
    SourceInfo,
    _assign_validation,
    _display,
    _Entry,
    _listing_fingerprint,
    _os_reason,
    _require_test,
    _stat_entry,
    _stream_entries,
    _unique_ids,
    _validation_from,
)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
FOLDER_LAYOUT = "train/ [val/] test/ with one sub-folder per class"


def _open_folder(root: Path, fraction: float, seed: int) -> tuple[SourceInfo, Iterator[Record]]:
    splits = _split_folders(root)
    class_dirs: dict[str, list[tuple[str, str]]] = {}  # split folder -> [(class name, path)]
    seen: set[tuple[int, int]] = {_inode(str(root))}
    for folder, path in splits.items():
        class_dirs[folder] = _class_folders(path, root, folder)
        seen.add(_inode(path))
        seen.update(_inode(p) for _, p in class_dirs[folder])
    if not class_dirs[_find(splits, "train")]:
        raise UserError(f"{root / 'train'}: no class folders; expected layout {FOLDER_LAYOUT}")
    entries: list[_Entry] = []
    for folder, classes in class_dirs.items():
        split = SPLIT_ALIASES[folder.lower()]
        for name, path in classes:
            for file_path, rel, error in _walk(path, f"{_display(folder)}/{name}", seen):
                entry = _Entry(id=rel, split=split, label_name=name, path=file_path, error=error)
                entries.append(entry if error else _stat_entry(entry))
    entries = _unique_ids(sorted(entries, key=lambda e: (os.fsencode(e.path), e.id)))
    class_names = sorted({name for classes in class_dirs.values() for name, _ in classes})
    labels = {name: index for index, name in enumerate(class_names)}
    sliced = not any(SPLIT_ALIASES[folder.lower()] == "validation" for folder in splits)
    if sliced:
        entries = _assign_validation(entries, labels, fraction, seed, pool="train")
    _require_test(entries, str(root), f"add a test/ folder (expected layout {FOLDER_LAYOUT})")
    info = SourceInfo(
        "folder", str(root), class_names, _listing_fingerprint(entries), _validation_from(sliced)
    )
    return info, _stream_entries(entries, labels)


def _split_folders(root: Path) -> dict[str, str]:
    """The split folders under `root` (on-disk name -> path); needs train/, at most one val."""
    found: dict[str, str] = {}
    try:
        names = sorted(os.listdir(root))
    except OSError as error:
        raise UserError(f"data.source: cannot list {root} ({_os_reason(error)})") from None
    for name in names:
        path = os.path.join(root, name)
        if name.lower() in SPLIT_ALIASES and os.path.isdir(path):
            found[name] = path
    by_split: dict[str, list[str]] = defaultdict(list)
    for name in found:
        by_split[SPLIT_ALIASES[name.lower()]].append(name)
    for split, names_ in by_split.items():
        if len(names_) > 1:
            raise UserError(f"{root}: {' and '.join(names_)} are both the {split} split; keep one")
    if "train" not in by_split:
        raise UserError(f"{root}: no train/ folder; expected layout {FOLDER_LAYOUT}")
    return found


def _find(splits: dict[str, str], split: str) -> str:
    return next(name for name in splits if SPLIT_ALIASES[name.lower()] == split)


def _class_folders(split_path: str, root: Path, folder: str) -> list[tuple[str, str]]:
    """Visible sub-folders of a split folder, as (class name, path), sorted by name."""
    try:
        names = os.listdir(split_path)
    except OSError as error:
        raise UserError(f"{root / folder}: cannot list ({_os_reason(error)})") from None
    classes = [
        (_display(name), os.path.join(split_path, name))
        for name in names
        if not name.startswith(".") and _is_dir(os.path.join(split_path, name))
    ]
    return sorted(classes)


def _is_dir(path: str) -> bool:
    try:
        return stat.S_ISDIR(os.stat(path).st_mode)
    except OSError:
        return False


def _inode(path: str | Path) -> tuple[int, int]:
    info = os.stat(path)
    return info.st_dev, info.st_ino


def _walk(
    directory: str, rel: str, seen: set[tuple[int, int]]
) -> Iterator[tuple[str, str, str | None]]:
    """Image files under a class folder as (path, id, listing error), following symlinks once.

    A folder already visited (a symlink loop, or a second link to a split or class folder) is
    skipped; a folder that cannot be listed is reported as one entry with its reason.
    """
    try:
        with os.scandir(directory) as scan:
            items = sorted(scan, key=lambda item: os.fsencode(item.name))
    except OSError as error:
        yield directory, rel, f"cannot list folder ({_os_reason(error)})"
        return
    for item in items:
        if item.name.startswith("."):
            continue
        child = f"{rel}/{_display(item.name)}"
        is_image = os.path.splitext(item.name)[1].lower() in IMAGE_EXTENSIONS
        try:
            info = os.stat(item.path)
        except OSError as error:
            if is_image:
                yield item.path, child, _os_reason(error, item.path)
            continue
        if stat.S_ISDIR(info.st_mode):
            key = (info.st_dev, info.st_ino)
            if key not in seen:
                seen.add(key)
                yield from _walk(item.path, child, seen)
        elif is_image:
            yield item.path, child, None
