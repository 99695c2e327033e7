"""Shards of a stage: contiguous row ranges, processed by child processes, kept until merged.

A sharded stage (`preprocess.shards`, `export.shards` > 1) runs one child process per shard,
`python stages/<stage>.py --shard I --key K`, several at a time. Each child writes its piece
atomically into `data/.shards/<stage>/shard-I-of-N/` with a `done.json` naming the key of the
inputs it was made from. The stage then merges the pieces, in shard order, into the same files a
single-shard run writes, and deletes them.

A killed or failed child leaves no piece, while the other children finish theirs: the stage fails
naming the shards to redo, and the next run (`dvc repro` reruns a failed stage) finds the finished
pieces under the same key and runs only the missing ones. A changed input, parameter, library or
the stage's own code changes the key, so stale pieces are never merged.

Why one stage rather than DVC `foreach`/`matrix` stages: `dvc repro` runs stages one at a time
(parallel `dvc repro` processes in one workspace contend for its lock), and `foreach` needs a list
in params.yaml rather than a count; one stage keeps the shards parallel and the stage names and
outputs downstream stages read unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from siamese_cv.core.atomic import atomic_path, read_json, write_json
from siamese_cv.core.errors import UserError

SHARDS_ROOT = Path("data/.shards")
DONE = "done.json"


def shard_range(rows: int, index: int, count: int, align: int = 1) -> tuple[int, int]:
    """Rows `[start, stop)` of shard `index` of `count`: contiguous, in order, covering `rows`.

    Boundaries fall on multiples of `align` (export aligns them to its batch size, so every
    batch holds the same images as in a single-shard run); trailing shards may be empty.
    """
    if not 0 <= index < count:
        raise UserError(
            f"--shard {index} is not in 0..{count - 1}: there are {count} shards; "
            "--shard is set by the stage itself, run the stage without it"
        )
    blocks = -(-rows // align)  # ceil
    start = min(rows, (index * blocks // count) * align)
    stop = min(rows, ((index + 1) * blocks // count) * align)
    return start, stop


def fingerprint_files(paths: Sequence[Path], chunk: int = 1 << 20) -> dict[str, str]:
    """sha256 of each file's content, by name: the inputs a piece was made from."""
    out = {}
    for path in paths:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            while block := handle.read(chunk):
                digest.update(block)
        out[str(path)] = digest.hexdigest()
    return out


def make_key(parts: Mapping[str, Any]) -> str:
    """A short hex key of JSON-able `parts` (inputs, parameters, code, library versions)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def code_digest(*modules: Any) -> str:
    """sha256 of the source files of `modules`: a code change invalidates finished pieces."""
    digest = hashlib.sha256()
    for module in modules:
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class ShardStore:
    """The pieces of one stage: `<root>/shard-I-of-N/` folders, each complete once it exists."""

    root: Path
    count: int

    def piece(self, index: int) -> Path:
        return self.root / f"shard-{index}-of-{self.count}"

    def done(self, index: int, key: str) -> bool:
        """Whether shard `index` finished under `key` (its folder is renamed in complete)."""
        path = self.piece(index) / DONE
        try:
            return read_json(path).get("key") == key
        except (OSError, ValueError, AttributeError):
            return False

    def manifest(self, index: int) -> dict[str, Any]:
        return read_json(self.piece(index) / DONE)

    @contextmanager
    def write(self, index: int, key: str, manifest: dict[str, Any]) -> Iterator[Path]:
        """Yield a temporary folder for shard `index`; on success add done.json and rename it.

        `manifest` may be filled in by the block: it is written after the block ends.
        """
        with atomic_path(self.piece(index)) as tmp:
            tmp.mkdir()
            yield tmp
            write_json(tmp / DONE, {**manifest, "key": key, "shard": index, "count": self.count})

    def prune(self, key: str) -> None:
        """Delete every piece not made under `key` or for another shard count."""
        if not self.root.is_dir():
            return
        keep = {self.piece(i).name for i in range(self.count) if self.done(i, key)}
        for path in self.root.iterdir():
            if path.name not in keep and not path.name.startswith(".tmp-"):
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink()

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        if self.root.parent.is_dir() and not any(self.root.parent.iterdir()):
            self.root.parent.rmdir()


def _die_with_parent() -> None:
    """preexec_fn of a shard process: SIGKILL it when the stage process dies (Linux)."""
    if sys.platform == "linux":
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


def run_shards(
    command: Callable[[int], list[str]],
    todo: Sequence[int],
    parallel: int,
    env: Callable[[int, int], Mapping[str, str]] | None = None,
    poll: float = 0.05,
) -> dict[int, int]:
    """Run `command(i)` for each shard in `todo`, at most `parallel` at a time; keep going on failure.

    Args:
        command: argv of shard i's process.
        todo: shard indices, started in this order.
        parallel: how many run at once.
        env: extra environment of shard i given its slot (0..parallel-1), e.g. the GPU it uses.

    Returns:
        The shards that failed, with their exit status (negative: the signal that killed them).
    """
    waiting, running, failed = list(todo), {}, {}
    free = list(range(max(1, parallel)))
    try:
        while waiting or running:
            while waiting and free:
                index, slot = waiting.pop(0), free.pop(0)
                extra = dict(env(index, slot)) if env else {}
                process = subprocess.Popen(
                    command(index), env={**os.environ, **extra}, preexec_fn=_die_with_parent
                )
                running[index] = (process, slot)
            for index, (process, slot) in list(running.items()):
                code = process.poll()
                if code is None:
                    continue
                del running[index]
                free.append(slot)
                if code != 0:
                    failed[index] = code
            time.sleep(poll)
    finally:
        for process, _ in running.values():  # only on an exception here (e.g. Ctrl-C)
            process.kill()
            process.wait()
    return failed
