"""What every stage script shares: its command line (`--params`) and a one-line error exit."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from siamese_cv.errors import run_cli
from siamese_cv.params import PARAMS_FILE, Params, load_params


def stage_params(argv: Sequence[str] | None, description: str) -> Params:
    """Parse a stage's arguments and return its validated parameters."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--params", default=PARAMS_FILE, help="parameters file (default: params.yaml)"
    )
    args = parser.parse_args(argv)
    return load_params(args.params)


def run_stage(main: Callable[[Sequence[str] | None], int | None]) -> None:
    """Entry point of `stages/<name>.py`: exit with main's status, errors as one line."""
    started = time.perf_counter()
    status = run_cli(main)
    if status == 0:
        print(f"{Path(sys.argv[0]).stem}: done in {time.perf_counter() - started:.1f} s")
    sys.exit(status)
