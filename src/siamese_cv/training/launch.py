"""How the train stage becomes several processes: its own launcher on one node, torchrun's on many.

`train.devices x train.nodes == 1` trains in this process as always. With more on one node the
stage relaunches itself through `elastic_launch` (what `torchrun --standalone` runs), one process
per device, and reports a failed rank as one line. With several nodes nothing can start the other
machines for us, so each node runs torchrun; a process that torchrun started (LOCAL_RANK and
WORLD_SIZE set) is one rank and never relaunches.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

from siamese_cv.config.params import Params
from siamese_cv.core import logs
from siamese_cv.core.errors import UserError
from siamese_cv.core.launcher import launch_config, quiet_launcher
from siamese_cv.training.distributed import World, barrier, launched, process_group, rank_device
from siamese_cv.training.run import train_and_save

log = logging.getLogger(__name__)


class RankUserError(Exception):
    """A `UserError` inside a launched rank, carried to the launcher by its class name."""


def train(params: Params) -> dict[str, Any] | None:
    """Train in as many processes as `train.devices x train.nodes` asks.

    Returns:
        Rank 0's config (see `train_and_save`); None in the other ranks of a torchrun launch.

    Raises:
        UserError: several nodes without torchrun, missing GPUs, or a rank failed.
    """
    tp = params.train
    if launched():
        return train_rank(params)
    if tp.devices * tp.nodes == 1:
        return train_and_save(params)
    if tp.nodes > 1:
        raise UserError(
            f"train.nodes: {tp.nodes} machines must each start their processes: on node R (0 to "
            f"{tp.nodes - 1}) run `torchrun --nnodes {tp.nodes} --nproc-per-node {tp.devices} "
            "--node-rank R --master-addr <node 0's address> --master-port 29500 stages/train.py`, "
            "then `dvc commit train` on node 0 (docs/distributed.md)"
        )
    last = tp.devices - 1  # fail here, before starting anything, if its GPU does not exist
    rank_device(tp.device, World(last, last, tp.devices, tp.devices))
    return launch(_launched_rank, (params,), tp.devices)[0]


def train_rank(params: Params) -> dict[str, Any] | None:
    """Be one rank of a run that torchrun (or `launch`) started: join the group, train, leave.

    Raises:
        UserError: torchrun started a different number of processes than the params say.
    """
    world, tp = World.from_env(), params.train
    if not world.main:
        logs.only_warnings()  # rank 0 reports progress and summary lines for all
    if world.size != tp.devices * tp.nodes or world.local_size != tp.devices:
        raise UserError(
            f"torchrun started {world.size} processes ({world.local_size} on this node) but "
            f"params.yaml says train.devices: {tp.devices} x train.nodes: {tp.nodes}; make them "
            "agree, the checkpoint records the params"
        )
    device = rank_device(tp.device, world)
    if not world.distributed:
        return train_and_save(params, world, device)
    with process_group(world, device):
        config = train_and_save(params, world, device)
        barrier(world)  # the others wait while rank 0 writes the checkpoint
    return config if world.main else None


def _launched_rank(params: Params) -> dict[str, Any] | None:
    logs.configure()  # a spawned process starts unconfigured; the stage's verbosity is inherited
    try:
        return train_rank(params)
    except UserError as error:
        raise RankUserError(str(error)) from None


def launch(entrypoint: Callable[..., Any], args: Sequence[Any], processes: int) -> dict[int, Any]:
    """Run `entrypoint(*args)` in `processes` local ranks; their return values by rank.

    `entrypoint` must be importable by name (spawned processes import it). Raising
    `RankUserError` in a rank ends the run with that message alone.

    Raises:
        UserError: one line naming the first rank that failed and why (a bug's traceback from
            that rank is printed above it).
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch

    with tempfile.TemporaryDirectory(prefix="siamese-cv-ranks-") as folder:
        config = launch_config(processes, folder, start_method="spawn")
        try:
            with quiet_launcher():
                return elastic_launch(config, entrypoint)(*args)
        except ChildFailedError as error:
            raise UserError(_failure_line(error, processes)) from None
        except SignalException as error:
            raise UserError(
                f"stopped by {error.sigval.name}; all {processes} processes were ended"
            ) from None


def _failure_line(error: Any, processes: int) -> str:
    """'rank R of N: <why>' for the first rank that failed; prints a bug's traceback first."""
    rank, failure = error.get_first_failure()
    message = failure.message
    stack = None
    if isinstance(message, dict):
        stack = message.get("extraInfo", {}).get("py_callstack")
        message = message.get("message", "")
    prefix = f"{RankUserError.__name__}: "
    if message.startswith(prefix):
        return f"rank {rank} of {processes}: {message[len(prefix) :]}"
    if stack:
        log.error("rank %s: %s", rank, stack.rstrip())
        return f"rank {rank} of {processes} failed with {message}; its traceback is above"
    return f"rank {rank} of {processes} failed (exit code {failure.exitcode}): {message}"
