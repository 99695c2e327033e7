"""A CSV manifest: one `path,label[,split]` row per image, paths relative to the manifest."""

from __future__ import annotations

import csv
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

from siamese_cv.core.errors import UserError

from ._common import (
    SPLIT_ALIASES,
    Record,
    SourceInfo,
    _Entry,
    _listing_fingerprint,
    _replace,
    _require_test,
    _stat_entry,
    _stream_entries,
    _validation_from,
    stratified_holdout,
)


def _open_csv(path: Path, fraction: float, seed: int) -> tuple[SourceInfo, Iterator[Record]]:
    entries, has_validation = _read_manifest(path)
    class_names = sorted({entry.label_name for entry in entries})
    labels = {name: index for index, name in enumerate(class_names)}
    # A blank split means "train or validation": those rows are sliced; so are train rows when
    # the manifest names no validation rows at all (as for a folder without val/).
    pool = [e for e in entries if e.split == "" or (e.split == "train" and not has_validation)]
    held = stratified_holdout(
        ((e.id, labels[e.label_name]) for e in pool if not e.error), fraction, seed
    )
    entries = [
        _replace(e, split="validation" if e.id in held else (e.split or "train")) for e in entries
    ]
    _require_test(entries, str(path), "give some rows split=test (header path,label,split)")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    fingerprint = {"manifest_sha256": digest, **_listing_fingerprint(entries)}
    info = SourceInfo(
        "csv", str(path), class_names, fingerprint, _validation_from(not has_validation)
    )
    return info, _stream_entries(entries, labels)


def _read_manifest(path: Path) -> tuple[list[_Entry], bool]:
    """Parse and check every row (line numbers in errors); stat the files it names."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(
            f"{path}: cannot read the CSV manifest ({error}); save it as UTF-8"
        ) from None
    reader = csv.reader(text.splitlines())
    header = [cell.strip().lower() for cell in next(reader, [])]
    if "path" not in header or "label" not in header:
        raise UserError(f"{path}: line 1: the header must name columns path,label[,split]")
    columns = {name: header.index(name) for name in ("path", "label", "split") if name in header}
    entries: list[_Entry] = []
    lines: dict[str, int] = {}
    has_validation = False
    for row in reader:
        line = reader.line_num
        if not any(cell.strip() for cell in row):
            continue
        values = {}
        for name, index in columns.items():
            if index >= len(row):
                raise UserError(f"{path}: line {line}: missing the {name} column")
            values[name] = row[index].strip()
        if not values["path"]:
            raise UserError(f"{path}: line {line}: empty path; give the image file's path")
        if not values["label"]:
            raise UserError(f"{path}: line {line}: empty label; give the class name")
        split = values.get("split", "").lower()
        if split and split not in SPLIT_ALIASES:
            raise UserError(
                f"{path}: line {line}: unknown split {values['split']!r}; "
                "use train, validation (or val), test, or leave it empty"
            )
        split = SPLIT_ALIASES.get(split, "")
        has_validation |= split == "validation"
        item_id = Path(values["path"]).as_posix()
        if item_id in lines:
            raise UserError(
                f"{path}: line {line}: {item_id} is already listed on line {lines[item_id]}"
            )
        lines[item_id] = line
        file_path = os.path.join(path.parent, values["path"])
        entry = _Entry(id=item_id, split=split, label_name=values["label"], path=file_path)
        entries.append(_stat_entry(entry))
    if not entries:
        raise UserError(f"{path}: no rows; list one image per line as path,label,split")
    return entries, has_validation
