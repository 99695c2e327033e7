"""The per-user cache directory: what is costly to make and depends only on this machine.

`$SIAMESE_CV_CACHE` names it; otherwise `$XDG_CACHE_HOME/siamese-cv` or `~/.cache/siamese-cv`.
Everything in it can be deleted at any time: it is made again when next needed.
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "SIAMESE_CV_CACHE"


def cache_root() -> Path | None:
    """The cache directory; None when no directory can be named (then nothing is cached)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME")
    if not base:
        try:
            base = str(Path.home() / ".cache")
        except RuntimeError:  # no $HOME and no passwd entry for this user (some containers)
            return None
    return Path(base) / "siamese-cv"
