"""`train.precision: auto` on the CPU: when it times bf16, how it times, and what it keeps."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from siamese_cv.core.cache import CACHE_ENV
from siamese_cv.inference.hardware import resolve_precision
from siamese_cv.training import step_precision
from siamese_cv.training.step_precision import MIN_GAIN, TIMED_STEPS, choose_precision

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """No verdict of an earlier test (or run) is found."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    return tmp_path


class Recorder(torch.nn.Module):
    """A small conv net that notes, per forward pass, whether bf16 autocast was on."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(8, 16, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(16)
        self.calls: list[bool] = []
        self.weight_formats: list[bool] = []  # channels_last weights, per call

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(torch.is_autocast_enabled("cpu"))
        self.weight_formats.append(
            self.conv.weight.is_contiguous(memory_format=torch.channels_last)
        )
        return self.bn(self.conv(x)).mean(dim=(2, 3))


def _probe(net: torch.nn.Module):
    return lambda: (net, torch.randn(6, 8, 12, 12))


def test_without_bf16_units_auto_is_fp32_untimed(monkeypatch, caplog) -> None:
    monkeypatch.setattr(step_precision, "cpu_has_fast_bf16", lambda: False)

    def never() -> None:
        raise AssertionError("emulated bf16 is no candidate: nothing should be timed")

    with caplog.at_level(logging.INFO):
        chosen = choose_precision("auto", CPU, never, "train")
    assert chosen.name == "fp32" and "no bf16 units" in caplog.text


def test_an_explicit_precision_is_kept_untimed(monkeypatch) -> None:
    monkeypatch.setattr(step_precision, "cpu_has_fast_bf16", lambda: True)
    assert choose_precision("bf16", CPU, lambda: 1 / 0, "train").name == "bf16"


def test_the_precisions_take_turns_on_a_copy(monkeypatch, caplog) -> None:
    """Timed in turns (so a busy moment slows both alike), on a copy: the net is untouched."""
    monkeypatch.setattr(step_precision, "cpu_has_fast_bf16", lambda: True)
    net = Recorder()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with caplog.at_level(logging.INFO):
        chosen = choose_precision("auto", CPU, _probe(net), "train")
    assert chosen.name in ("fp32", "bf16")
    assert "a step took" in caplog.text and f"bf16 needs {MIN_GAIN:.2f}x" in caplog.text
    assert net.calls == []  # the original never ran; its copy did
    for key, value in net.state_dict().items():
        assert torch.equal(value, before[key]), key

    copy = Recorder()
    fp32, bf16 = resolve_precision("fp32", CPU), resolve_precision("bf16", CPU)
    seconds = step_precision.step_seconds(copy, torch.randn(6, 8, 12, 12), (fp32, bf16))
    assert len(seconds) == 2 and all(s > 0 for s in seconds)
    monkeypatch.setattr(step_precision.copy, "deepcopy", lambda m: m)  # watch the calls
    step_precision.step_seconds(copy, torch.randn(6, 8, 12, 12), (fp32, bf16))
    assert copy.calls == [False, True] * (TIMED_STEPS + 1)
    # the weights are timed in the memory format training gives them, whatever they came in
    assert copy.weight_formats == [fp32.channels_last, bf16.channels_last] * (TIMED_STEPS + 1)


@pytest.mark.parametrize("fp32_s, bf16_s, kept", [(1.0, 0.8, "bf16"), (1.0, 0.9, "fp32")])
def test_bf16_is_kept_only_when_clearly_faster(monkeypatch, fp32_s, bf16_s, kept) -> None:
    monkeypatch.setattr(step_precision, "cpu_has_fast_bf16", lambda: True)
    monkeypatch.setattr(step_precision, "step_seconds", lambda *_: [fp32_s, bf16_s])
    assert choose_precision("auto", CPU, _probe(Recorder()), "train").name == kept


def test_a_verdict_is_reused_until_what_it_timed_changes(monkeypatch, caplog, own_cache) -> None:
    monkeypatch.setattr(step_precision, "cpu_has_fast_bf16", lambda: True)
    timings = iter([[1.0, 0.5], [1.0, 0.95]])
    timed: list[int] = []

    def fake_seconds(net, batch, precisions):
        timed.append(len(timed))
        return next(timings)

    monkeypatch.setattr(step_precision, "step_seconds", fake_seconds)
    with caplog.at_level(logging.INFO):
        assert choose_precision("auto", CPU, _probe(Recorder()), "train").name == "bf16"
        assert "timed now" in caplog.text
        caplog.clear()
        # the same trained part and batch: the kept verdict, untimed
        assert choose_precision("auto", CPU, _probe(Recorder()), "train").name == "bf16"
        assert "timed on this machine before" in caplog.text and len(timed) == 1
        wider = Recorder()
        wider.conv = torch.nn.Conv2d(8, 32, 3, padding=1)
        wider.bn = torch.nn.BatchNorm2d(32)
        assert choose_precision("auto", CPU, _probe(wider), "train").name == "fp32"
    assert len(timed) == 2  # another network is timed anew
    assert len(json.loads((own_cache / step_precision.VERDICTS).read_text())) == 2


def test_an_unreadable_verdict_file_is_timed_again(monkeypatch, own_cache) -> None:
    monkeypatch.setattr(step_precision, "cpu_has_fast_bf16", lambda: True)
    (own_cache / step_precision.VERDICTS).write_text("{not json")
    monkeypatch.setattr(step_precision, "step_seconds", lambda *_: [1.0, 0.5])
    assert choose_precision("auto", CPU, _probe(Recorder()), "train").name == "bf16"
    assert len(json.loads((own_cache / step_precision.VERDICTS).read_text())) == 1
