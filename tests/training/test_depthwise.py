"""Depthwise convolutions in fp32 under CPU bf16 autocast: what runs in which dtype, and what stays."""

from __future__ import annotations

import copy

import torch
from timm.layers import Conv2dSame
from torch import nn

from siamese_cv.training.depthwise import is_depthwise, keep_depthwise_fp32


def _mbconv() -> nn.Sequential:
    """A 1x1 expansion, a TF-'same' strided 5x5 depthwise, a 3x3 depthwise and a 1x1 projection."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(8, 24, 1, bias=False),
        Conv2dSame(24, 24, 5, stride=2, groups=24, bias=False),
        nn.Conv2d(24, 24, 3, padding=1, groups=24, bias=False),
        nn.Conv2d(24, 8, 1, bias=False),
    )


def _dtypes(net: nn.Module, x: torch.Tensor) -> list[torch.dtype]:
    seen: list[torch.dtype] = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append(o.dtype)) for m in net]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        net(x)
    for hook in hooks:
        hook.remove()
    return seen


def test_only_depthwise_convolutions_switch_to_fp32_under_cpu_bf16_autocast():
    net, x = _mbconv(), torch.randn(2, 8, 15, 15)
    assert _dtypes(net, x) == [torch.bfloat16] * 4
    assert keep_depthwise_fp32(net) == 2
    assert _dtypes(net, x) == [torch.bfloat16, torch.float32, torch.float32, torch.bfloat16]
    assert keep_depthwise_fp32(net) == 0  # already switched
    assert [is_depthwise(m) for m in net] == [False, True, True, False]


def test_frozen_depthwise_convolutions_stay_in_bf16():
    """They compute no weight gradient, the slow part in bf16, so the switch leaves them."""
    net, x = _mbconv(), torch.randn(2, 8, 15, 15)
    net[1].weight.requires_grad_(False)
    assert keep_depthwise_fp32(net) == 1
    assert _dtypes(net, x) == [torch.bfloat16, torch.bfloat16, torch.float32, torch.bfloat16]


def test_a_switched_depthwise_convolution_computes_in_fp32_what_the_plain_one_computes():
    plain = _mbconv()
    switched = copy.deepcopy(plain)
    keep_depthwise_fp32(switched)
    x = torch.randn(2, 24, 15, 15).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = switched[1](x)
    torch.testing.assert_close(out, plain[1](x.float()), rtol=0, atol=0)
    # outside autocast nothing changes: same results, bit for bit, and same gradients
    y = torch.randn(2, 8, 15, 15, requires_grad=True)
    plain(y).square().sum().backward()
    expected = [p.grad.clone() for p in plain.parameters()]
    switched(y).square().sum().backward()
    for got, want in zip((p.grad for p in switched.parameters()), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_the_switch_keeps_parameters_and_state_dict_and_copies_use_their_own_weights():
    plain = _mbconv()
    switched = copy.deepcopy(plain)
    keep_depthwise_fp32(switched)
    assert switched.state_dict().keys() == plain.state_dict().keys()
    for key, value in plain.state_dict().items():
        assert torch.equal(switched.state_dict()[key], value)
    twin = copy.deepcopy(switched)  # what the moving average does
    with torch.no_grad():
        twin[2].weight.zero_()
    x = torch.randn(1, 24, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert twin[2](x).abs().max() == 0
        assert switched[2](x).abs().max() > 0
    fresh = _mbconv()
    fresh.load_state_dict(switched.state_dict())  # a checkpoint loads into the plain network
    assert not is_depthwise(fresh[0]) and type(fresh[2]) is nn.Conv2d


def test_the_weight_gradient_of_a_switched_convolution_is_fp32_under_bf16_autocast():
    net = _mbconv()
    keep_depthwise_fp32(net)
    x = torch.randn(2, 8, 15, 15)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x)
    out.float().square().sum().backward()
    assert all(p.grad is not None and p.grad.dtype is torch.float32 for p in net.parameters())
    reference = copy.deepcopy(net)
    for p in reference.parameters():
        p.grad = None
    reference(x).square().sum().backward()  # fp32 throughout: bf16 1x1 convolutions stay close
    cosine = nn.functional.cosine_similarity(
        net[2].weight.grad.flatten(), reference[2].weight.grad.flatten(), dim=0
    )
    assert cosine > 0.99
