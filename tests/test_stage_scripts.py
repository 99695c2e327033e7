"""A stage script run by a `python` that cannot import the package says what to do in one line.

`dvc repro` runs the `python` first on PATH; with the environment not activated that is one
without siamese_cv, numpy or torch, which `python -S` (no site-packages) stands in for here.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from pipeline_project import ROOT, STAGES


@pytest.mark.parametrize("stage", STAGES)
def test_a_stage_without_the_environment_names_the_fix(stage, tmp_path):
    result = subprocess.run(
        [sys.executable, "-S", str(ROOT / "stages" / f"{stage}.py")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == (
        "No module named 'siamese_cv': run `source .venv/bin/activate` or `make repro`\n"
    )
