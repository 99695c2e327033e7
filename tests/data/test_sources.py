"""Sources: tiny generated image folders, CSV manifests and a local stand-in for the HF hub."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import random
import shutil
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from siamese_cv.core.errors import UserError
from siamese_cv.data import sources
from siamese_cv.data.sources import Record, holdout_count, open_source, stratified_holdout

COLOURS = {"apple": (200, 30, 30), "kiwi": (40, 160, 40), "plum": (90, 20, 120)}


def _png(colour: tuple[int, int, int], seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (6, 6), colour).save(buffer, "PNG")
    return buffer.getvalue() + bytes([seed % 256])  # distinct bytes per file, still a valid PNG


def _tree(root: Path, layout: dict[str, dict[str, int]]) -> Path:
    """Write `layout` = {split folder: {class: image count}} as PNGs under `root`."""
    for split, classes in layout.items():
        for name, count in classes.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                (folder / f"{i:03d}.png").write_bytes(_png(COLOURS.get(name, (0, 0, 0)), i))
    return root


def _open(source: str | Path, base: Path, **kwargs) -> tuple[sources.SourceInfo, list[Record]]:
    options = {"val_fraction": 0.25, "seed": 7, "retries": 3, "base_dir": base, **kwargs}
    info, records = open_source(str(source), **options)
    return info, list(records)


# --- image folder -----------------------------------------------------------------------------


def test_folder_with_all_splits(tmp_path: Path) -> None:
    root = _tree(
        tmp_path / "food",
        {"train": {"kiwi": 2, "apple": 2}, "val": {"apple": 1}, "test": {"plum": 1, "kiwi": 1}},
    )
    info, records = _open("food", tmp_path)  # relative to base_dir
    assert info.kind == "folder" and info.location == str(root)
    assert info.class_names == ["apple", "kiwi", "plum"]  # sorted union over splits
    assert [(r.split, r.id, r.label) for r in records] == [
        ("train", "train/apple/000.png", 0),
        ("train", "train/apple/001.png", 0),
        ("train", "train/kiwi/000.png", 1),
        ("train", "train/kiwi/001.png", 1),
        ("validation", "val/apple/000.png", 0),
        ("test", "test/kiwi/000.png", 1),
        ("test", "test/plum/000.png", 2),
    ]
    first = records[0]
    assert first.image == (root / "train/apple/000.png").read_bytes() and first.error is None
    assert first.source == str(root / "train/apple/000.png") and first.label_name == "apple"
    assert info.fingerprint["files"] == 7
    assert info.fingerprint["bytes"] == sum(len(r.image or b"") for r in records)


def test_real_photo_folder_without_validation(make_folder) -> None:
    root = make_folder(train=4, test=1, classes=2)  # symlinks to food10 photos
    info, records = open_source(str(root), val_fraction=0.25, seed=0, retries=0, base_dir=root)
    assert len(info.class_names) == 2
    assert Counter(r.split for r in records) == {"train": 4, "validation": 4, "test": 2}
    assert all(r.image and r.image[:3] == b"\xff\xd8\xff" and r.error is None for r in records)


def test_records_stream_lazily(tmp_path: Path, monkeypatch) -> None:
    _tree(tmp_path, {"train": {"apple": 3}, "test": {"apple": 1}})
    reads: list[str] = []
    real = sources._read_bytes
    monkeypatch.setattr(sources, "_read_bytes", lambda p: (reads.append(p), real(p))[1])
    _, records = open_source(str(tmp_path), val_fraction=0.3, seed=0, retries=0, base_dir=tmp_path)
    assert reads == []
    next(records)
    assert len(reads) == 1


def test_missing_validation_is_a_stratified_seeded_slice(tmp_path: Path) -> None:
    _tree(tmp_path, {"train": {"apple": 8, "kiwi": 4, "plum": 1}, "test": {"apple": 1}})
    _, records = _open(tmp_path, tmp_path)
    held = Counter(r.label_name for r in records if r.split == "validation")
    assert held == {"apple": 2, "kiwi": 2}  # 25%, 2 or none a class; a 1-image class stays
    _, again = _open(tmp_path, tmp_path)
    assert [(r.id, r.split) for r in again] == [(r.id, r.split) for r in records]
    _, other_seed = _open(tmp_path, tmp_path, seed=8)
    assert {r.id for r in other_seed if r.split == "validation"} != {
        r.id for r in records if r.split == "validation"
    }


def test_holdout_ignores_listing_order() -> None:
    items = [(f"train/c{i % 3}/{i}.jpg", i % 3) for i in range(30)]
    shuffled = items[:]
    random.Random(1).shuffle(shuffled)
    assert stratified_holdout(items, 0.2, 3) == stratified_holdout(shuffled, 0.2, 3)
    assert len(stratified_holdout(items, 0.2, 3)) == 6
    assert stratified_holdout([("a", 0), ("b", 0)], 0.5, 0) == set()  # never one, never all


def test_holdout_lends_two_photos_or_none() -> None:
    counts = {n: holdout_count(n, 0.1) for n in (1, 2, 3, 4, 10, 14, 15, 375)}
    assert counts == {1: 0, 2: 0, 3: 0, 4: 2, 10: 2, 14: 2, 15: 2, 375: 38}
    assert holdout_count(10, 0.0) == 0 and holdout_count(375, 0.0) == 0
    assert holdout_count(3, 0.5) == 0 and holdout_count(6, 0.5) == 3


def test_holdout_of_a_large_class_is_the_old_rule() -> None:
    """food10's 375-photo classes keep exactly the slice their measured runs used."""
    ids = [f"train/c/{i:04d}.jpg" for i in range(375)]
    for fraction, seed in ((0.1, 42), (0.25, 7), (0.5, 0)):
        count = min(len(ids) - 1, max(1, int(fraction * len(ids) + 0.5)))
        ranked = sorted(ids, key=lambda i: hashlib.sha256(f"{seed}\0{i}".encode()).digest())
        assert stratified_holdout(((i, 3) for i in ids), fraction, seed) == set(ranked[:count])
    assert len(stratified_holdout(((i, 3) for i in ids), 0.1, 42)) == 38


