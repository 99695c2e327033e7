import os
import subprocess
import sys

import pytest

from siamese_cv.core.atomic import atomic_path, write_json


def test_atomic_file_appears_only_when_complete(tmp_path):
    target = tmp_path / "out.json"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    write_json(target, {"b": 1, "a": 2})
    assert target.read_text() == '{\n  "a": 2,\n  "b": 1\n}\n'


def test_atomic_directory_replaces_the_old_one(tmp_path):
    target = tmp_path / "dir"
    target.mkdir()
    (target / "old").write_text("x")
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "new").write_text("y")
    assert [p.name for p in target.iterdir()] == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir"]


def test_a_killed_writers_leftover_goes_with_the_next_write(tmp_path):
    exited = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    dead = int(exited.stdout)
    stale = tmp_path / f".tmp-out.json-{dead}-abcd1234"  # what a SIGKILL mid-write leaves
    mine = tmp_path / f".tmp-out.json-{os.getpid()}-abcd1234"  # this process may still be writing
    other = tmp_path / f".tmp-other.json-{dead}-abcd1234"  # another target's: not ours to judge
    for folder in (stale, mine, other):
        folder.mkdir()
        (folder / "half").write_text("x")
    write_json(tmp_path / "out.json", {"a": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([mine.name, other.name, "out.json"])


def test_replacing_a_directory_never_shows_a_name_outside_tmp(tmp_path, monkeypatch):
    """Between the two renames the old directory sits inside the '.tmp-' folder, not beside it."""
    target = tmp_path / "dir"
    target.mkdir()
    seen = []
    real_replace = os.replace

    def replace(src, dst):
        real_replace(src, dst)
        seen.append(sorted(p.name for p in tmp_path.iterdir()))

    monkeypatch.setattr(os, "replace", replace)
    with atomic_path(target) as tmp:
        tmp.mkdir()
    assert len(seen) == 2 and len(seen[0]) == 1 and seen[0][0].startswith(".tmp-dir-")
    assert seen[1] == [seen[0][0], "dir"]  # the temp folder, old one inside, is removed after
