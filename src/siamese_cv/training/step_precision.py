"""The precision of the training steps, chosen by timing them on this machine.

`train.precision: auto` on a CPU with bf16 units (AVX512-BF16 or AMX) times a few steps of the
trained part in fp32 and under bf16 autocast (depthwise convolutions in fp32: depthwise.py), on
the run's own first batch, and keeps bf16 only when it is clearly faster: how much it gains
depends on the CPU and on how much of the trained part is depthwise (benchmarks/bench_train.py).
Without those units bf16 is emulated, many times slower, and is not a candidate. On a GPU
`auto` is bf16 (fp16 where it has no bf16), unmeasured.

The verdict is kept in the user cache (`step_precision.json`, core/cache.py) under a hash of
what it depends on: the CPU, the thread count, torch's version, the trained part's modules and
shapes, the batch's shape and the step's code. A rerun after a parameter edit that changes none
of those (the learning rate, the epochs) reuses it instead of timing again, and so also trains
in the precision the earlier run chose. Delete the file to time again.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from siamese_cv.core.atomic import read_json, write_json
from siamese_cv.core.cache import cache_root
from siamese_cv.inference.hardware import Precision, cpu_has_fast_bf16, resolve_precision
from siamese_cv.training import depthwise, depthwise_grad
from siamese_cv.training.feature_cache import as_input

log = logging.getLogger(__name__)

MIN_GAIN = 1.15  # below this, fp32's exact sums are worth more than the time
TIMED_STEPS = 5  # per precision, in turns
VERDICTS = "step_precision.json"  # in the user cache


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
    key = verdict_key(net, batch)
    known = _verdicts().get(key)
    if known is not None:
        fp32_s, bf16_s = known["fp32_s"], known["bf16_s"]
        how = "timed on this machine before"
    else:
        fp32_s, bf16_s = step_seconds(net, batch, (fp32, bf16))
        _remember(key, {"fp32_s": fp32_s, "bf16_s": bf16_s, "timed": time.strftime("%Y-%m-%d")})
        how = "timed now"
    chosen = bf16 if fp32_s / bf16_s >= MIN_GAIN else fp32
    log.info(
        "%s: precision auto: %s (a step took %.3f s in fp32, %.3f s in bf16, %s; bf16 needs %.2fx)",
        name,
        chosen.name,
        fp32_s,
        bf16_s,
        how,
        MIN_GAIN,
    )
    return chosen


def verdict_key(net: torch.nn.Module, batch: torch.Tensor) -> str:
    """A hash of what a timing of `net`'s step depends on (see the module docstring)."""
    described = {
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "net": repr(net),
        "parameters": [
            (name, tuple(p.shape), p.requires_grad) for name, p in net.named_parameters()
        ],
        "batch": (tuple(batch.shape), str(batch.dtype)),
        "code": [inspect.getsource(m) for m in (depthwise, depthwise_grad)]
        + [inspect.getsource(step_seconds)],
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:32]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                return line  # the first: the model, else (some VMs name none) the flags
    except OSError:
        pass
    return "unknown"


def _verdicts_path() -> Path | None:
    root = cache_root()
    return None if root is None else root / VERDICTS


def _verdicts() -> dict:
    path = _verdicts_path()
    try:
        found = read_json(path) if path is not None and path.is_file() else {}
    except (OSError, ValueError):
        return {}  # unreadable: time again, and the write below replaces it
    return found if isinstance(found, dict) else {}


def _remember(key: str, verdict: dict) -> None:
    path = _verdicts_path()
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, _verdicts() | {key: verdict})
    except OSError as error:  # a read-only home: the next run times again
        log.debug("step precision verdict not kept in %s: %s", path, error)


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
