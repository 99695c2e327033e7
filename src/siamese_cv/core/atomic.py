"""Atomic outputs: write under a temporary name, rename when complete.

A stage killed at any moment then leaves either the previous complete file or nothing that DVC
(or the next stage) could mistake for a finished output.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `target`; rename it onto `target` only if the block succeeds.

    Works for files and directories. The temporary name starts with '.tmp-' so a leftover from a
    kill is obviously not an output, and it is removed by the next successful write.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".tmp-{target.name}-"
    tmp = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=target.parent))
    tmp_target = tmp / target.name
    try:
        yield tmp_target
        if target.is_dir() and not target.is_symlink():
            os.replace(target, tmp / ".old")  # inside tmp: a kill here leaves only '.tmp-' names
            os.replace(tmp_target, target)
        else:
            os.replace(tmp_target, target)
        _fsync_dir(target.parent)
        _remove_leftovers(target.parent, prefix)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _remove_leftovers(folder: Path, prefix: str) -> None:
    """Delete `<prefix><pid>-<random>` folders whose writing process is gone (killed earlier)."""
    for path in folder.glob(glob.escape(prefix) + "*"):
        match = re.fullmatch(r"(\d+)-[a-z0-9_]{8}", path.name[len(prefix) :])
        if match and path.is_dir() and not _alive(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, someone else's
        return True
    return True


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_json(path: str | Path, data: Any) -> None:
    """Write `data` as indented, key-sorted JSON atomically (stable bytes for DVC and git)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def reset_dir(path: str | Path) -> Path:
    """Empty (or create) a directory that a stage owns entirely."""
    path = Path(path)
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path