def test_no_validation_with_fraction_zero(tmp_path: Path) -> None:
    _tree(tmp_path, {"train": {"apple": 10, "kiwi": 10}, "test": {"apple": 1}})
    _, records = _open(tmp_path, tmp_path, val_fraction=0.0)
    assert Counter(r.split for r in records) == {"train": 20, "test": 1}
    with pytest.raises(UserError, match=r"data.val_fraction: 1.0 is not in \[0, 1\)"):
        _open(tmp_path, tmp_path, val_fraction=1.0)


def test_hidden_and_non_image_files_are_ignored(tmp_path: Path) -> None:
    _tree(tmp_path, {"train": {"apple": 1}, "test": {"apple": 1}})
    (tmp_path / "train/apple/.DS_Store").write_bytes(b"\0\0")
    (tmp_path / "train/apple/._000.png").write_bytes(b"mac resource fork")
    (tmp_path / "train/apple/notes.txt").write_text("hi")
    (tmp_path / "train/.hidden_class").mkdir()
    (tmp_path / "train/.hidden_class/x.png").write_bytes(_png((1, 2, 3)))
    (tmp_path / "train/apple/UPPER.JPG").write_bytes(_png((4, 5, 6)))
    info, records = _open(tmp_path, tmp_path)
    assert info.class_names == ["apple"]
    assert sorted(r.id for r in records if r.split != "test") == [
        "train/apple/000.png",
        "train/apple/UPPER.JPG",
    ]


