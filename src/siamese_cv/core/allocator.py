"""Keep freed memory in the process, so training steps reuse their activations' pages.

glibc's malloc hands blocks above its mmap threshold (at most 32 MiB) back to the operating
system on free, and trims the heap's top: every step of a CPU training run then faults in tens of
MiB of fresh zeroed pages for the same activations and gradients it freed a step earlier. With
mmap allocations off and trimming off, freed blocks stay in the heap and the next step reuses
them; the price is that the process keeps its peak memory until it exits.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
_M_MMAP_MAX = -4
_NEVER_TRIM = 2**62


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed memory; True when it did (False on other C libraries)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_long], ctypes.c_int
    kept = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM))
    log.debug("malloc keeps freed memory: %s", kept)
    return kept
