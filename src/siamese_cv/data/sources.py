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
  (at least 1 when the class has 2 or more, never all of them) chosen by a seeded hash of the
  id, so the choice depends only on the seed and the ids, not on file-system order, and adding
  images does not reshuffle the existing ones.
- A test split is required for every kind: the pipeline's evaluation has nothing to run on
  without one.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import os
import re
import stat
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from siamese_cv.errors import UserError
from siamese_cv.params import SPLITS

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
SPLIT_ALIASES = {
    "train": "train",
    "val": "validation",
    "valid": "validation",
    "validation": "validation",
    "test": "test",
}
DEFAULT_HF_REVISION = "refs/convert/parquet"
FOLDER_LAYOUT = "train/ [val/] test/ with one sub-folder per class"
_SOURCE_HELP = f"give an image folder ({FOLDER_LAYOUT}), a CSV manifest, or hf:<dataset id>"
_OFFLINE_HINT = "run the offline profile on a local folder: make repro-offline DATA=<image folder>"


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


@dataclass(frozen=True)
class SourceInfo:
    """What the source is, its classes (label = index), and a fingerprint that changes with it."""

    kind: str
    location: str
    class_names: list[str]
    fingerprint: dict


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


def open_source(
    source: str,
    *,
    val_fraction: float,
    seed: int,
    retries: int,
    base_dir: Path,
    sleep: Callable[[float], None] = time.sleep,
) -> tuple[SourceInfo, Iterator[Record]]:
    """Open `data.source` and return its description and a stream of its records.

    Args:
        source: `hf:<dataset id>[@revision]` (or `hf:<local dir>` laid out as a hub parquet
            conversion), an image folder, or a CSV manifest.
        val_fraction: Share of each train class held out when there is no validation split.
        seed: Seed of that hold-out choice.
        retries: How many times a transient hub error is retried (backoff 1 s, 2 s, 4 s...).
        base_dir: Folder that relative paths are resolved against (the project root).
        sleep: Called with each backoff delay; tests pass a recorder instead of waiting.

    Returns:
        The source's `SourceInfo`, and an iterator of `Record`s ordered by split (train,
        validation, test) then by id (hub datasets: row order).

    Raises:
        UserError: The source does not exist, has the wrong layout, a bad CSV row, no test
            split, or the hub cannot be reached or has no such dataset.
    """
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"data.val_fraction: {val_fraction} is not between 0 and 1")
    text = source.strip()
    if text.startswith("hf:"):
        return _open_hf(text[3:], val_fraction, seed, retries, base_dir, sleep)
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


# --- shared helpers ---------------------------------------------------------------------------


def stratified_holdout(items: Iterable[tuple[str, int]], fraction: float, seed: int) -> set[str]:
    """Choose the ids to move from train to validation, per class, by a seeded hash of the id.

    Args:
        items: (id, label) pairs of the train candidates.
        fraction: Share of each class to hold out.
        seed: Seed of the choice.

    Returns:
        The held-out ids: `round(fraction * n)` per class, at least 1 when the class has 2 or
        more images and never the whole class.
    """
    by_label: dict[int, list[str]] = defaultdict(list)
    for item_id, label in items:
        by_label[label].append(item_id)
    held: set[str] = set()
    for ids in by_label.values():
        if len(ids) < 2:
            continue
        count = min(len(ids) - 1, max(1, int(fraction * len(ids) + 0.5)))
        ranked = sorted(ids, key=lambda i: hashlib.sha256(f"{seed}\0{i}".encode()).digest())
        held.update(ranked[:count])
    return held


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
        image, error = (None, entry.error) if entry.error else _read_bytes(entry.path)
        yield Record(
            id=entry.id,
            split=entry.split,
            label=labels[entry.label_name],
            label_name=entry.label_name,
            source=_display(entry.path),
            image=image,
            error=error,
        )


# --- image folder -----------------------------------------------------------------------------


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
    if not any(SPLIT_ALIASES[folder.lower()] == "validation" for folder in splits):
        entries = _assign_validation(entries, labels, fraction, seed, pool="train")
    _require_test(entries, str(root), f"add a test/ folder (expected layout {FOLDER_LAYOUT})")
    info = SourceInfo("folder", str(root), class_names, _listing_fingerprint(entries))
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


# --- CSV manifest -----------------------------------------------------------------------------


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
    info = SourceInfo("csv", str(path), class_names, fingerprint)
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


# --- Hugging Face datasets --------------------------------------------------------------------


