"""Run every benchmark in turn (`make bench`); `--quick` is passed on to each.

Each runs in its own process, so one benchmark's threads, caches and memory cannot colour the
next one's figures. The exit status is 1 if any benchmark failed (or its accuracy guard did).

Run: python benchmarks/run_all.py [--quick] [--only search ...]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = ("preprocess", "embedding", "train", "search", "pipeline")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, to check they run")
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, help="run only these")
    args = parser.parse_args(argv)
    failed = []
    for name in args.only or BENCHMARKS:
        command = [sys.executable, str(HERE / f"bench_{name}.py")]
        command += ["--quick"] if args.quick else []
        print(f"\n=== bench_{name}.py{' --quick' if args.quick else ''}", flush=True)
        if subprocess.run(command, check=False).returncode != 0:
            failed.append(name)
    if failed:
        print(f"\nfailed: {', '.join(failed)} (see its output above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
