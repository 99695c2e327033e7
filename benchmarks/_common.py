"""What every benchmark shares: the machine line, food10 sampling, and the results table.

Benchmarks never assert a wall-clock figure: a figure only means something beside a baseline
measured in the same process on the same machine, so each script prints both and their ratio,
and the machine they ran on, including its load (a busy machine slows both sides, not evenly).
"""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOOD10 = Path(os.environ.get("SIAMESE_CV_FOOD10", ROOT.parent / "shared" / "datasets" / "food10"))


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_line() -> str:
    """CPU model, usable cores, load, torch and numpy versions: enough to compare two runs."""
    import numpy as np

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    try:
        import torch

        torch_version = torch.__version__
    except ImportError:
        torch_version = "not installed"
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return (
        f"machine: {cpu_model()}; {cores} cores usable; load average {load}; "
        f"torch {torch_version}; numpy {np.__version__}; Python {platform.python_version()}"
    )


def food10_files(n: int) -> list[tuple[str, str, Path]]:
    """`n` food10 photos as (split, class, path), spread evenly over both splits and all classes.

    Raises:
        SystemExit: food10 is missing (the message says where it was looked for).
    """
    if not (FOOD10 / "train").is_dir():
        raise SystemExit(f"food10 not found at {FOOD10}; set SIAMESE_CV_FOOD10 to its folder")
    every = sorted(
        (split, path.parent.name, path)
        for split in ("train", "test")
        for path in (FOOD10 / split).glob("*/*.jpg")
    )
    if n > len(every):
        raise SystemExit(f"asked for {n} images, food10 has {len(every)}; lower --images")
    step = len(every) / n
    return [every[int(i * step)] for i in range(n)]


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), linear between ranks."""
    import numpy as np

    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


@dataclass
class Row:
    """One figure: the project's value, the baseline's, and which way is better."""

    figure: str
    project: float
    baseline: float
    unit: str
    higher_is_better: bool = True

    @property
    def ratio(self) -> float:
        """How many times better the project is (speed-up for rates and for latencies alike)."""
        if self.higher_is_better:
            return self.project / self.baseline
        return self.baseline / self.project


def print_table(title: str, rows: Sequence[Row], notes: Sequence[str] = ()) -> None:
    """A fixed-width table; the ratio column is always 'times better than the baseline'."""
    print(f"\n{title}")
    print(machine_line())
    head = f"{'figure':<44} {'project':>12} {'baseline':>12} {'unit':<10} {'ratio':>8}"
    print(head)
    print("-" * len(head))
    for row in rows:
        print(
            f"{row.figure:<44} {_num(row.project):>12} {_num(row.baseline):>12} "
            f"{row.unit:<10} {row.ratio:>7.2f}x"
        )
    for note in notes:
        print(f"  * {note}")


def _num(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 1:
        return f"{value:.2f}"
    return f"{value:.4f}"
