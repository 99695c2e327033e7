"""Stages you can watch: bars on a terminal only, summary lines always, `--quiet` for neither.

The stage runs go through the real scripts on the tiny project with stderr a pipe (not a
terminal), as under CI or `dvc repro > log`; the bars themselves are checked in-process, on the
tiny training of tests/training/test_loop.py with a stream that says it is a terminal.
"""

from __future__ import annotations

import io
import logging
import re
import sys
from pathlib import Path

import pytest
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).parent / "training"))

from pipeline_project import copy_photos, make_project, run  # noqa: E402
from test_loop import run as train_tiny  # noqa: E402

from siamese_cv.config.params import TrainParams  # noqa: E402
from siamese_cv.config.stage import stage_params  # noqa: E402
from siamese_cv.core import logs  # noqa: E402
from siamese_cv.core.errors import run_cli  # noqa: E402

BAR_MARKS = ("\r", "\x1b[", "it/s", "step/s", "img/s", "█", "|#")  # what a tqdm bar draws
EPOCH_LINE = re.compile(
    r"^train: epoch (\d+)/2: loss [\d.]+, val loss [\d.]+, .*val MAP@R [\d.]+; [\d.]+ s$"
)


class Terminal(io.StringIO):
    """A text stream that says it is a terminal, as tqdm asks before it draws."""

    def isatty(self) -> bool:
        return True


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """The tiny project with its data downloaded, preprocessed and sampled (train not yet run)."""
    root = tmp_path_factory.mktemp("progress")
    photos = copy_photos(root / "photos", train=6, test=3, classes=3)
    project = make_project(root / "project", photos)
    for stage in ("download", "preprocess", "sample_triplets", "features"):
        run(project, "python", f"stages/{stage}.py")
    return project


def _no_bars(text: str) -> None:
    for mark in BAR_MARKS:
        assert mark not in text, (mark, text)


def test_without_a_terminal_a_stage_prints_summary_lines_and_no_bars(prepared):
    preprocess = run(prepared, "python", "stages/preprocess.py")
    lines = preprocess.stdout.splitlines()
    for split in ("train", "validation", "test"):
        assert any(
            re.match(rf"preprocess: {split}: kept \d+, skipped \d+ of \d+ images", line)
            for line in lines
        ), lines
    assert lines[-2].startswith("preprocess: kept ") and lines[-1].startswith(
        "preprocess: done in "
    )
    _no_bars(preprocess.stdout + preprocess.stderr)

    train = run(prepared, "python", "stages/train.py")
    lines = train.stdout.splitlines()
    epochs = [int(m.group(1)) for m in map(EPOCH_LINE.match, lines) if m]
    assert epochs == [1, 2], lines  # one summary line per epoch, in order
    assert any(line.startswith("train: best epoch ") for line in lines), lines
    _no_bars(train.stdout + train.stderr)
    assert train.stderr == "", train.stderr


def test_quiet_silences_the_summary_lines_but_not_the_work(prepared):
    model = prepared / "models" / "model.safetensors"
    model.unlink(missing_ok=True)
    quiet = run(prepared, "python", "stages/train.py", "--quiet")
    assert quiet.stdout == "" and quiet.stderr == "", (quiet.stdout, quiet.stderr)
    assert model.is_file()


def test_quiet_still_reports_a_mistake_as_one_line(tmp_path, capsys, fresh_logging):
    missing = str(tmp_path / "nope.yaml")
    status = run_cli(lambda argv: stage_params(["--quiet", "--params", missing], "a stage"))
    captured = capsys.readouterr()
    assert status == 2 and captured.out == "" and captured.err.count("\n") == 1, captured
    assert "nope.yaml" in captured.err


def test_verbose_and_quiet_exclude_each_other(capsys):
    with pytest.raises(SystemExit) as exited:
        stage_params(["-v", "-q"], "a stage")
    assert exited.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_each_epoch_logs_one_summary_line(caplog):
    caplog.set_level(logging.INFO, logger="siamese_cv")
    train_tiny(TrainParams(epochs=3, lr=3e-3, workers=0), freeze=1)
    lines = [r.getMessage() for r in caplog.records if r.name == "siamese_cv.training.loop"]
    epochs = [line for line in lines if line.startswith("train: epoch ")]
    assert [line.split(":")[1].strip() for line in epochs] == [
        "epoch 1/3",
        "epoch 2/3",
        "epoch 3/3",
    ]
    assert all("val MAP@R" in line and line.endswith(" s") for line in epochs), epochs
    assert lines[-1].startswith("train: kept epoch "), lines
    cached = [r.getMessage() for r in caplog.records if r.name.endswith("feature_cache")]
    assert (
        len(cached) == 1 and "cached the frozen prefix's outputs: 24 training images" in cached[0]
    )


class EveryStep(tqdm):
    """A bar that redraws on every update, so a run of milliseconds shows every state."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, mininterval=0, miniters=1, **kwargs)


@pytest.fixture
def fresh_logging(monkeypatch):
    """Undo what `logs.configure` changes: root handlers, our loggers' levels, the bar switch."""
    monkeypatch.setenv(logs.VERBOSITY_ENV, "info")
    monkeypatch.setattr(logs, "_bars", True)
    monkeypatch.setattr(logs, "BAR_DELAY_S", 0.0)
    root = logging.getLogger()
    handlers = list(root.handlers)
    levels = {name: logging.getLogger(name).level for name in (None, *logs.NAMESPACES)}
    yield
    root.handlers[:] = handlers
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def test_on_a_terminal_each_epoch_and_the_cache_draw_a_bar(monkeypatch, fresh_logging):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    monkeypatch.setattr(logs, "tqdm", EveryStep)
    train_tiny(TrainParams(epochs=2, lr=3e-3, workers=0), freeze=1)
    drawn = terminal.getvalue()
    for label in ("train: epoch 1/2", "train: epoch 2/2", "train: caching training images"):
        assert label in drawn, drawn
    # steps done of all, elapsed < left, rate, and the step's loss
    assert re.search(r"4/4 \[[\d:]+<[\d:]+, +[\d.]+(step/s|s/step), loss=[\d.]+\]", drawn), drawn
    assert re.search(r"24/24 \[[\d:]+<[\d:]+, +[\d.]+(img/s|s/img)\]", drawn), drawn


def test_bars_are_off_when_quiet_and_when_stderr_is_not_a_terminal(monkeypatch, fresh_logging):
    for stream, verbosity, shown in (
        (Terminal(), "info", True),
        (Terminal(), "quiet", False),
        (io.StringIO(), "info", False),
    ):
        monkeypatch.setattr(sys, "stderr", stream)
        logs.configure(verbosity)
        for _ in logs.progress(range(3), desc="counting"):
            pass
        assert ("counting" in stream.getvalue()) == shown, (verbosity, stream.getvalue())


def test_log_lines_go_to_stdout_and_warnings_to_stderr(capsys, fresh_logging):
    logs.configure()
    logging.getLogger("siamese_cv.test").info("a summary line")
    logging.getLogger("siamese_cv.test").debug("a detail")
    logging.getLogger("siamese_cv.test").warning("a problem")
    logging.getLogger("some.library").info("a library's chatter")
    captured = capsys.readouterr()
    assert captured.out == "a summary line\n"
    assert captured.err == "warning: a problem\n"
