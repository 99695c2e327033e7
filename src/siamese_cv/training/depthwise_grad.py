"""A depthwise convolution whose weight gradient is a compiled sum over the kernel's taps.

oneDNN computes a depthwise convolution's weight gradient on CPUs far below the memory speed
the sum needs: for 5x5 kernels over 1,248 channels of a 60-photo batch at 8 x 8, 24 ms in fp32
on a Zen 4, where the same sum written as one shifted product per tap and compiled by
torch.compile (inductor's C++ kernels) takes 7 ms. The forward pass and the input gradient stay
oneDNN's, which are fast. Which weight gradient a shape gets is timed on its first backward pass
(compile time excluded), so a CPU or compiler where the compiled sum is slower, or a machine
where compiling fails, keeps oneDNN's; both are fp32 sums of the same products.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Iterator

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

TIMED_CALLS = 3  # per candidate, after one warm-up call each
_onednn_only = False


@contextlib.contextmanager
def onednn_weight_grad() -> Iterator[None]:
    """Within it every weight gradient is oneDNN's: the baseline that benchmarks compare with."""
    global _onednn_only
    before, _onednn_only = _onednn_only, True
    try:
        yield
    finally:
        _onednn_only = before


def depthwise_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
) -> torch.Tensor:
    """`F.conv2d(x, weight, bias, stride, padding, groups=channels)` in fp32, channels_last,
    with the weight gradient chosen by `_weight_grad_kernel`."""
    return _DepthwiseConv.apply(x, weight, bias, tuple(stride), tuple(padding))


class _DepthwiseConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding):  # noqa: ANN001, ANN205
        x = x.float().contiguous(memory_format=torch.channels_last)
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.padding, ctx.has_bias = stride, padding, bias is not None
        return F.conv2d(x, weight, bias, stride, padding, 1, x.shape[1])

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        x, weight = ctx.saved_tensors
        grad = grad.float().contiguous(memory_format=torch.channels_last)
        needs_x, needs_w, needs_b = ctx.needs_input_grad[:3]
        kernel = (
            _weight_grad_kernel(x, weight, grad, ctx.stride, ctx.padding)
            if needs_w and not _onednn_only
            else None
        )
        grad_x, grad_w, grad_b = _onednn_backward(
            x, weight, grad, ctx.stride, ctx.padding, (needs_x, needs_w and kernel is None, needs_b)
        )
        if kernel is not None:
            grad_w = kernel(x, grad, tuple(weight.shape[-2:]), ctx.stride, ctx.padding)
        return grad_x, grad_w, grad_b if ctx.has_bias else None, None, None


def _onednn_backward(x, weight, grad, stride, padding, mask):  # noqa: ANN001, ANN202
    return torch.ops.aten.convolution_backward(
        grad,
        x,
        weight,
        [weight.shape[0]] if mask[2] else None,
        list(stride),
        list(padding),
        [1, 1],
        False,
        [0, 0],
        x.shape[1],
        list(mask),
    )


def weight_grad_by_taps(
    x: torch.Tensor,
    grad: torch.Tensor,
    kernel: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
) -> torch.Tensor:
    """The depthwise weight gradient as one product of shifted windows and `grad` per tap."""
    x = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))
    out_h, out_w = grad.shape[-2:]
    taps = [
        (
            x[
                :,
                :,
                i : i + stride[0] * (out_h - 1) + 1 : stride[0],
                j : j + stride[1] * (out_w - 1) + 1 : stride[1],
            ]
            * grad
        ).sum((0, 2, 3))
        for i in range(kernel[0])
        for j in range(kernel[1])
    ]
    return torch.stack(taps, 1).view(x.shape[1], 1, *kernel)


@functools.cache
def _compiled():  # noqa: ANN202
    return torch.compile(weight_grad_by_taps, dynamic=False, fullgraph=True)


_chosen: dict[tuple, object] = {}


def _weight_grad_kernel(x, weight, grad, stride, padding):  # noqa: ANN001, ANN202
    """The compiled tap sum for this shape if it timed faster than oneDNN's, else None."""
    key = (tuple(x.shape), tuple(weight.shape), stride, padding)
    if key not in _chosen:
        _chosen[key] = _choose(x, weight, grad, stride, padding)
    return _chosen[key]


def _choose(x, weight, grad, stride, padding):  # noqa: ANN001, ANN202
    kernel = tuple(weight.shape[-2:])
    compiled = _compiled()
    try:
        compiled(x, grad, kernel, stride, padding)  # compiles; not timed
    except Exception as error:  # noqa: BLE001 - no C++ compiler, an unsupported backend, ...
        log.info(
            "depthwise weight gradient: oneDNN's (compiling the tap sum failed: %s)",
            str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__,
        )
        return None

    def seconds(run) -> float:  # noqa: ANN001
        run()
        timed = []
        for _ in range(TIMED_CALLS):
            started = time.perf_counter()
            run()
            timed.append(time.perf_counter() - started)
        return min(timed)

    taps_s = seconds(lambda: compiled(x, grad, kernel, stride, padding))
    onednn_s = seconds(
        lambda: _onednn_backward(x, weight, grad, stride, padding, (False, True, False))
    )
    faster = taps_s < onednn_s
    log.info(
        "depthwise weight gradient for %s x %s kernels: %s (compiled taps %.1f ms, oneDNN %.1f ms)",
        "x".join(map(str, x.shape)),
        "x".join(map(str, kernel)),
        "compiled taps" if faster else "oneDNN",
        taps_s * 1e3,
        onednn_s * 1e3,
    )
    return compiled if faster else None
