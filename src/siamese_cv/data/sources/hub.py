"""A Hugging Face dataset (`hf:<id>[@revision]` or a local parquet conversion), with retries."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import json
import logging
import os
import re
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tenacity

from siamese_cv.core.errors import UserError
from siamese_cv.core.logs import quiet_loggers

from ._common import (
    SPLIT_ALIASES,
    Record,
    SourceInfo,
    _read,
    _validation_from,
    stratified_holdout,
)

DEFAULT_HF_REVISION = "refs/convert/parquet"
_OFFLINE_HINT = "run the offline profile on a local folder: make repro-offline DATA=<image folder>"


def _hub_resolves() -> bool:
    """Whether the hub's host name resolves: a machine without network fails this at once."""
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or ""
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return False
    return True


def _open_hf(
    spec: str,
    fraction: float,
    seed: int,
    retries: int,
    base_dir: Path,
    sleep: Callable[[float], None],
    streaming: bool = False,
) -> tuple[SourceInfo, Iterator[Record]]:
    local = Path(spec).expanduser()
    local = local if local.is_absolute() else base_dir / local
    if not (spec and local.is_dir()) and not _hub_resolves():
        # No DNS for the hub: work from the local cache only, instead of minutes of retries.
        os.environ["HF_HUB_OFFLINE"] = "1"
        retries = 0
    import datasets  # heavy (about a second); only hub sources pay for it

    if spec and local.is_dir():
        location, name, kwargs = str(local.resolve()), str(local.resolve()), {}
    else:
        repo, _, revision = spec.partition("@")
        if not repo:
            raise UserError("data.source: hf: needs a dataset id, e.g. hf:Matthijs/snacks")
        revision = revision or DEFAULT_HF_REVISION
        location, name, kwargs = f"{repo}@{revision}", repo, {"revision": revision}
    files: dict[str, list[str]] = {}
    with _quiet_hub_logs():
        if streaming:
            # The builder resolves the data files (hub: at a commit) without downloading them.
            builder = _with_retries(
                lambda: datasets.load_dataset_builder(name, **kwargs), location, retries, sleep
            )
            loaded = builder.as_streaming_dataset()
            files = {str(k): list(v) for k, v in (builder.config.data_files or {}).items()}
        else:
            loaded = _with_retries(
                lambda: datasets.load_dataset(name, **kwargs), location, retries, sleep
            )
    splits = _hub_splits(loaded, location)
    first = splits["train"][1]
    image_col, label_col = _hub_columns(first, location)
    class_names = list(first.features[label_col].names)
    undecoded = {}
    for split, (hub_name, dataset) in splits.items():
        if dataset.features is None:
            raise UserError(
                f"hf:{location}: split {hub_name} does not declare its features when "
                "streamed; set data.streaming: false"
            )
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
    fingerprint = (
        _files_fingerprint(location, files) if streaming else _hub_fingerprint(location, splits)
    )
    info = SourceInfo(
        "hf", location, class_names, fingerprint, _validation_from("validation" not in splits)
    )
    stream = _stream_iterable if streaming else _stream_hub
    return info, stream(splits, location, image_col, label_col, class_names, fraction, seed)


@contextlib.contextmanager
def _quiet_hub_logs() -> Iterator[None]:
    """Hide the hub libraries' own warnings (one per internal retry) while loading.

    Offline, huggingface_hub logs two stderr lines per HTTP retry; the outcome is reported as the
    single UserError line of `_with_retries` instead.
    """
    with quiet_loggers(("huggingface_hub", "datasets", "fsspec"), logging.ERROR):
        yield


