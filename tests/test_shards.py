"""Shards: row ranges, piece bookkeeping, and sharded preprocessing through torch's elastic
launcher: workers on this machine, two launcher agents on 127.0.0.1 as two "nodes", a killed
worker and the run that resumes it; every sharded output is byte for byte the single-shard one
(tests/test_robustness.py kills shards under the real `dvc repro`)."""

from __future__ import annotations

import io
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from siamese_cv.config.params import SPLITS, PreprocessParams
from siamese_cv.core.errors import UserError
from siamese_cv.core.shards import Nodes, ShardStore, describe_exit, shard_range
from siamese_cv.data.parquet import RAW_SCHEMA, iter_row_range, write_splits
from siamese_cv.data.preprocessing import preprocess_splits

STAGE = Path(__file__).resolve().parents[1] / "stages" / "preprocess.py"


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
    with pytest.raises(ValueError, match=rf"shard {count} is not in 0\.\.{count - 1}"):
        shard_range(rows, count, count, align)


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
        assert store.writing(os.getpid()) == 0  # how a killed worker's shard is named
    assert store.done(0, "k1") and not store.done(0, "k2") and not store.done(1, "k1")
    assert store.finished("k1") == [0] and store.writing(os.getpid()) is None
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


@pytest.mark.parametrize(
    "nodes, message",
    [
        (dict(nnodes=0), r"^--nnodes 0: give 1 or more"),
        (dict(nnodes=2, node_rank=2, rdzv_endpoint="h:1"), r"^--node-rank 2 is not in 0\.\.1"),
        (dict(nnodes=2), r"^--nnodes 2 needs --rdzv-endpoint HOST:PORT"),
        (dict(nproc_per_node=0), r"^--nproc-per-node 0: give 1 or more"),
    ],
)
def test_launch_options_are_checked_in_one_line(nodes, message) -> None:
    with pytest.raises(UserError, match=message):
        Nodes(**nodes)


def test_several_machines_need_several_shards(tmp_path) -> None:
    nodes = Nodes(nnodes=2, node_rank=1, rdzv_endpoint="127.0.0.1:1")
    assert not nodes.merges and Nodes().merges
    with pytest.raises(UserError, match=r"^--nnodes 2 shares .* preprocess\.shards is 1: set"):
        preprocess_splits(tmp_path, tmp_path / "out", PreprocessParams(), None, nodes)
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


def _project(tmp_path: Path, shards: int, per_split: int = 40) -> tuple[Path, PreprocessParams]:
    """A project folder with data/raw and a params.yaml the stage's workers read."""
    _raw(tmp_path / "data/raw", per_split)
    text = f"preprocess:\n  image_size: 16\n  row_group_size: 8\n  workers: 2\n  shards: {shards}\n"
    (tmp_path / "params.yaml").write_text(text)
    return tmp_path, PreprocessParams(image_size=16, row_group_size=8, workers=2, shards=shards)


def _single(project: Path) -> dict:
    """The single-shard run's files (bytes) and report, written beside the project."""
    one = PreprocessParams(image_size=16, row_group_size=8, workers=1)
    report = preprocess_splits(project / "data/raw", project / "one", one)
    report.pop("preprocess")
    return {"report": report, **_files(project / "one")}


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _stage_worker(workers: int) -> list[str]:
    """The argv after python of a shard worker: the stage script, as stages/preprocess.py has."""
    return [str(STAGE), "--params", "params.yaml", "--workers", str(workers)]


