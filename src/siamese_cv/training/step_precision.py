"""The precision of the training steps, chosen by timing them on this machine.

`train.precision: auto` on a CPU with bf16 units (AVX512-BF16 or AMX) times a few steps of the
trained part in fp32 and under bf16 autocast (depthwise convolutions in fp32: depthwise.py), on
the run's own first batch, and keeps bf16 only when it is clearly faster: how much it gains
depends on the CPU and on how much of the trained part is depthwise (benchmarks/bench_train.py).
Without those units bf16 is emulated, many times slower, and is not a candidate. On a GPU
`auto` is bf16 (fp16 where it has no bf16), unmeasured.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable

import torch

from siamese_cv.inference.hardware import Precision, cpu_has_fast_bf16, resolve_precision
from siamese_cv.training.feature_cache import as_input

log = logging.getLogger(__name__)

MIN_GAIN = 1.15  # below this, fp32's exact sums are worth more than the time
TIMED_STEPS = 5  # per precision, in turns


def choose_precision(
    requested: str,
    device: torch.device,
    probe: Callable[[], tuple[torch.nn.Module, torch.Tensor]],
    name: str,
) -> Precision:
    """`requested` resolved for this run's training steps; logs what `auto` chose and why.

    Args:
        requested: `train.precision`.
        probe: returns what a step runs forward and backward (the trainable rest on cached
            features, or the whole network) and one step's input; called only when timing.
            A copy is timed, so its weights and statistics are untouched.
    """
    if requested != "auto" or device.type != "cpu":
        return resolve_precision(requested, device)
    fp32 = resolve_precision("fp32", device)
    if not cpu_has_fast_bf16():
        log.info("%s: precision auto: fp32 (this CPU has no bf16 units: AVX512-BF16 or AMX)", name)
        return fp32
    bf16 = resolve_precision("bf16", device)
    net, batch = probe()
    fp32_s, bf16_s = step_seconds(net, batch, (fp32, bf16))
    chosen = bf16 if fp32_s / bf16_s >= MIN_GAIN else fp32
    log.info(
        "%s: precision auto: %s (a step took %.3f s in fp32, %.3f s in bf16; bf16 needs %.2fx)",
        name,
        chosen.name,
        fp32_s,
        bf16_s,
        MIN_GAIN,
    )
    return chosen


def step_seconds(
    net: torch.nn.Module, batch: torch.Tensor, precisions: tuple[Precision, ...]
) -> list[float]:
    """Median seconds of a forward and backward pass of a copy of `net` under each precision.

    The precisions take turns step by step (after one warm-up each), so a shared machine's slow
    moments fall on all of them alike instead of on whichever was timed in that moment's block.
    Each copy's weights are in its precision's memory format, as training puts them: oneDNN
    reorders weights of the other format on every call, which would time a slower step.
    """
    probes = [
        copy.deepcopy(net).train().to(memory_format=precision.memory_format)
        for precision in precisions
    ]
    inputs = [as_input(batch, precision) for precision in precisions]
    times: list[list[float]] = [[] for _ in precisions]
    for _ in range(TIMED_STEPS + 1):
        for precision, probe, x, timed in zip(precisions, probes, inputs, times, strict=True):
            started = time.perf_counter()
            with precision.autocast():
                out = probe(x)
            out.float().square().mean().backward()
            timed.append(time.perf_counter() - started)
    return [sorted(t[1:])[TIMED_STEPS // 2] for t in times]