def _with_retries(
    call: Callable[[], Any], location: str, retries: int, sleep: Callable[[float], None]
) -> Any:
    """Run `call`, retrying transient hub errors with 1 s, 2 s, 4 s... backoff (tenacity).

    A permanent failure, or the last transient one, becomes one UserError line.
    """
    attempts = 0

    def attempt() -> Any:
        nonlocal attempts
        attempts += 1
        return call()

    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_attempt(max(retries, 0) + 1),
        wait=tenacity.wait_exponential(multiplier=1, exp_base=2),
        retry=tenacity.retry_if_exception(lambda error: _classify(error) == "transient"),
        sleep=sleep,
        reraise=True,
    )
    try:
        return retrying(attempt)
    except Exception as error:  # classified below; anything unclassified is a load failure
        kind, reason = _classify(error), _short(error)
        if kind == "not_found":
            raise UserError(
                f"Hugging Face dataset {location} not found or not accessible ({reason}): "
                f"check data.source (hf:<id>[@revision]), or {_OFFLINE_HINT}"
            ) from None
        if kind in ("transient", "offline"):
            tries = f", {attempts} attempts" if attempts > 1 else ""
            raise UserError(
                f"cannot reach the Hugging Face hub for {location} ({reason}{tries}): "
                f"connect to the internet, or {_OFFLINE_HINT}"
            ) from None
        raise UserError(f"cannot load Hugging Face dataset {location} ({reason})") from None


@dataclass(frozen=True)
class _HubErrors:
    """The exception types of the libraries a hub load goes through, by what they mean."""

    offline: tuple[type[BaseException], ...]
    not_found: tuple[type[BaseException], ...]
    transient: tuple[type[BaseException], ...]  # the network, not the request: worth retrying
    http: tuple[type[BaseException], ...]  # carry an HTTP status: 429 and 5xx are transient


@functools.cache
def _hub_errors() -> _HubErrors:
    """Imported on first use: the hub's libraries are heavy, and loaded only for hf sources."""
    from datasets.data_files import EmptyDatasetError
    from datasets.exceptions import DataFilesNotFoundError, DatasetNotFoundError
    from huggingface_hub import errors as hub
    from huggingface_hub.utils import httpx as hub_http  # the HTTP client the hub library uses

    transient: list[type[BaseException]] = [
        ConnectionError, TimeoutError, socket.gaierror, hub_http.TransportError,
        hub.LocalEntryNotFoundError,  # hub unreachable and the file is not cached
    ]  # fmt: skip
    http: list[type[BaseException]] = [hub.HfHubHTTPError, hub_http.HTTPStatusError]
    with contextlib.suppress(ImportError):  # fsspec's streaming reads
        import aiohttp

        transient += [aiohttp.ClientConnectionError]
        http += [aiohttp.ClientResponseError]
    with contextlib.suppress(ImportError):
        import requests

        transient += [
            requests.ConnectionError,
            requests.Timeout,
            requests.exceptions.ChunkedEncodingError,
        ]
        http += [requests.HTTPError]
    not_found = (
        hub.RepositoryNotFoundError, hub.RevisionNotFoundError, hub.GatedRepoError,
        DatasetNotFoundError, DataFilesNotFoundError, EmptyDatasetError,
    )  # fmt: skip
    return _HubErrors((hub.OfflineModeIsEnabled,), not_found, tuple(transient), tuple(http))


def _classify(error: BaseException) -> str:
    """ "transient", "offline", "not_found" or "other", from the error and its causes.

    datasets re-raises the hub's errors as a plain ConnectionError chained to the original, so
    the whole chain is looked at, most specific meaning first.
    """
    chain: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and current not in chain and len(chain) < 10:
        chain.append(current)
        current = current.__cause__ or current.__context__
    types = _hub_errors()
    if any(isinstance(exc, types.offline) for exc in chain):
        return "offline"
    if any(isinstance(exc, types.not_found) for exc in chain):
        return "not_found"
    for exc in chain:
        if isinstance(exc, types.http):
            status = getattr(getattr(exc, "response", None), "status_code", None)
            status = getattr(exc, "status", None) if status is None else status  # aiohttp
            if isinstance(status, int) and (status == 429 or status >= 500):
                return "transient"
            if status in (401, 403, 404, 410):
                return "not_found"
    if any(isinstance(exc, types.transient) for exc in chain):
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


