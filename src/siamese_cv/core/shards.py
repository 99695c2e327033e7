"""Shards of a stage: contiguous row ranges, run by workers that torch's elastic launcher starts,
kept as resumable pieces until merged. This module owns the whole mechanism for every stage.

A sharded stage (`preprocess.shards`, `export.shards` > 1) runs an elastic agent in its own
process (`torch.distributed.launcher.api.elastic_launch`, what `torchrun` runs) whose workers are
the stage's own script, `python stages/<stage>.py --shard-key K --workers W`. By default the agent
is alone (a c10d rendezvous on a free localhost port) and starts its workers on this machine;
with `--nnodes N --rdzv-endpoint HOST:PORT` the agents of N machines meet there and all their
workers share the shards. Workers take shard numbers from a counter in the launcher's store until
none is left, skip the finished ones, and write each piece atomically into
`data/.shards/<stage>/shard-I-of-N/` with a `done.json` naming the key of its inputs. Node 0's
stage then merges the pieces, in shard order, into the same files a single-shard run writes.

A killed or failed worker leaves no piece for the shard it was on; the launcher stops the other
workers and the stage fails naming that shard. Every finished piece is kept, and the next run
(`dvc repro` reruns a failed stage) finds them under the same key and runs only the missing ones.
A changed input, parameter, library or the stage's own code changes the key, so stale pieces are
never merged, and machines whose inputs differ refuse to share a run.

Why one stage rather than DVC `foreach`/`matrix` stages: `dvc repro` runs stages one at a time
(parallel `dvc repro` processes in one workspace contend for its lock), and `foreach` needs a list
in params.yaml rather than a count; one stage keeps the shards parallel and the stage names and
outputs downstream stages read unchanged.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from siamese_cv.core.atomic import atomic_path, read_json, write_json
from siamese_cv.core.errors import UserError
from siamese_cv.core.launcher import launch_config, quiet_launcher

log = logging.getLogger(__name__)

SHARDS_ROOT = Path("data/.shards")
DONE = "done.json"
ENV_PREFIX = "SIAMESE_CV_"  # SIAMESE_CV_NNODES etc.: the launch options, for `dvc repro`


def shard_range(rows: int, index: int, count: int, align: int = 1) -> tuple[int, int]:
    """Rows `[start, stop)` of shard `index` of `count`: contiguous, in order, covering `rows`.

    Boundaries fall on multiples of `align` (export aligns them to its batch size, so every
    batch holds the same images as in a single-shard run); trailing shards may be empty.
    """
    if not 0 <= index < count:
        raise ValueError(f"shard {index} is not in 0..{count - 1}")
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

    def finished(self, key: str) -> list[int]:
        return [i for i in range(self.count) if self.done(i, key)]

    def manifest(self, index: int) -> dict[str, Any]:
        return read_json(self.piece(index) / DONE)

    @contextmanager
    def write(self, index: int, key: str, manifest: dict[str, Any]) -> Iterator[Path]:
        """Yield a temporary folder for shard `index`; on success add done.json and rename it.

        `manifest` may be filled in by the block: it is written after the block ends. The
        temporary folder's name holds the writer's pid (`.tmp-shard-I-of-N-<pid>-...`), which is
        how the stage names the shard a killed worker was on.
        """
        with atomic_path(self.piece(index)) as tmp:
            tmp.mkdir()
            yield tmp
            write_json(tmp / DONE, {**manifest, "key": key, "shard": index, "count": self.count})

    def writing(self, pid: int) -> int | None:
        """The shard that process `pid` was writing when it stopped, if its folder is left."""
        pattern = re.compile(rf"\.tmp-shard-(\d+)-of-{self.count}-{pid}-")
        for path in self.root.glob(".tmp-shard-*") if self.root.is_dir() else ():
            if match := pattern.match(path.name):
                return int(match.group(1))
        return None

    def prune(self, key: str) -> None:
        """Delete every piece not made under `key` or for another shard count."""
        if not self.root.is_dir():
            return
        keep = {self.piece(i).name for i in self.finished(key)}
        for path in self.root.iterdir():
            if path.name not in keep and not path.name.startswith(".tmp-"):
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink()

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        if self.root.parent.is_dir() and not any(self.root.parent.iterdir()):
            self.root.parent.rmdir()


# ---- how this machine takes part: the launcher's options ----------------------------------


@dataclass(frozen=True)
class Nodes:
    """How this machine takes part in a sharded stage: torchrun's options, under the same names.

    `node_rank` 0 is the machine that merges the pieces and writes the stage's outputs (where
    `dvc repro` runs); the others only run shards.
    """

    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str | None = None
    nproc_per_node: int | None = None
    max_restarts: int = 0

    def __post_init__(self) -> None:
        if self.nnodes < 1:
            raise UserError(f"--nnodes {self.nnodes}: give 1 or more machines")
        if not 0 <= self.node_rank < self.nnodes:
            raise UserError(
                f"--node-rank {self.node_rank} is not in 0..{self.nnodes - 1}: number the "
                f"{self.nnodes} machines from 0; node 0 merges the pieces"
            )
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise UserError(
                f"--nnodes {self.nnodes} needs --rdzv-endpoint HOST:PORT, an address of node 0 "
                "that every machine reaches (docs/scaling.md)"
            )
        if self.nproc_per_node is not None and self.nproc_per_node < 1:
            raise UserError(f"--nproc-per-node {self.nproc_per_node}: give 1 or more workers")
        if self.max_restarts < 0:
            raise UserError(f"--max-restarts {self.max_restarts}: give 0 or more")

    @property
    def merges(self) -> bool:
        return self.node_rank == 0

    def require_shards(self, section: str, count: int) -> None:
        """Several machines can only share a stage that is cut into several shards."""
        if self.nnodes > 1 and count < 2:
            raise UserError(
                f"--nnodes {self.nnodes} shares a stage's shards between machines, but "
                f"{section}.shards is {count}: set it to a few per worker "
                f"(`siamese-params apply --set {section}.shards=16`)"
            )


def add_launch_arguments(parser: argparse.ArgumentParser) -> None:
    """A sharded stage's options: where its shards run (defaults from SIAMESE_CV_<NAME>)."""
    group = parser.add_argument_group(
        "shards", "with preprocess.shards / export.shards > 1 (see docs/scaling.md)"
    )
    options = [
        ("--nnodes", int, 1, "machines that share the shards (default 1: this one)"),
        ("--node-rank", int, 0, "this machine's number, 0..nnodes-1; node 0 writes the outputs"),
        ("--rdzv-endpoint", str, None, "HOST:PORT on node 0 where the machines meet (c10d)"),
        ("--nproc-per-node", int, None, "shard workers here (default: one per core or GPU)"),
        ("--max-restarts", int, 0, "restart failed workers this often; they resume (default 0)"),
    ]
    for flag, kind, default, text in options:
        env = ENV_PREFIX + flag[2:].replace("-", "_").upper()
        value = os.environ.get(env)
        group.add_argument(
            flag, type=kind, default=kind(value) if value else default, help=f"{text}; env {env}"
        )
    group.add_argument("--shard-key", help=argparse.SUPPRESS)  # the stage's own workers
    group.add_argument("--workers", type=int, default=1, help=argparse.SUPPRESS)


