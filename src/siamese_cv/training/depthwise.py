"""Depthwise convolutions kept in fp32 under CPU bf16 autocast, so the rest of a step runs in bf16.

On CPUs oneDNN computes a depthwise convolution's weight gradient in bf16 several times slower
than in fp32 (5x5 over 1,248 channels of a 60-photo batch on a Zen 4 with AVX512-BF16: 170 ms
against 25 ms), while the 1x1 convolutions around it run about three times faster in bf16. A
bf16 training step of an MBConv network is fastest with its depthwise convolutions in fp32
(benchmarks/bench_train.py). Only trained convolutions are switched: a frozen one computes no
weight gradient, so bf16 stays its faster forward. The swap changes the modules' class, not their
parameters, so state dicts, copies and the moving average are untouched; outside CPU autocast it
does nothing. Their weight gradient is computed as depthwise_grad.py chooses.
"""

from __future__ import annotations

import functools

import torch
from timm.layers import Conv2dSame, pad_same
from torch import nn

from siamese_cv.training.depthwise_grad import depthwise_conv


class _Fp32UnderCpuAutocast:
    """Mixin placed before a convolution class: its forward in fp32 while CPU autocast is on."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or not torch.is_autocast_enabled("cpu"):
            return super().forward(x)  # type: ignore[misc]
        conv: nn.Conv2d = self  # type: ignore[assignment]
        with torch.autocast("cpu", enabled=False):
            x, padding = x.float(), conv.padding
            if isinstance(padding, str) or conv.dilation != (1, 1) or conv.padding_mode != "zeros":
                return super().forward(x)  # type: ignore[misc]
            if isinstance(conv, Conv2dSame):
                x, padding = pad_same(x, conv.weight.shape[-2:], conv.stride), (0, 0)
            return depthwise_conv(x, conv.weight, conv.bias, conv.stride, padding)


@functools.cache
def _fp32_class(cls: type[nn.Conv2d]) -> type[nn.Conv2d]:
    return type(f"Fp32{cls.__name__}", (_Fp32UnderCpuAutocast, cls), {})


def is_depthwise(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and 1 < module.groups == module.in_channels


def keep_depthwise_fp32(network: nn.Module) -> int:
    """Make every trained depthwise convolution in `network` run in fp32 under CPU autocast.

    Call it after freezing: convolutions whose weights do not require gradients stay as they are.

    Returns:
        How many convolutions were switched (already switched ones are not counted again).
    """
    switched = 0
    for module in network.modules():
        if (
            is_depthwise(module)
            and module.weight.requires_grad
            and not isinstance(module, _Fp32UnderCpuAutocast)
        ):
            module.__class__ = _fp32_class(type(module))
            switched += 1
    return switched