def _open_hf(
    spec: str,
    fraction: float,
    seed: int,
    retries: int,
    base_dir: Path,
    sleep: Callable[[float], None],
) -> tuple[SourceInfo, Iterator[Record]]:
    import datasets  # heavy (about a second); only hub sources pay for it

    local = Path(spec).expanduser()
    local = local if local.is_absolute() else base_dir / local
    if spec and local.is_dir():
        location, name, kwargs = str(local.resolve()), str(local.resolve()), {}
    else:
        repo, _, revision = spec.partition("@")
        if not repo:
            raise UserError("data.source: hf: needs a dataset id, e.g. hf:Matthijs/snacks")
        revision = revision or DEFAULT_HF_REVISION
        location, name, kwargs = f"{repo}@{revision}", repo, {"revision": revision}
    loaded = _with_retries(lambda: datasets.load_dataset(name, **kwargs), location, retries, sleep)
    splits = _hub_splits(loaded, location)
    first = splits["train"][1]
    image_col, label_col = _hub_columns(first, location)
    class_names = list(first.features[label_col].names)
    undecoded = {}
    for split, (hub_name, dataset) in splits.items():
        same_columns = _hub_columns(dataset, location) == (image_col, label_col)
        if not same_columns or list(dataset.features[label_col].names) != class_names:
            raise UserError(f"hf:{location}: split {hub_name} has different columns or classes")
        dataset = dataset.select_columns([image_col, label_col])
        # decode=False: the raw file bytes, as {"bytes", "path"}; decoding is preprocess's job.
        undecoded[split] = (hub_name, dataset.cast_column(image_col, datasets.Image(decode=False)))
    splits = undecoded
    if "test" not in splits:
        raise UserError(
            f"hf:{location}: no test split (splits: {', '.join(loaded)}); "
            "pick a dataset with a test split, or use a local folder"
        )
    info = SourceInfo("hf", location, class_names, _hub_fingerprint(location, splits))
    records = _stream_hub(splits, location, image_col, label_col, class_names, fraction, seed)
    return info, records


def _with_retries(
    call: Callable[[], Any], location: str, retries: int, sleep: Callable[[float], None]
) -> Any:
    """Run `call`, retrying transient hub errors with 1 s, 2 s, 4 s... backoff.

    A permanent failure, or the last transient one, becomes one UserError line.
    """
    for attempt in range(max(retries, 0) + 1):
        try:
            return call()
        except Exception as error:  # classified below; anything unclassified is a load failure
            kind = _classify(error)
            if kind == "transient" and attempt < retries:
                sleep(2.0**attempt)
                continue
            reason = _short(error)
            if kind == "not_found":
                raise UserError(
                    f"Hugging Face dataset {location} not found or not accessible ({reason}): "
                    f"check data.source (hf:<id>[@revision]), or {_OFFLINE_HINT}"
                ) from None
            if kind in ("transient", "offline"):
                tries = f", {attempt + 1} attempts" if attempt else ""
                raise UserError(
                    f"cannot reach the Hugging Face hub for {location} ({reason}{tries}): "
                    f"connect to the internet, or {_OFFLINE_HINT}"
                ) from None
            raise UserError(f"cannot load Hugging Face dataset {location} ({reason})") from None
    raise AssertionError("unreachable")  # pragma: no cover


_TRANSIENT_NAMES = {
    "ConnectionError", "TimeoutError", "Timeout", "TimeoutException", "TransportError",
    "NetworkError", "ConnectError", "ConnectTimeout", "ReadTimeout", "RemoteProtocolError",
    "ChunkedEncodingError", "ClientConnectionError", "ServerTimeoutError", "gaierror",
    "LocalEntryNotFoundError",  # huggingface_hub: hub unreachable and the file is not cached
}  # fmt: skip
_NOT_FOUND_NAMES = {
    "DatasetNotFoundError", "RepositoryNotFoundError", "RevisionNotFoundError",
    "GatedRepoError", "DataFilesNotFoundError", "EmptyDatasetError",
}  # fmt: skip


def _classify(error: BaseException) -> str:
    """ "transient", "offline", "not_found" or "other", from the error and its causes.

    Names, not classes, are matched so requests, httpx, aiohttp and huggingface_hub errors are
    all recognised without importing them.
    """
    chain: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and current not in chain and len(chain) < 10:
        chain.append(current)
        current = current.__cause__ or current.__context__
    names = {cls.__name__ for exc in chain for cls in type(exc).__mro__}
    if "OfflineModeIsEnabled" in names:
        return "offline"
    if names & _NOT_FOUND_NAMES:
        return "not_found"
    for exc in chain:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        status = status if isinstance(status, int) else getattr(exc, "status_code", None)
        if isinstance(status, int):
            if status == 429 or status >= 500:
                return "transient"
            if status in (401, 403, 404, 410):
                return "not_found"
    if names & _TRANSIENT_NAMES:
        return "transient"
    return "other"


