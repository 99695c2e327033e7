"""What every stage script shares: its command line (`--params`, `--verbose/--quiet`), its logging
(configured here, once: `siamese_cv.core.logs`) and a one-line error exit.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from siamese_cv.config.params import PARAMS_FILE, Params, load_params
from siamese_cv.core import logs
from siamese_cv.core.errors import run_cli
from siamese_cv.core.shards import add_launch_arguments

log = logging.getLogger(__name__)


def stage_params(argv: Sequence[str] | None, description: str) -> Params:
    """Parse a stage's arguments and return its validated parameters."""
    return stage_args(argv, description)[0]


def stage_args(
    argv: Sequence[str] | None, description: str, sharded: bool = False
) -> tuple[Params, argparse.Namespace]:
    """Parse a stage's arguments; a `sharded` stage also takes the launcher's options.

    `--nnodes`, `--rdzv-endpoint`, ... say where its shards run; `--shard-key K --workers W` is
    how the stage starts its own shard workers (see `siamese_cv.core.shards`).
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--params", default=PARAMS_FILE, help="parameters file (default: params.yaml)"
    )
    loudness = parser.add_mutually_exclusive_group()
    loudness.add_argument(
        "-v", "--verbose", action="store_true", help="also log debugging detail, with times"
    )
    loudness.add_argument(
        "-q", "--quiet", action="store_true", help="only warnings and errors; no progress bars"
    )
    if sharded:
        add_launch_arguments(parser)
    args = parser.parse_args(argv)
    logs.configure("verbose" if args.verbose else "quiet" if args.quiet else None)
    shard = sharded and args.shard_key is not None
    # A shard worker's stage has checked the cross-section rules already.
    return load_params(args.params, check=not shard), args


def run_stage(main: Callable[[Sequence[str] | None], int | None]) -> None:
    """Entry point of `stages/<name>.py`: exit with main's status, errors as one line."""
    started = time.perf_counter()
    name = Path(sys.argv[0]).stem
    try:
        status = run_cli(main)
    except FileNotFoundError as missing:  # an earlier stage's output: run alone, out of order
        print(
            f"error: {missing.filename or missing}: missing; run the stage that writes it "
            f"(`dvc repro {name}` runs every stage before this one)",
            file=sys.stderr,
        )
        status = 2
    if status == 0:
        if "--shard-key" in sys.argv:
            name += f" worker {os.environ.get('RANK', 0)}"
        log.info("%s: done in %.1f s", name, time.perf_counter() - started)
    sys.exit(status)
