"""One error type for mistakes a user can fix, and the stage wrapper that prints it as one line.

Everything else (a bug) keeps its traceback; a `UserError` never does, because its message
already says what went wrong and what to do next.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence


class UserError(Exception):
    """Bad input, bad parameters or a missing resource: the message names it and the fix."""


class ParamsError(UserError):
    """A key in params.yaml is unknown, mistyped or out of range."""


def run_cli(
    main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None
) -> int:
    """Run a stage or command `main`, turning a `UserError` into one line on stderr and status 2."""
    try:
        return int(main(argv) or 0)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
