"""Logging and progress: summary lines that stay in the log, bars only on a terminal.

Every module logs through `logging.getLogger(__name__)`; a stage script configures it once
(`configure`, called by `config/stage.py`). INFO lines go to stdout, so `dvc repro > log` keeps
them, warnings and errors to stderr. Progress bars (`progress`) are drawn on stderr when it is a
terminal and output is not quiet, cleared when done, and log lines are written around them so a
bar never splits a line: with no terminal (CI, a redirected stderr) only the summary lines remain.

The chosen verbosity is also put in the environment, so the processes a stage starts (shards,
ranks) log as it does.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterable, Iterator
from typing import Any

from tqdm import tqdm

NAMESPACES = ("siamese_cv", "__main__")  # the package, and the stage script being run
VERBOSITY_ENV = "SIAMESE_CV_LOG"
LEVELS = {"quiet": logging.WARNING, "info": logging.INFO, "verbose": logging.DEBUG}
BAR_DELAY_S = 1.0  # work that ends sooner never draws a bar

_bars = True  # False when quiet, or in a process whose progress another one reports


class _LineHandler(logging.Handler):
    """Writes records below WARNING to stdout, the rest to stderr, clearing any bar first."""

    def __init__(self, errors: bool):
        super().__init__(logging.WARNING if errors else logging.NOTSET)
        self.errors = errors
        if not errors:
            self.addFilter(lambda record: record.levelno < logging.WARNING)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stderr if self.errors else sys.stdout  # looked up now: tests swap them
            tqdm.write(self.format(record), file=stream)
            stream.flush()
        except Exception:
            self.handleError(record)


class _Prefixed(logging.Formatter):
    """`warning: ...`, `error: ...`: the level in the words the error exit uses."""

    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {super().format(record)}"


def configure(verbosity: str | None = None) -> str:
    """Send our loggers' lines to stdout/stderr at `verbosity` (quiet, info or verbose).

    None takes the verbosity from the environment (a parent stage's), else `info`. Other
    libraries' loggers stay at WARNING. Calling it again replaces the previous configuration.

    Returns:
        The verbosity used.
    """
    global _bars
    verbosity = verbosity or os.environ.get(VERBOSITY_ENV) or "info"
    if verbosity not in LEVELS:
        raise ValueError(f"verbosity {verbosity!r} is not one of {', '.join(LEVELS)}")
    os.environ[VERBOSITY_ENV] = verbosity
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _LineHandler)]:
        root.removeHandler(handler)
    lines, problems = _LineHandler(errors=False), _LineHandler(errors=True)
    verbose = verbosity == "verbose"
    lines.setFormatter(
        logging.Formatter("%(asctime)s %(name)s: %(message)s" if verbose else "%(message)s")
    )
    problems.setFormatter(_Prefixed("%(asctime)s %(name)s: %(message)s" if verbose else None))
    root.addHandler(lines)
    root.addHandler(problems)
    root.setLevel(logging.WARNING)
    for name in NAMESPACES:
        logging.getLogger(name).setLevel(LEVELS[verbosity])
    _bars = verbosity != "quiet"
    return verbosity


def only_warnings() -> None:
    """In a process whose progress another reports (a rank other than 0): no INFO, no bars."""
    global _bars
    for name in NAMESPACES:
        logger = logging.getLogger(name)
        logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))
    _bars = False


def progress(
    iterable: Iterable[Any] | None = None,
    *,
    total: int | None = None,
    desc: str | None = None,
    unit: str = "it",
    enabled: bool = True,
) -> tqdm:
    """A tqdm bar on stderr, drawn only when stderr is a terminal (and `enabled`, not quiet).

    It appears after `BAR_DELAY_S` and is cleared when closed: the summary line that follows it
    is what stays.
    """
    return tqdm(
        iterable,
        total=total,
        desc=desc,
        unit=unit,
        file=sys.stderr,
        disable=None if enabled and _bars else True,  # None: off unless stderr is a terminal
        leave=False,
        delay=BAR_DELAY_S,
        dynamic_ncols=True,
    )


@contextlib.contextmanager
def quiet_loggers(names: Iterable[str], level: int) -> Iterator[None]:
    """Set each named logger to at least `level` inside the block, then restore its own level.

    Our one-line message is the report, not a library's own log lines.
    """
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(level)
    try:
        yield
    finally:
        for logger, previous in zip(loggers, levels, strict=True):
            logger.setLevel(previous)