def _short(error: BaseException, limit: int = 120) -> str:
    text = " ".join(str(error).split())
    text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _hub_splits(loaded: Any, location: str) -> dict[str, tuple[str, Any]]:
    """Normalised split name -> (hub split name, dataset); needs a train split."""
    splits: dict[str, tuple[str, Any]] = {}
    for hub_name in sorted(loaded):
        split = SPLIT_ALIASES.get(hub_name.lower())
        if split is None:
            continue  # e.g. "extra": not part of the pipeline's three splits
        if split in splits:
            raise UserError(
                f"hf:{location}: splits {splits[split][0]} and {hub_name} both map to {split}"
            )
        splits[split] = (hub_name, loaded[hub_name])
    if "train" not in splits:
        raise UserError(f"hf:{location}: no train split (splits: {', '.join(loaded)})")
    return splits


def _hub_columns(dataset: Any, location: str) -> tuple[str, str]:
    """The image column (an Image feature) and label column (a ClassLabel, "label" preferred)."""
    from datasets import ClassLabel, Image

    features = dataset.features
    images = [name for name, feature in features.items() if isinstance(feature, Image)]
    labels = [name for name, feature in features.items() if isinstance(feature, ClassLabel)]
    labels.sort(key=lambda name: name not in ("label", "labels"))
    if not images or not labels:
        raise UserError(
            f"hf:{location}: needs an image column (datasets.Image) and a label column "
            f"(datasets.ClassLabel); it has {', '.join(f'{k}: {v}' for k, v in features.items())}"
        )
    return images[0], labels[0]


def _hub_fingerprint(location: str, splits: dict[str, tuple[str, Any]]) -> dict:
    """The hub commit the data came from when known, else datasets' per-split fingerprints.

    datasets caches a hub dataset under `.../<config>/<version>/<commit sha>/`, so the sha is
    read from the cache path rather than asking the hub a second time.
    """
    rows = {split: len(dataset) for split, (_, dataset) in splits.items()}
    for _, dataset in splits.values():
        for cache in dataset.cache_files:
            for part in Path(cache.get("filename", "")).parts:
                if re.fullmatch(r"[0-9a-f]{40}", part):
                    return {"source": location, "commit": part, "rows": rows}
    fingerprints = {
        split: getattr(dataset, "_fingerprint", None) for split, (_, dataset) in splits.items()
    }
    return {"source": location, "splits": fingerprints, "rows": rows}


def _stream_hub(
    splits: dict[str, tuple[str, Any]],
    location: str,
    image_col: str,
    label_col: str,
    class_names: list[str],
    fraction: float,
    seed: int,
) -> Iterator[Record]:
    """Rows split by split (train, validation, test), carving validation from train if needed."""
    plan: list[tuple[str, str, Any, list[int] | None]] = []  # (split, hub split, dataset, rows)
    hub_train, train = splits["train"]
    if "validation" in splits:
        plan.append(("train", hub_train, train, None))
    else:
        labels = list(train[label_col])
        held_ids = stratified_holdout(
            ((f"{i:06d}", label) for i, label in enumerate(labels) if label >= 0), fraction, seed
        )
        held = sorted(int(i) for i in held_ids)
        kept = sorted(set(range(len(labels))) - set(held))
        plan += [("train", hub_train, train, kept), ("validation", hub_train, train, held)]
    for split in ("validation", "test"):
        if split in splits:
            plan.append((split, *splits[split], None))
    for split, hub_name, dataset, rows in plan:
        yield from _hub_records(
            split, hub_name, dataset, rows, location, image_col, label_col, class_names
        )


def _hub_records(
    split: str,
    hub_name: str,
    dataset: Any,
    rows: list[int] | None,
    location: str,
    image_col: str,
    label_col: str,
    class_names: list[str],
) -> Iterator[Record]:
    indices = rows if rows is not None else range(len(dataset))
    subset = dataset if rows is None else dataset.select(rows)
    positions = iter(indices)
    for batch in subset.iter(batch_size=64):
        for image, label in zip(batch[image_col], batch[label_col], strict=True):
            row = next(positions)
            data, error = _hub_image_bytes(image)
            if not 0 <= label < len(class_names):
                label, error = -1, error or "missing label"
            yield Record(
                id=f"hf/{hub_name}/{row:06d}",
                split=split,
                label=label,
                label_name=class_names[label] if label >= 0 else "",
                source=f"hf:{location}:{hub_name}[{row}]",
                image=data,
                error=error,
            )


def _hub_image_bytes(image: dict | None) -> tuple[bytes | None, str | None]:
    """The undecoded bytes of an Image(decode=False) cell, or from its local path."""
    if not image:
        return None, "no image in this row"
    if image.get("bytes"):
        return image["bytes"], None
    path = image.get("path")
    if path and os.path.isfile(path):
        return _read_bytes(path)
    return None, "no image bytes in this row"
