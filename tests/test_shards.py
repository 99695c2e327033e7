"""Shards: row ranges, piece bookkeeping, shard processes, and a sharded preprocess that writes
the same bytes as a single-shard one (in-process here; tests/test_robustness.py kills shards
under the real `dvc repro`)."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from siamese_cv.config.params import SPLITS, PreprocessParams
from siamese_cv.core.errors import UserError
from siamese_cv.core.shards import ShardStore, describe_exit, run_shards, shard_range
from siamese_cv.data.parquet import RAW_SCHEMA, iter_row_range, write_splits
from siamese_cv.data.preprocessing import preprocess_splits


@pytest.mark.parametrize("rows", [0, 1, 7, 64, 1001])
@pytest.mark.parametrize("count", [1, 2, 3, 4, 16])
@pytest.mark.parametrize("align", [1, 8])
def test_shard_ranges_cover_the_rows_in_order(rows, count, align) -> None:
    ranges = [shard_range(rows, i, count, align) for i in range(count)]
    assert ranges[0][0] == 0 and ranges[-1][1] == rows
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
    assert all(start <= stop for start, stop in ranges)
    assert all(start % align == 0 for start, _ in ranges)
    sizes = [stop - start for start, stop in ranges]
    assert max(sizes) - min(sizes) <= align * 2  # balanced to within a block (or two at the end)


@pytest.mark.parametrize("index", [-1, 4])
def test_a_shard_index_out_of_range_is_one_line_naming_the_flag(index) -> None:
    with pytest.raises(UserError, match=rf"^--shard {index} is not in 0\.\.3: there are 4 shards"):
        shard_range(100, index, 4)


def test_row_ranges_read_the_same_rows_as_a_slice(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    table = pa.table({"x": np.arange(1000)})
    pq.write_table(table, path, row_group_size=64)
    rng = np.random.default_rng(0)
    for start, stop in [(0, 1000), (0, 0), (63, 65), (64, 128), (999, 1000), (500, 400)]:
        got = [v for b in iter_row_range(path, ["x"], start, stop, 50) for v in b.column(0)]
        assert [v.as_py() for v in got] == list(range(start, max(start, stop)))
    for _ in range(20):
        start, stop = sorted(rng.integers(0, 1001, 2))
        got = pa.concat_arrays([b.column(0) for b in iter_row_range(path, ["x"], start, stop)])
        assert got.to_pylist() == list(range(start, stop))


def test_a_piece_counts_only_when_complete_and_under_its_key(tmp_path: Path) -> None:
    store = ShardStore(tmp_path / "pieces", 3)
    with store.write(0, "k1", {"n": 1}) as tmp:
        (tmp / "a.bin").write_bytes(b"a")
    assert store.done(0, "k1") and not store.done(0, "k2") and not store.done(1, "k1")
    assert store.manifest(0) == {"n": 1, "key": "k1", "shard": 0, "count": 3}
    with pytest.raises(RuntimeError), store.write(1, "k1", {}) as tmp:
        (tmp / "a.bin").write_bytes(b"half")
        raise RuntimeError("killed")
    assert not store.done(1, "k1") and not store.piece(1).exists()
    other = ShardStore(tmp_path / "pieces", 2)  # another shard count: other folder names
    with other.write(0, "k1", {}):
        pass
    store.prune("k1")
    assert store.done(0, "k1") and not other.piece(0).exists()
    store.prune("k2")  # a changed input: every piece goes
    assert not store.piece(0).exists()
    store.remove()
    assert not (tmp_path / "pieces").exists()


def test_shard_processes_run_side_by_side_and_failures_are_reported(tmp_path: Path) -> None:
    script = (
        "import sys, time, pathlib; i = int(sys.argv[1]); time.sleep(0.2);"
        f"pathlib.Path(r'{tmp_path}', str(i)).touch(); sys.exit(3 if i == 2 else 0)"
    )
    failed = run_shards(lambda i: [sys.executable, "-c", script, str(i)], [0, 1, 2, 3], 2)
    assert failed == {2: 3}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0", "1", "2", "3"]  # kept going
    assert describe_exit(-9) == "killed by SIGKILL" and describe_exit(2) == "exit status 2"


def _raw(folder: Path, per_split: int) -> Path:
    """data/raw-like splits of small generated photos, one of them broken."""
    rng = np.random.default_rng(0)
    rows = []
    for split in SPLITS:
        for i in range(per_split):
            pixels = rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
            data = buffer.getvalue() if i != 5 else b"<html>not a photo</html>"
            label = i % 3
            rows.append(
                {"id": f"{split}/{i:03d}", "split": split, "label": label,
                 "label_name": f"c{label}", "source": f"{split}/{i}.jpg", "image": data,
                 "error": None}
            )  # fmt: skip
    folder.mkdir(parents=True)
    write_splits(folder, RAW_SCHEMA, iter(rows), 16, SPLITS)
    return folder


@pytest.mark.parametrize("shards", [2, 3, 7])
def test_sharded_preprocess_writes_the_single_shard_bytes(tmp_path, monkeypatch, shards) -> None:
    monkeypatch.chdir(tmp_path)  # the pieces live under data/.shards, relative to the project
    raw = _raw(tmp_path / "data/raw", 40)
    one = PreprocessParams(image_size=16, row_group_size=8, workers=1)
    many = PreprocessParams(image_size=16, row_group_size=8, workers=2, shards=shards)
    single = preprocess_splits(raw, tmp_path / "one", one)

    def command(index: int, key: str, workers: int) -> list[str]:
        code = (
            "import sys; from pathlib import Path;"
            "from siamese_cv.config.params import PreprocessParams;"
            "from siamese_cv.data.preprocessing import preprocess_shard;"
            f"preprocess_shard(Path('data/raw'), PreprocessParams(image_size=16, row_group_size=8,"
            f" shards={shards}), {index}, {key!r}, {workers})"
        )
        return [sys.executable, "-c", code]

    sharded = preprocess_splits(raw, tmp_path / "many", many, command)
    for split in SPLITS:
        a, b = tmp_path / "one" / f"{split}.parquet", tmp_path / "many" / f"{split}.parquet"
        assert a.read_bytes() == b.read_bytes(), split
        assert pq.ParquetFile(b).metadata.num_row_groups == 5  # 39 rows in groups of 8
    assert single.pop("preprocess")["shards"] == 1
    assert sharded.pop("preprocess")["shards"] == shards
    assert single == sharded  # same counts, the same skipped files in the same order
    assert [f["id"] for f in single["skipped"]["files"]] == [f"{s}/005" for s in SPLITS]
    assert not (tmp_path / "data/.shards").exists()


def test_a_failed_shard_keeps_the_others_for_the_next_run(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    raw = _raw(tmp_path / "data/raw", 20)
    params = PreprocessParams(image_size=16, row_group_size=8, workers=2, shards=3)
    runs: list[int] = []

    def command(index: int, key: str, workers: int) -> list[str]:
        first = index not in runs
        runs.append(index)
        fail = "raise SystemExit(1)" if index == 1 and first else "pass"
        code = (
            f"{fail}\nfrom pathlib import Path\n"
            "from siamese_cv.config.params import PreprocessParams\n"
            "from siamese_cv.data.preprocessing import preprocess_shard\n"
            "preprocess_shard(Path('data/raw'), PreprocessParams(image_size=16,"
            f" row_group_size=8, shards=3), {index}, {key!r}, {workers})"
        )
        return [sys.executable, "-c", code]

    with pytest.raises(UserError, match=r"shard 1 \(exit status 1\) of 3 failed"):
        preprocess_splits(raw, tmp_path / "out", params, command)
    assert not (tmp_path / "out").exists()
    done = sorted(p.name for p in (tmp_path / "data/.shards/preprocess").iterdir())
    assert done == ["shard-0-of-3", "shard-2-of-3"]
    runs.clear()
    runs.append(1)  # shard 1 now succeeds
    preprocess_splits(raw, tmp_path / "out", params, command)
    assert runs == [1, 1]  # only shard 1 ran again
    assert not (tmp_path / "data/.shards").exists()

    with pytest.raises(UserError):
        preprocess_splits(raw, tmp_path / "out2", params, lambda i, k, w: ["false"])
    changed = PreprocessParams(image_size=24, row_group_size=8, workers=2, shards=3)
    runs.clear()
    runs.append(1)
    preprocess_splits(raw, tmp_path / "out2", changed, command)  # new key: no stale pieces
    assert sorted(runs[1:]) == [0, 1, 2]


@pytest.mark.parametrize("rows, cut", [(50, [0, 7, 16, 33, 50]), (16, [0, 16]), (5, [0, 2, 5])])
def test_streamed_gallery_is_the_written_gallery(tmp_path, monkeypatch, rows, cut) -> None:
    """write_gallery_rows from pieces = write_gallery of the whole table, byte for byte, across
    row-group boundaries (16 rows here instead of 65,536)."""
    from siamese_cv.retrieval import gallery

    monkeypatch.setattr(gallery, "GALLERY_ROW_GROUP", 16)
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(rows, 8)).astype(np.float32)
    ids = [f"i{n}" for n in range(rows)]
    table = gallery.gallery_table(ids, ["train"] * rows, np.arange(rows) % 3, ["c"] * rows, vectors)
    meta = {"model_fingerprint": "f", "precision": "fp32"}
    gallery.write_gallery(tmp_path / "whole", table, {**meta, "count": rows, "dim": 8})
    pieces = tmp_path / "pieces.parquet"
    pq.write_table(table, pieces)  # as a shard writes its piece: read back from parquet
    read_back = pq.read_table(pieces)
    parts = (read_back.slice(a, b - a) for a, b in zip(cut, cut[1:], strict=False))
    assert gallery.write_gallery_rows(tmp_path / "streamed", parts, meta) == (rows, 8)
    for name in ("embeddings.parquet", "meta.json"):
        assert (tmp_path / "whole" / name).read_bytes() == (
            tmp_path / "streamed" / name
        ).read_bytes()
    assert pq.ParquetFile(tmp_path / "streamed/embeddings.parquet").metadata.num_row_groups == (
        -(-rows // 16)
    )
