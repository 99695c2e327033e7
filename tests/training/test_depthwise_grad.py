"""The switched depthwise convolutions' backward (depthwise_grad.py): gradients equal to a plain
fp32 convolution's whichever weight-gradient kernel is timed faster, and oneDNN's without a
compiler."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from timm.layers import Conv2dSame
from torch import nn

from siamese_cv.training import depthwise_grad
from siamese_cv.training.depthwise import keep_depthwise_fp32
from siamese_cv.training.depthwise_grad import onednn_weight_grad, weight_grad_by_taps


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm())


CONVS = {
    "5x5, padding 2": lambda: nn.Conv2d(24, 24, 5, 1, 2, groups=24),
    "5x5 same, stride 2 (asymmetric padding)": lambda: Conv2dSame(16, 16, 5, 2, groups=16),
    "3x3, no bias": lambda: nn.Conv2d(8, 8, 3, 1, 1, groups=8, bias=False),
}


@pytest.fixture(autouse=True)
def fresh_choices():
    """Each test times and chooses anew."""
    depthwise_grad._chosen.clear()
    yield
    depthwise_grad._chosen.clear()


def step(conv: nn.Module, x: torch.Tensor, autocast: bool) -> torch.Tensor:
    """Forward and backward of a squared-sum loss; returns the output."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = conv(x.bfloat16() if autocast else x)
    out.float().square().sum().backward()
    return out


@pytest.mark.parametrize("name", list(CONVS))
@pytest.mark.parametrize("kernel", ["as timed", "compiled taps", "oneDNN's"])
def test_gradients_match_a_plain_fp32_convolution(name: str, kernel: str, monkeypatch) -> None:
    if kernel == "compiled taps":  # whatever the timing would say on this machine
        monkeypatch.setattr(depthwise_grad, "_choose", lambda *args: depthwise_grad._compiled())
    onednn = kernel == "oneDNN's"
    torch.manual_seed(0)
    plain = CONVS[name]()
    switched = copy.deepcopy(plain)
    assert keep_depthwise_fp32(switched) == 1
    x = torch.randn(5, plain.in_channels, 12, 12).contiguous(memory_format=torch.channels_last)
    # the reference sees the input as autocast hands it over: rounded to bf16
    ref_out = step(plain, x.bfloat16().float(), autocast=False)
    if onednn:
        with onednn_weight_grad():
            out = step(switched, x, autocast=True)
    else:
        out = step(switched, x, autocast=True)
    assert out.dtype == torch.float32  # the convolution ran in fp32
    assert relative(out, ref_out) < 1e-6
    assert relative(switched.weight.grad, plain.weight.grad) < 1e-5
    if plain.bias is not None:
        assert relative(switched.bias.grad, plain.bias.grad) < 1e-5
    if not onednn:
        assert len(depthwise_grad._chosen) == 1  # this shape was timed and chosen once


@pytest.mark.parametrize(
    ("stride", "padding"), [((1, 1), (2, 2)), ((2, 2), (0, 0)), ((2, 1), (1, 2))]
)
def test_the_tap_sum_is_the_weight_gradient(stride, padding) -> None:
    torch.manual_seed(1)
    x = torch.randn(3, 6, 11, 10)
    weight = torch.randn(6, 1, 5, 5)
    grad = torch.randn_like(nn.functional.conv2d(x, weight, None, stride, padding, 1, 6))
    expected = torch.nn.grad.conv2d_weight(x, weight.shape, grad, stride, padding, groups=6)
    assert relative(weight_grad_by_taps(x, grad, (5, 5), stride, padding), expected) < 1e-5


def test_a_failed_compile_keeps_onednn(monkeypatch, caplog) -> None:
    def no_compiler(*args):
        raise RuntimeError("no C++ compiler found\nand more")

    monkeypatch.setattr(depthwise_grad, "_compiled", lambda: no_compiler)
    torch.manual_seed(2)
    plain = CONVS["5x5, padding 2"]()
    switched = copy.deepcopy(plain)
    keep_depthwise_fp32(switched)
    x = torch.randn(4, 24, 9, 9)
    step(plain, x.bfloat16().float(), autocast=False)
    with caplog.at_level(logging.INFO, logger=depthwise_grad.__name__):
        step(switched, x, autocast=True)
    assert relative(switched.weight.grad, plain.weight.grad) < 1e-5
    assert list(depthwise_grad._chosen.values()) == [None]
    assert "oneDNN's (compiling the tap sum failed: no C++ compiler found)" in caplog.text


def test_a_switched_convolution_runs_under_inference_mode() -> None:
    """Validation embeds under inference_mode: no graph, the same fp32 convolution."""
    conv = CONVS["5x5, padding 2"]()
    keep_depthwise_fp32(conv)
    x = torch.randn(2, 24, 8, 8)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv(x)
    assert out.dtype == torch.float32 and not out.requires_grad
    expected = nn.functional.conv2d(x, conv.weight, conv.bias, 1, 2, 1, 24)
    assert relative(out, expected) < 1e-6