def _files_fingerprint(location: str, files: dict[str, list[str]]) -> dict:
    """A streamed dataset's fingerprint: its data files, and the hub commit they are read at.

    Hub files are `hf://datasets/<id>@<commit sha>/...`; local ones add size and mtime.
    """
    listing = {}
    for split, paths in sorted(files.items()):
        listing[split] = []
        for path in paths:
            entry = str(path)
            if os.path.isfile(path):
                info = os.stat(path)
                entry = f"{path}\0{info.st_size}\0{info.st_mtime_ns}"
            listing[split].append(entry)
    commits = {
        m for paths in files.values() for p in paths for m in re.findall(r"@([0-9a-f]{40})/", p)
    }
    digest = hashlib.sha256(json.dumps(listing, sort_keys=True).encode()).hexdigest()
    out = {"source": location, "streaming": True, "files": digest}
    if len(commits) == 1:
        out["commit"] = commits.pop()
    return out


def _stream_iterable(
    splits: dict[str, tuple[str, Any]],
    location: str,
    image_col: str,
    label_col: str,
    class_names: list[str],
    fraction: float,
    seed: int,
) -> Iterator[Record]:
    """`_stream_hub` for streamed (iterable) datasets: one pass per hub split, nothing cached.

    Without a validation split the train labels are streamed first to choose the slice, then
    train's rows go to train or validation as they come: the two splits' records interleave,
    each in row order, which `parquet.write_splits` turns into the same files.
    """
    held: set[int] | None = None
    if "validation" not in splits:
        _, train = splits["train"]
        labels = [row[label_col] for row in train.select_columns([label_col])]
        held = {
            int(i)
            for i in stratified_holdout(
                (
                    (f"{i:06d}", label)
                    for i, label in enumerate(labels)
                    if _has_class(label, class_names)
                ),
                fraction,
                seed,
            )
        }
    for split in ("train", "validation", "test"):
        if split not in splits:
            continue
        hub_name, dataset = splits[split]
        yield from _hub_records(
            split, hub_name, dataset, None, location, image_col, label_col, class_names,
            held if split == "train" else None,
        )  # fmt: skip


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
            (
                (f"{i:06d}", label)
                for i, label in enumerate(labels)
                if _has_class(label, class_names)
            ),
            fraction,
            seed,
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
    held: set[int] | None = None,
) -> Iterator[Record]:
    """Records of one hub split (of `rows` of it); rows in `held` go to validation instead."""
    if rows is None:
        subset, positions = dataset, itertools.count()
    else:
        subset, positions = dataset.select(rows), iter(rows)
    for batch in subset.iter(batch_size=64):
        for image, label in zip(batch[image_col], batch[label_col], strict=True):
            row = next(positions)
            data, error = _hub_image_bytes(image)
            if not _has_class(label, class_names):
                # no class to train on: skipped by preprocess and listed in its data report
                reason = "missing label" if label in (None, -1) else f"label {label} out of range"
                label, data, error = -1, None, error or reason
            yield Record(
                id=f"hf/{hub_name}/{row:06d}",
                split="validation" if held is not None and row in held else split,
                label=label,
                label_name=class_names[label] if label >= 0 else "",
                source=f"hf:{location}:{hub_name}[{row}]",
                image=data,
                error=error,
            )


def _has_class(label: Any, class_names: list[str]) -> bool:
    """Whether a label cell names one of the classes (not missing, -1 or out of range)."""
    return isinstance(label, int) and 0 <= label < len(class_names)


def _hub_image_bytes(image: dict | None) -> tuple[bytes | None, str | None]:
    """The undecoded bytes of an Image(decode=False) cell, or from its local path."""
    if not image:
        return None, "no image in this row"
    if image.get("bytes"):
        return image["bytes"], None
    path = image.get("path")
    if path and os.path.isfile(path):
        return _read(path)
    return None, "no image bytes in this row"