def test_symlink_loops_are_reported_not_followed_forever(tmp_path: Path) -> None:
    _tree(tmp_path, {"train": {"apple": 1, "kiwi": 1}, "test": {"apple": 1}})
    os.symlink("..", tmp_path / "train/apple/up")  # folder loop back to train/
    os.symlink(tmp_path / "train/apple", tmp_path / "train/apple/self")  # loop onto itself
    os.symlink("loop.png", tmp_path / "train/apple/loop.png")  # a file that points to itself
    os.symlink("gone.png", tmp_path / "train/apple/dangling.png")
    _, records = _open(tmp_path, tmp_path, val_fraction=0.01)
    train = {r.id: r for r in records if r.split != "test"}
    assert set(train) == {
        "train/apple/000.png",
        "train/apple/dangling.png",
        "train/apple/loop.png",
        "train/kiwi/000.png",
    }
    assert train["train/apple/loop.png"].error == "symlink loop"
    assert train["train/apple/dangling.png"].error == "broken symlink"
    assert train["train/apple/loop.png"].image is None and train["train/apple/loop.png"].label == 0


def test_unreadable_file_is_a_record_with_a_reason(tmp_path: Path) -> None:
    _tree(tmp_path, {"train": {"apple": 2}, "test": {"apple": 1}})
    locked = tmp_path / "train/apple/001.png"
    locked.chmod(0)
    try:
        if os.access(locked, os.R_OK):
            pytest.skip("running as root: chmod 000 does not stop reads (see the monkeypatch test)")
        _, records = _open(tmp_path, tmp_path)
        record = next(r for r in records if r.id == "train/apple/001.png")
        assert record.image is None and record.error == "permission denied"
    finally:
        locked.chmod(0o644)


def test_read_failures_surface_even_as_root(tmp_path: Path, monkeypatch) -> None:
    _tree(tmp_path, {"train": {"apple": 2}, "test": {"apple": 1}})
    os.mkfifo(tmp_path / "train/apple/pipe.png")  # would block a plain open()
    real_open = os.open

    def deny(path, *args, **kwargs):
        if str(path).endswith("001.png"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(sources.os, "open", deny)
    _, records = _open(tmp_path, tmp_path, val_fraction=0.01)
    by_id = {r.id: r for r in records}
    assert by_id["train/apple/001.png"].error == "permission denied"
    assert by_id["train/apple/pipe.png"].error == "not a regular file"
    assert by_id["train/apple/000.png"].image is not None


def test_non_utf8_file_names_get_valid_unique_ids(tmp_path: Path) -> None:
    _tree(tmp_path, {"train": {"apple": 0}, "test": {"apple": 1}})
    folder = os.fsencode(tmp_path / "train/apple")
    with open(os.path.join(folder, b"caf\xe9.png"), "wb") as handle:
        handle.write(_png((1, 1, 1)))
    (tmp_path / "train/apple/caf\\xe9.png").write_bytes(_png((2, 2, 2)))  # the escaped spelling
    _, records = _open(tmp_path, tmp_path, val_fraction=0.01)
    train = [r for r in records if r.split != "test"]
    ids = [r.id for r in train]
    assert len(set(ids)) == 2 and all(i.encode("utf-8") for i in ids)
    assert set(ids) == {"train/apple/caf\\xe9.png", "train/apple/caf\\xe9.png#2"}
    assert all(r.image is not None and r.error is None for r in train)
    assert all(r.source.encode("utf-8") for r in train)


def test_bad_folders_say_the_expected_layout(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"no such folder or CSV file .*missing: give an image"):
        _open("missing", tmp_path)
    (tmp_path / "flat").mkdir()
    with pytest.raises(UserError, match=r"no train/ folder; expected layout train/ \[val/\] test/"):
        _open(tmp_path / "flat", tmp_path)
    _tree(tmp_path / "notest", {"train": {"apple": 2}})
    with pytest.raises(UserError, match="no test split"):
        _open(tmp_path / "notest", tmp_path)
    _tree(tmp_path / "both", {"train": {"a": 1}, "val": {"a": 1}, "validation": {"a": 1}})
    with pytest.raises(UserError, match="val and validation are both the validation split"):
        _open(tmp_path / "both", tmp_path)


# --- CSV manifest -----------------------------------------------------------------------------


def _manifest(tmp_path: Path, text: str) -> Path:
    for name in ("a.png", "b.png", "c.png", "d.png", "e.png", "f.png"):
        (tmp_path / "img").mkdir(exist_ok=True)
        (tmp_path / "img" / name).write_bytes(_png((9, 9, 9), ord(name[0])))
    path = tmp_path / "data.csv"
    path.write_text(text)
    return path


def test_csv_manifest(tmp_path: Path) -> None:
    path = _manifest(
        tmp_path,
        "path,label,split\n"
        "img/a.png,kiwi,\nimg/b.png,kiwi,\nimg/c.png,apple,\nimg/d.png,apple,train\n"
        "img/e.png,apple,test\nimg/missing.png,kiwi,test\n",
    )
    info, records = _open(path.name, tmp_path, val_fraction=0.3)
    assert info.kind == "csv" and info.class_names == ["apple", "kiwi"]
    by_id = {r.id: r for r in records}
    assert by_id["img/e.png"].split == "test" and by_id["img/e.png"].label == 0
    assert by_id["img/a.png"].image == (tmp_path / "img/a.png").read_bytes()
    assert (
        by_id["img/missing.png"].error == "file vanished" and by_id["img/missing.png"].image is None
    )
    # No validation rows: blank and train rows are sliced, 2 or none a class (these have 2 each)
    assert not any(r.split == "validation" for r in records)
    assert {r.id for r in records if r.split == "train"} == {f"img/{c}.png" for c in "abcd"}
    assert "manifest_sha256" in info.fingerprint


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("img/a.png,kiwi,train\nimg/b.png,,test\n", "line 3: empty label"),
        ("img/a.png,kiwi,train\nimg/b.png\n", "line 3: missing the label column"),
        ("img/a.png,kiwi,train\nimg/b.png,kiwi,holdout\n", "line 3: unknown split 'holdout'"),
        (
            "img/a.png,kiwi,test\nimg/a.png,kiwi,train\n",
            "line 3: img/a.png is already listed on line 2",
        ),
        ("img/a.png,kiwi,train\nimg/b.png,kiwi,\n", "no test split"),
    ],
)
def test_csv_bad_rows_name_the_line(tmp_path: Path, body: str, message: str) -> None:
    path = _manifest(tmp_path, "path,label,split\n" + body)
    with pytest.raises(UserError, match=message):
        _open(path, tmp_path)