def nodes_from_args(args: argparse.Namespace) -> Nodes:
    return Nodes(
        args.nnodes, args.node_rank, args.rdzv_endpoint, args.nproc_per_node, args.max_restarts
    )


# ---- the stage's side: launch the workers, report, decide who merges ----------------------


def run_shards(
    stage: str,
    store: ShardStore,
    key: str,
    worker: Callable[[int], list[str]],
    nodes: Nodes,
    cores: int,
    gpus: int = 0,
) -> bool:
    """Run the shards of `store` not yet finished under `key`, here and on the other nodes.

    Args:
        worker: the argv after `python` of a worker that gets `n` cores (processes or threads).
            It is started with `--shard-key <key>` appended.
        cores: what this machine's workers share; each gets `cores // workers`.
        gpus: GPUs here; with some, one worker per GPU, each seeing only its own as `cuda:0`.

    Returns:
        True when every piece is here and this machine merges them (node 0); False on the
        other nodes, whose part is done.

    Raises:
        UserError: a worker failed (naming its shard), the machines did not meet, or pieces
            made on another machine are not here to merge.
    """
    count = store.count
    if nodes.merges:
        store.prune(key)
    done = store.finished(key)
    todo = [i for i in range(count) if i not in done]
    if not todo and nodes.nnodes == 1:
        log.info(f"{stage}: {count} shards; all already done, kept")
        return True
    slots = nodes.nproc_per_node or max(1, min(len(todo) or 1, gpus or cores))
    share = 1 if gpus else max(1, cores // slots)
    where = f"{slots} workers" if slots > 1 else "1 worker"
    if nodes.nnodes > 1:
        where += f" on node {nodes.node_rank} of {nodes.nnodes}"
    log.info(
        f"{stage}: {count} shards"
        + (f"; {_names(done)} already done, kept" if done else "")
        + (f"; running {_names(todo)} ({where})" if todo else f" ({where})")
    )
    argv = [*worker(share), "--shard-key", key]
    _launch(stage, store, key, argv, slots, nodes, gpus > 0)
    if not nodes.merges:
        log.info(f"{stage}: this machine's shards are done; node 0 merges the pieces")
        return False
    missing = [i for i in range(count) if not store.done(i, key)]
    if missing:
        raise UserError(
            f"{stage}: {_names(missing)} of {count} are not in {store.root}: they ran on another "
            "machine; share data/.shards between the machines (or copy the other machines' "
            "pieces here) and run the stage again"
        )
    return True


def _launch(
    stage: str, store: ShardStore, key: str, argv: list[str], slots: int, nodes: Nodes, gpus: bool
) -> None:
    """Start this machine's elastic agent with `slots` workers; return once they all finished."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous import RendezvousError
    from torch.distributed.launcher.api import elastic_launch

    with tempfile.TemporaryDirectory(prefix=f"siamese-cv-{stage}-") as folder:
        config = launch_config(
            slots,
            folder,
            nnodes=nodes.nnodes,
            endpoint=nodes.rdzv_endpoint,
            # one id for the machines to meet under; the workers then check that their keys agree
            run_id=f"siamese-cv-{stage}",
            max_restarts=nodes.max_restarts,
            virtual_local_rank=gpus,  # each GPU worker sees its own GPU only, as cuda:0
        )
        try:
            with quiet_launcher():
                elastic_launch(config, sys.executable)(*argv)
        except ChildFailedError as error:
            raise UserError(_failure_line(stage, store, key, error)) from None
        except SignalException as error:
            raise UserError(
                f"{stage}: stopped by {error.sigval.name}; the finished shards are kept for the "
                "next run"
            ) from None
        except RendezvousError as error:
            raise UserError(
                f"{stage}: the {nodes.nnodes} machines did not meet at {nodes.rdzv_endpoint} "
                f"({type(error).__name__}): start the stage on each of them with the same "
                "--nnodes and --rdzv-endpoint, node 0's address"
            ) from None


def _failure_line(stage: str, store: ShardStore, key: str, error: Any) -> str:
    """'<stage>: shard I (killed by SIGKILL) of N failed; ...' for the first worker that failed."""
    _, failure = error.get_first_failure()
    shard = store.writing(failure.pid)
    why = describe_exit(failure.exitcode)
    who = f"shard {shard} ({why})" if shard is not None else f"a shard worker ({why}, see above)"
    done = store.finished(key)
    kept = f"{_names(done)} are done and kept, and " if done else ""
    return f"{stage}: {who} of {store.count} failed; {kept}`dvc repro` runs only the missing ones"


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


def _names(shards: list[int]) -> str:
    return ("shard " if len(shards) == 1 else "shards ") + ", ".join(map(str, shards))


# ---- the worker's side ---------------------------------------------------------------------


def work_shards(stage: str, store: ShardStore, key: str, run: Callable[[int], str]) -> list[int]:
    """Be one worker: take shard numbers until none is left, run each one not finished yet.

    Started by `run_shards`, a worker takes its numbers from a counter in the launcher's store,
    shared by every worker on every machine; started by hand (no launcher), it runs them all.

    Args:
        run: writes shard i's piece (through `store.write`); returns its summary for the log.

    Returns:
        The shards this worker ran.

    Raises:
        UserError: this machine's inputs differ from the other machines' (another key).
    """
    _die_with_launcher()
    ran = []
    for index in _claims(key, store.count):
        if store.done(index, key):
            continue
        log.info(f"{stage}: shard {index} of {store.count}: {run(index)}")
        ran.append(index)
    return ran


def _claims(key: str, count: int) -> Iterator[int]:
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        yield from range(count)
        return
    import torch.distributed as dist

    store, rank, _ = next(dist.rendezvous("env://"))
    store = dist.PrefixStore("siamese-cv-shards/", store)
    if rank == 0:
        store.set("key", key)
    theirs = store.get("key").decode()
    if theirs != key:
        raise UserError(
            f"this machine's inputs differ from rank 0's (shard key {key} against {theirs}): "
            "give every machine the same data, params.yaml and code (a shared folder, or the "
            "same commit and `dvc pull`)"
        )
    while (index := store.add("next", 1) - 1) < count:
        yield index


def _die_with_launcher() -> None:
    """A worker must not outlive its stage: an orphan would keep `dvc repro`'s stdout open."""
    if sys.platform != "linux" or "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    import ctypes

    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the stage died before the signal was armed
        os._exit(1)
