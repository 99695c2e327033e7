"""torch's elastic launcher, configured once for every stage that starts processes.

`train` (DDP ranks) and the sharded stages (shard workers, `siamese_cv.core.shards`) start their
processes through `torch.distributed.launcher.api.elastic_launch`, the engine behind `torchrun`:
alone on this machine by default (a c10d rendezvous on a free localhost port), or as one of
`nnodes` machines meeting at a rendezvous endpoint.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Iterator
from typing import Any

from siamese_cv.core import logs

# torchelastic-events-*: its event records, which hold every failure's traceback too
_LAUNCHER_LOGS = (
    "torch.distributed.elastic",
    "torch.distributed.launcher",
    "torch.multiprocessing",
    "torchelastic",
)


def launch_config(
    processes: int,
    log_dir: str,
    *,
    nnodes: int = 1,
    endpoint: str | None = None,
    run_id: str | None = None,
    max_restarts: int = 0,
    **options: Any,
) -> Any:
    """A `LaunchConfig` for `processes` workers on this machine, of `nnodes` machines.

    Args:
        log_dir: where the launcher keeps its per-run files (error files).
        endpoint: HOST:PORT of the c10d rendezvous; alone (`nnodes` 1), a free localhost port.
        run_id: the id under which the machines meet; alone, a fresh one.
        options: more `LaunchConfig` fields (`start_method`, `virtual_local_rank`, ...).
    """
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.launcher.api import LaunchConfig

    alone = nnodes == 1
    return LaunchConfig(
        min_nodes=nnodes,
        max_nodes=nnodes,
        nproc_per_node=processes,
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0" if alone or not endpoint else endpoint,
        run_id=f"siamese-cv-{uuid.uuid4().hex}" if alone or not run_id else run_id,
        max_restarts=max_restarts,
        logs_specs=DefaultLogsSpecs(log_dir=log_dir),
        **options,
    )


@contextlib.contextmanager
def quiet_launcher() -> Iterator[None]:
    """Silence the launcher's own log lines (it dumps every failure): ours is the one line."""
    names = [n for n in logging.Logger.manager.loggerDict if n.startswith(_LAUNCHER_LOGS)]
    with logs.quiet_loggers([*_LAUNCHER_LOGS, *names], logging.CRITICAL):
        yield