# --- Hugging Face hub (a local stand-in; the hub itself is never contacted) -------------------


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch) -> Path:
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    return tmp_path


def _stand_in(root: Path, splits: dict[str, list[int]]) -> Path:
    """A hub parquet conversion on disk: <root>/default/<split>/0000.parquet."""
    from datasets import ClassLabel, Dataset, Features
    from datasets import Image as HFImage

    features = Features({"image": HFImage(), "label": ClassLabel(names=["apple", "kiwi"])})
    for split, labels in splits.items():
        images = [{"bytes": _png((i, i, i), i), "path": None} for i in range(len(labels))]
        dataset = Dataset.from_dict({"image": images, "label": labels}, features=features)
        (root / "default" / split).mkdir(parents=True)
        dataset.to_parquet(str(root / "default" / split / "0000.parquet"))
    return root


def test_hf_local_stand_in(hf_cache: Path) -> None:
    _stand_in(hf_cache / "hub", {"train": [0, 1, 1], "validation": [1, 0], "test": [0]})
    info, records = _open("hf:hub", hf_cache)
    assert info.kind == "hf" and info.class_names == ["apple", "kiwi"]
    assert [(r.split, r.id, r.label) for r in records] == [
        ("train", "hf/train/000000", 0),
        ("train", "hf/train/000001", 1),
        ("train", "hf/train/000002", 1),
        ("validation", "hf/validation/000000", 1),
        ("validation", "hf/validation/000001", 0),
        ("test", "hf/test/000000", 0),
    ]
    assert records[1].image == _png((1, 1, 1), 1) and records[1].label_name == "kiwi"
    assert records[1].source == f"hf:{hf_cache / 'hub'}:train[1]"
    assert set(info.fingerprint["splits"]) == {"train", "validation", "test"}