def test_sharded_preprocess_writes_the_single_shard_bytes(tmp_path, monkeypatch) -> None:
    """3 shards on 2 workers that torch's elastic launcher starts: the files, row groups and
    report of one shard."""
    project, params = _project(tmp_path, shards=3)
    monkeypatch.chdir(project)  # the pieces live under data/.shards, relative to the project
    single = _single(project)
    report = preprocess_splits(project / "data/raw", project / "many", params, _stage_worker)
    assert report.pop("preprocess")["shards"] == 3
    assert {"report": report, **_files(project / "many")} == single
    for split in SPLITS:  # 39 readable rows in groups of 8, whatever the shards
        assert pq.ParquetFile(project / "many" / f"{split}.parquet").metadata.num_row_groups == 5
    assert [f["id"] for f in report["skipped"]["files"]] == [f"{s}/005" for s in SPLITS]
    assert not (project / "data/.shards").exists()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_launcher_agents_as_two_nodes_write_the_single_shard_bytes(
    tmp_path, monkeypatch
) -> None:
    """Two `stages/preprocess.py --nnodes 2` processes meet in a c10d rendezvous on a free
    localhost port, their workers share the shards through it, and node 0 merges them into the
    bytes of one shard; node 1 writes no output."""
    project, _ = _project(tmp_path, shards=4)
    monkeypatch.chdir(project)
    endpoint = f"127.0.0.1:{_free_port()}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                str(STAGE),
                "--nnodes",
                "2",
                "--node-rank",
                str(rank),
                "--rdzv-endpoint",
                endpoint,
                "--nproc-per-node",
                "1",
            ],
            cwd=project,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for rank in (1, 0)
    ]
    try:
        outputs = [node.communicate(timeout=300) for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    for node, (out, err) in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, (out, err)
    (out1, _), (out0, _) = outputs
    assert "this machine's shards are done; node 0 merges the pieces" in out1
    # one world of two workers, one on each node, that ran every shard exactly once
    ranks = [
        int(r) for out in (out0, out1) for r in re.findall(r"preprocess worker (\d): done", out)
    ]
    assert sorted(ranks) == [0, 1], (out0, out1)
    ran = [
        int(i)
        for out in (out0, out1)
        for i in re.findall(r"^preprocess: shard (\d) of 4:", out, re.M)
    ]
    assert sorted(ran) == [0, 1, 2, 3], (out0, out1)
    single = _single(project)
    report = json.loads((project / "metrics/data_report.json").read_text())
    assert report.pop("preprocess")["shards"] == 4
    assert {"report": report, **_files(project / "data/processed")} == single
    assert not (project / "data/.shards").exists()


FLAKY_WORKER = """
import os, signal, sys
from pathlib import Path
from siamese_cv.config.params import PreprocessParams
from siamese_cv.data import preprocessing

real = preprocessing.preprocess_range
def flaky(raw, out, params, pool, index, count):
    with open("ran.txt", "a") as log:
        log.write(f"{index}\\n")
    if index == 1 and Path("kill-shard-1").exists():  # half-way through its piece
        Path("kill-shard-1").unlink()
        os.kill(os.getpid(), signal.SIGKILL)
    return real(raw, out, params, pool, index, count)
preprocessing.preprocess_range = flaky
params = PreprocessParams(image_size=16, row_group_size=8, shards=3)
preprocessing.preprocess_worker(Path("data/raw"), params, sys.argv[-1], 1)
"""


def test_a_killed_worker_leaves_no_output_and_the_rerun_resumes(tmp_path, monkeypatch) -> None:
    project, params = _project(tmp_path, shards=3, per_split=20)
    monkeypatch.chdir(project)
    (project / "kill-shard-1").touch()
    ran = project / "ran.txt"

    def worker(workers: int) -> list[str]:
        return ["-c", FLAKY_WORKER, "--workers", str(workers)]  # the key is appended

    out = project / "data/processed"
    with pytest.raises(UserError, match=r"^preprocess: shard 1 \(killed by SIGKILL\) of 3 failed"):
        preprocess_splits(project / "data/raw", out, params, worker)
    assert not out.exists()  # nothing DVC would take for a finished output
    pieces = project / "data/.shards/preprocess"
    store = ShardStore(pieces, 3)
    done = [i for i in range(3) if (store.piece(i) / "done.json").is_file()]
    assert 1 not in done
    assert all(p.name.startswith(".tmp-") or p.name in {f"shard-{i}-of-3" for i in done}
               for p in pieces.iterdir())  # fmt: skip
    ran.unlink()
    report = preprocess_splits(project / "data/raw", out, params, worker)
    assert sorted(map(int, ran.read_text().split())) == [i for i in range(3) if i not in done]
    report.pop("preprocess")
    assert {"report": report, **_files(out)} == _single(project)
    assert not (project / "data/.shards").exists()


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
