"""Training throughput per optimisation step: the pipeline's paths, and the step settings.

Table 1: for each way `train.freeze` can be set, the project's path (the frozen stages' output
cached once, then only the rest runs forward and backward) is timed beside the plain path (every
step runs the whole network on the images), on one P x K batch of real food10 photos with
efficientnet_lite2's ImageNet weights. The one-off cost of filling the cache is reported
separately: it is one inference pass.

Table 2: the offline profile's step (the last three stages on cached features, Proxy-Anchor
loss, AdamW) in the settings `train` could run it in, each against fp32, eager, channels_last on
every core: bf16 autocast with the depthwise convolutions in fp32 (`train.precision: bf16`;
their weight gradient as `training/depthwise_grad.py` chooses, and with oneDNN's;
emulated, and so not a candidate, on CPUs without AVX512-BF16 or AMX) and with them in bf16 too,
contiguous tensors, `torch.compile` with its compile time spread over one
food10 epoch of steps (`train.compile`), and one thread.

Run: python benchmarks/bench_train.py [--quick] [--batch 60] [--epoch-steps 56]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from _common import Row, food10_files, print_table
from PIL import Image

from siamese_cv.core.allocator import keep_freed_memory
from siamese_cv.data.images import resize_image
from siamese_cv.inference.embedder import to_tensor
from siamese_cv.inference.hardware import cpu_has_fast_bf16
from siamese_cv.models.backbones import get_backbone_spec
from siamese_cv.models.siamese import EmbeddingNet, Preprocessing
from siamese_cv.training.depthwise import keep_depthwise_fp32
from siamese_cv.training.depthwise_grad import onednn_weight_grad
from siamese_cv.training.losses import build_loss


def step_seconds(module, inputs, labels, bf16: bool, steps: int) -> float:
    """Median seconds of one forward + backward + AdamW step (after one warm-up step)."""
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)
    loss_fn = build_loss("triplet_cosine", 0.2)
    times = []
    for i in range(steps + 1):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            emb = module(inputs)
        loss = loss_fn(emb.float(), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def model_for(freeze: int, state, depthwise_fp32: bool = True) -> EmbeddingNet:
    """Lite2 as `train` builds it: trained depthwise convolutions in fp32 under bf16 autocast."""
    backbone = get_backbone_spec("efficientnet_lite2").build()
    backbone.module.load_state_dict(state)
    model = EmbeddingNet(backbone, "linear", 512)
    model.freeze(freeze)
    if depthwise_fp32:
        keep_depthwise_fp32(model)
    return model.train().to(memory_format=torch.channels_last)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 timed steps instead of 4")
    parser.add_argument("--batch", type=int, default=60, help="P x K batch size (default 60)")
    parser.add_argument(
        "--epoch-steps", type=int, default=56, help="steps an epoch, to spread compile time over"
    )
    args = parser.parse_args()
    keep_freed_memory()  # as the train stage does
    steps = 2 if args.quick else 4
    prep = Preprocessing(244, "stretch", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    files = food10_files(args.batch)
    images = to_tensor(
        [resize_image(Image.open(p).convert("RGB"), 244, "stretch") for _, _, p in files], prep
    )
    images = images.contiguous(memory_format=torch.channels_last)
    classes = sorted({c for _, c, _ in files})
    labels = torch.tensor([classes.index(c) for _, c, _ in files])
    state = get_backbone_spec("efficientnet_lite2").fetch_imagenet()
    bf16 = cpu_has_fast_bf16()
    rows, notes = [], []
    for name, freeze in (
        ("head only (freeze: all)", 10**6),
        ("last 2 stages (freeze: -2)", -2),
        ("last 3 stages (freeze: -3)", -3),
        ("full fine-tune (freeze: none)", None),
    ):
        model = model_for(freeze, state)
        plain_fp32 = step_seconds(model, images, labels, False, steps)
        if freeze is None:
            if not bf16:  # both would be fp32: their ratio would be noise
                notes.append(f"{name}: {args.batch / plain_fp32:.2f} img/s in fp32")
                continue
            project = step_seconds(model, images, labels, bf16, steps)
            rows.append(
                Row(f"{name}: bf16 vs fp32", args.batch / project, args.batch / plain_fp32, "img/s")
            )
            continue
        prefix, rest = model.split_frozen()
        start = time.perf_counter()
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            cached = prefix.eval()(images).float()
        cached = cached.clone()  # a normal tensor: inference-mode tensors cannot enter autograd
        fill = time.perf_counter() - start
        cached = (
            cached.contiguous(memory_format=torch.channels_last) if cached.dim() == 4 else cached
        )
        for label, use_bf16 in (("cached fp32", False), ("cached bf16", True))[: 2 if bf16 else 1]:
            seconds = step_seconds(rest, cached, labels, use_bf16, steps)
            rows.append(
                Row(
                    f"{name}: {label} vs plain fp32",
                    args.batch / seconds,
                    args.batch / plain_fp32,
                    "img/s",
                )
            )
        notes.append(
            f"{name}: filling the cache runs at {args.batch / fill:.1f} img/s, once per run"
        )
    notes.append(f"bf16 units on this CPU: {bf16} (train.precision: auto times bf16 only then)")
    print_table(f"Training step throughput, efficientnet_lite2, batch {args.batch}", rows, notes)
    print()
    step_settings(state, images, labels, steps, args.epoch_steps, bf16)


def profile_step(rest, inputs, labels, bf16: bool, steps: int) -> tuple[float, float]:
    """(first step's seconds, median of the next `steps`) of the profile's step on `rest`."""
    loss_fn = build_loss("proxy_anchor", 0.1, int(labels.max()) + 1, 1280, 32.0)
    params = [p for p in rest.parameters() if p.requires_grad] + list(loss_fn.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-4)
    times = []
    for _ in range(steps + 2):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            emb = rest(inputs)
        loss = loss_fn(emb.float(), labels, None)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
    return times[0], sorted(times[2:])[steps // 2]


def profile_parts(state, depthwise_fp32: bool = True) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The profile's (frozen prefix, trained rest): the last three stages, no head."""
    model = model_for(-3, state, depthwise_fp32)
    model.head = torch.nn.Identity()  # the profile's head: the pooled 1280-d features
    return model.split_frozen()


def step_settings(state, images, labels, steps: int, epoch_steps: int, bf16: bool) -> None:
    """Table 2: the profile's cached step in each setting against fp32 eager channels_last."""
    prefix, rest = profile_parts(state)
    with torch.no_grad():
        features = prefix.eval()(images).clone()
    last = features.contiguous(memory_format=torch.channels_last)
    threads = torch.get_num_threads()
    _, today = profile_step(copy.deepcopy(rest), last, labels, False, steps)
    rows, notes = (
        [],
        [f"fp32, eager, channels_last, {threads} threads: {today:.3f} s a step"],
    )

    def row(name: str, seconds: float) -> None:
        rows.append(Row(name, labels.numel() / seconds, labels.numel() / today, "img/s"))

    _, emulated = profile_step(copy.deepcopy(rest), last, labels, True, 1 if not bf16 else steps)
    row(
        "bf16 autocast, depthwise in fp32" + ("" if bf16 else " (emulated: no bf16 units)"),
        emulated,
    )
    if bf16:
        with onednn_weight_grad():
            before = profile_step(copy.deepcopy(rest), last, labels, True, steps)[1]
        row("bf16 autocast, depthwise in fp32 with oneDNN's weight gradient", before)
        notes.append(
            f"depthwise weight gradient: the compiled tap sum's step {emulated:.3f} s against "
            f"{before:.3f} s with oneDNN's: {before / emulated:.2f}x"
        )
        _, plain = profile_parts(state, depthwise_fp32=False)
        row("bf16 autocast, depthwise too", profile_step(plain, last, labels, True, steps)[1])
    contiguous = copy.deepcopy(rest).to(memory_format=torch.contiguous_format)
    row(
        "contiguous tensors",
        profile_step(contiguous, features.contiguous(), labels, False, steps)[1],
    )
    compiled = torch.compile(copy.deepcopy(rest))
    first, step = profile_step(compiled, last, labels, False, steps)
    spread = (first + (epoch_steps - 1) * step) / epoch_steps
    row(f"torch.compile, compile time spread over {epoch_steps} steps", spread)
    row("torch.compile, steps after compiling", step)
    notes.append(
        f"torch.compile: the first step (compiling) took {first:.1f} s; inductor keeps compiled "
        "code on disk, so a second run of this benchmark compiles faster than a fresh machine"
    )
    torch.set_num_threads(1)
    try:
        row("1 thread", profile_step(copy.deepcopy(rest), last, labels, False, steps)[1])
    finally:
        torch.set_num_threads(threads)
    print_table(
        f"The profile's training step (last 3 stages on cached features), batch {labels.numel()}",
        rows,
        notes,
    )


if __name__ == "__main__":
    main()