def test_hf_without_validation_gets_a_slice(hf_cache: Path) -> None:
    _stand_in(hf_cache / "hub", {"train": [0, 0, 0, 0, 1, 1, 1, 1], "test": [0, 1]})
    _, records = _open(f"hf:{hf_cache / 'hub'}", hf_cache)
    held = [r for r in records if r.split == "validation"]
    assert Counter(r.label for r in held) == {0: 2, 1: 2}  # 25% of 4 is one: 2 or none
    assert all(r.id.startswith("hf/train/") for r in held)
    assert len([r for r in records if r.split == "train"]) == 4


@pytest.mark.parametrize(
    "splits",
    [
        {"train": [0, 1, 1, 0, 1], "validation": [1, 0], "test": [0, 1]},
        {"train": [0, 0, 0, 0, 1, 1, 1, 1, 0, 1], "test": [0, 1]},  # validation sliced off
    ],
    ids=["with-validation", "sliced-validation"],
)
def test_hf_streaming_gives_the_same_rows_and_caches_nothing(hf_cache: Path, splits) -> None:
    """data.streaming: the same records (ids, splits, labels, bytes) as the cached load, once
    written per split as the download stage writes them; no arrow copy in the datasets cache."""
    from siamese_cv.config.params import SPLITS
    from siamese_cv.data.parquet import RAW_SCHEMA, write_splits

    _stand_in(hf_cache / "hub", splits)
    _, cached = _open("hf:hub", hf_cache)
    before = {p for p in (hf_cache / "hf-cache").rglob("*.arrow")}
    assert before  # the cached load made an arrow copy of the dataset
    for path in (hf_cache / "hf-cache").iterdir():
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    info, streamed = _open("hf:hub", hf_cache, streaming=True)

    def by_split(records: list[Record]) -> dict[str, list[tuple]]:
        return {
            s: [(r.id, r.label, r.label_name, r.source, r.image) for r in records if r.split == s]
            for s in SPLITS
        }

    assert by_split(streamed) == by_split(cached)
    assert not list((hf_cache / "hf-cache").rglob("*.arrow"))
    assert info.fingerprint["streaming"] is True and len(info.fingerprint["files"]) == 64
    for name, records in (("cached", cached), ("streamed", streamed)):
        (hf_cache / name).mkdir()
        write_splits(hf_cache / name, RAW_SCHEMA, (r.row() for r in records), 4, SPLITS)
    for split in SPLITS:
        a = (hf_cache / "cached" / f"{split}.parquet").read_bytes()
        assert a == (hf_cache / "streamed" / f"{split}.parquet").read_bytes(), split

    (hf_cache / "hub/default/test/0000.parquet").touch()  # a changed file changes the fingerprint
    again, _ = _open("hf:hub", hf_cache, streaming=True)
    assert again.fingerprint["files"] != info.fingerprint["files"]


def _response(status: int):
    """A real response of the HTTP client the hub library uses, with `status`."""
    from huggingface_hub.utils import httpx as hub_http

    request = hub_http.Request("GET", "https://huggingface.co/api/datasets/x")
    return hub_http.Response(status, request=request)


def _hub_error_cases() -> list:
    """(exception, expected kind): each library's own types, not look-alike names."""
    pytest.importorskip("datasets")
    import aiohttp
    import requests
    from datasets.exceptions import DatasetNotFoundError
    from huggingface_hub import errors as hub_errors
    from huggingface_hub.utils import httpx as hub_http

    class Timeout(Exception):  # named like requests' Timeout, but not one: not retried
        pass

    return [
        (hub_errors.HfHubHTTPError("503", response=_response(503)), "transient"),
        (hub_errors.HfHubHTTPError("429", response=_response(429)), "transient"),
        (hub_errors.HfHubHTTPError("403", response=_response(403)), "not_found"),
        (hub_errors.HfHubHTTPError("400", response=_response(400)), "other"),
        (hub_errors.GatedRepoError("gated", response=_response(401)), "not_found"),
        (DatasetNotFoundError("no such dataset"), "not_found"),
        (hub_errors.LocalEntryNotFoundError("not cached"), "transient"),
        (hub_http.ReadTimeout("read timed out"), "transient"),
        (requests.ConnectionError("reset"), "transient"),
        (aiohttp.ClientConnectionError("reset"), "transient"),
        (TimeoutError("timed out"), "transient"),
        (hub_errors.OfflineModeIsEnabled("offline"), "offline"),
        (Timeout("timed out"), "other"),
        (ValueError("bad column"), "other"),
    ]


def test_hub_errors_are_classified_by_their_types() -> None:
    from siamese_cv.data.sources.hub import _classify

    for error, kind in _hub_error_cases():
        assert _classify(error) == kind, repr(error)
        try:  # the same error behind datasets' re-raise is classified the same
            raise ConnectionError("Couldn't reach the Hub") from error
        except ConnectionError as wrapped:
            assert _classify(wrapped) == (kind if kind != "other" else "transient"), repr(error)


@pytest.mark.usefixtures("hub_resolves")
def test_an_error_merely_named_like_a_network_error_is_not_retried(monkeypatch, tmp_path) -> None:
    datasets = pytest.importorskip("datasets")

    class ConnectTimeout(Exception):  # httpx's name, but not httpx's type
        pass

    def failing(*args, **kwargs):
        raise ConnectTimeout("no")

    monkeypatch.setattr(datasets, "load_dataset", failing)
    sleeps: list[float] = []
    with pytest.raises(UserError, match="cannot load Hugging Face dataset"):
        _open("hf:Matthijs/snacks", tmp_path, retries=3, sleep=sleeps.append)
    assert sleeps == []


@pytest.fixture
def hub_resolves(monkeypatch):
    """Pretend the hub's name resolves, so the retry path runs on this offline machine."""
    from siamese_cv.data.sources import hub

    monkeypatch.setattr(hub, "_hub_resolves", lambda: True)


def test_no_dns_means_offline_at_once_without_retries(monkeypatch, tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    from huggingface_hub import errors as hub_errors

    from siamese_cv.data.sources import hub

    monkeypatch.setattr(hub, "_hub_resolves", lambda: False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    calls: list[str | None] = []

    def offline(*args, **kwargs):
        calls.append(os.environ.get("HF_HUB_OFFLINE"))
        # what datasets raises: a plain ConnectionError chained to the hub library's error
        raise ConnectionError(
            "Couldn't reach 'Matthijs/snacks' on the Hub (OfflineModeIsEnabled)"
        ) from hub_errors.OfflineModeIsEnabled("offline mode is enabled")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    sleeps: list[float] = []
    with pytest.raises(UserError, match="make repro-offline"):
        _open("hf:Matthijs/snacks", tmp_path, retries=3, sleep=sleeps.append)
    assert calls == ["1"] and sleeps == []


@pytest.mark.usefixtures("hub_resolves")
def test_hf_offline_retries_then_one_user_error(monkeypatch, tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    from huggingface_hub.utils import httpx as hub_http

    calls: list[tuple] = []

    def offline(*args, **kwargs):
        calls.append((args, kwargs))
        raise ConnectionError(
            "Couldn't reach 'Matthijs/snacks' on the Hub (ConnectError)"
        ) from hub_http.ConnectError("[Errno -2] Name or service not known")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    sleeps: list[float] = []
    with pytest.raises(UserError) as caught:
        _open("hf:Matthijs/snacks", tmp_path, retries=3, sleep=sleeps.append)
    assert sleeps == [1.0, 2.0, 4.0] and len(calls) == 4
    assert calls[0] == (("Matthijs/snacks",), {"revision": "refs/convert/parquet"})
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("cannot reach the Hugging Face hub for Matthijs/snacks@refs/convert")
    assert message.endswith("make repro-offline DATA=<image folder>")


@pytest.mark.usefixtures("hub_resolves")
def test_hf_not_found_is_not_retried(monkeypatch, tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    from huggingface_hub import errors as hub_errors

    def missing(*args, **kwargs):
        raise hub_errors.RepositoryNotFoundError(
            "404 Client Error: Repository Not Found", response=_response(404)
        )

    monkeypatch.setattr(datasets, "load_dataset", missing)
    sleeps: list[float] = []
    with pytest.raises(UserError, match="nobody/nothing@v1 not found or not accessible"):
        _open("hf:nobody/nothing@v1", tmp_path, sleep=sleeps.append)
    assert sleeps == []


@pytest.mark.usefixtures("hub_resolves")
def test_hf_transient_error_then_success(monkeypatch, hf_cache: Path) -> None:
    datasets = pytest.importorskip("datasets")
    _stand_in(hf_cache / "hub", {"train": [0, 1, 0, 1], "test": [0]})
    real = datasets.load_dataset
    attempts: list[int] = []

    from huggingface_hub import errors as hub_errors

    def flaky(name, **kwargs):
        attempts.append(1)
        if len(attempts) < 3:
            raise hub_errors.HfHubHTTPError("503 Service Unavailable", response=_response(503))
        return real(str(hf_cache / "hub"))

    monkeypatch.setattr(datasets, "load_dataset", flaky)
    sleeps: list[float] = []
    info, records = _open("hf:someone/snacks", hf_cache, sleep=sleeps.append)
    assert sleeps == [1.0, 2.0] and info.location == "someone/snacks@refs/convert/parquet"
    assert len(records) == 5


def test_hub_retry_warnings_are_not_printed(monkeypatch, tmp_path: Path, caplog) -> None:
    """Offline, huggingface_hub logs two lines per internal retry; the user gets one error line."""
    datasets = pytest.importorskip("datasets")
    hub_log = logging.getLogger("huggingface_hub.utils._http")

    def offline(*args, **kwargs):
        hub_log.warning("'[Errno -2] Name or service not known' thrown while requesting HEAD")
        raise ConnectionError("Couldn't reach 'Matthijs/snacks' on the Hub (ConnectError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with caplog.at_level(logging.WARNING), pytest.raises(UserError, match="cannot reach"):
        _open("hf:Matthijs/snacks", tmp_path, retries=1, sleep=lambda seconds: None)
    assert [r.getMessage() for r in caplog.records if r.name.startswith("huggingface_hub")] == []
    with caplog.at_level(logging.WARNING):
        hub_log.warning("outside a load")  # the library's logging is left as it was
    assert [r.getMessage() for r in caplog.records] == ["outside a load"]


@pytest.mark.parametrize("streaming", [False, True], ids=["cached", "streamed"])
def test_hf_rows_without_a_label_are_skipped_and_reported(
    hf_cache: Path, tmp_path: Path, streaming: bool
) -> None:
    """A row whose ClassLabel is missing (-1) never reaches training as class -1: preprocess
    skips it and lists it in the data report, like an unreadable image."""
    from siamese_cv.config.params import SPLITS, PreprocessParams
    from siamese_cv.data.parquet import RAW_SCHEMA, read_table, write_splits
    from siamese_cv.data.preprocessing import preprocess_splits

    labels = {"train": [0, -1, 1, 0, 1, 0, 1, 0, 1, -1], "test": [0, -1, 1]}  # validation sliced
    _stand_in(hf_cache / "hub", labels)
    _, records = _open("hf:hub", hf_cache, streaming=streaming)
    unlabelled = {"hf/train/000001", "hf/train/000009", "hf/test/000001"}
    assert {r.id for r in records if r.label < 0} == unlabelled
    assert all(r.image is None and r.error == "missing label" for r in records if r.label < 0)
    raw = tmp_path / "raw"
    raw.mkdir()
    write_splits(raw, RAW_SCHEMA, (r.row() for r in records), 256, SPLITS)
    report = preprocess_splits(raw, tmp_path / "processed", PreprocessParams(image_size=16))
    skipped = {f["id"]: f["reason"] for f in report["skipped"]["files"]}
    assert skipped == dict.fromkeys(unlabelled, "missing label")
    kept = [
        read_table(tmp_path / "processed" / f"{s}.parquet", ["label"]).column("label").to_pylist()
        for s in SPLITS
    ]
    assert sum(map(len, kept)) == 13 - 3
    assert all(0 <= label <= 1 for split in kept for label in split)
