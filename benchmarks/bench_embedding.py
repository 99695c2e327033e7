"""Embedding throughput, end to end from a processed parquet, and the accuracy it keeps.

Project: `siamese_cv.inference.embedder.Embedder` as the pipeline runs it: batch 64, eval mode under
inference_mode, `resolve_precision("auto")` (bf16 autocast + channels_last on CPUs with AMX
or AVX512-BF16, else fp32), decoding the next batch in a thread while the current one runs.
Baselines, over the same parquet bytes and the same weights:

- (A) the original's path: one image at a time, fp32, eager, model in eval mode but autograd
  left on (no inference_mode, no no_grad), as the notebook embedded its gallery;
- (B) plain batched PyTorch: a DataLoader with 2 workers decoding the bytes, batch 64, fp32,
  under torch.no_grad().

(A) is one image at a time, so its rate does not depend on how many it embeds: it runs on the
first 64 images (16 with --quick) to keep the benchmark short.

The Embedder in fp32 (what a CPU without fast bf16 runs: batched, channels_last, inference_mode)
is a row against (B), so the gain that owes nothing to reduced precision shows on its own.

The same Embedder with `engine="onnxruntime"` (the model exported to ONNX, run by ONNX Runtime in
fp32 on the CPU) is a further row, against (A), (B) and the torch engine above; its export is
timed apart (it happens once per stage). Skipped, with a note, when onnxruntime is missing.

Accuracy guard: the cosine between each project embedding and (B)'s fp32 embedding of the same
image; reduced precision must keep every one at or above 0.99, the fp32 onnxruntime engine at or
above 0.999 (exit status 1 otherwise).

Run: python benchmarks/bench_embedding.py [--quick] [--images N] [--backbone resnet50]
"""

from __future__ import annotations

import argparse
import copy
import io
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from _common import Row, food10_files, print_table
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from siamese_cv.core.errors import UserError
from siamese_cv.data.images import prepare_image
from siamese_cv.data.parquet import PROCESSED_SCHEMA, iter_batches, read_table, write_rows
from siamese_cv.inference.embedder import Embedder, decode_batch
from siamese_cv.inference.hardware import resolve_precision
from siamese_cv.inference.onnx_export import CACHE_ENV
from siamese_cv.models.backbones import get_backbone_spec
from siamese_cv.models.siamese import EmbeddingNet, Preprocessing

IMAGE_SIZE = 244
BATCH = 64
MIN_COSINE = 0.99
MIN_COSINE_FP32 = 0.999  # the onnxruntime engine computes in fp32, like (B)


def build_processed(n: int, path: Path) -> None:
    """A processed split of `n` food10 photos, made as the preprocess stage makes them."""
    files = food10_files(n)
    labels = {name: i for i, name in enumerate(sorted({label for _, label, _ in files}))}
    rows = (
        {
            "id": f"{split}/{label}/{file.name}",
            "label": labels[label],
            "label_name": label,
            "image": prepare_image(file.read_bytes(), IMAGE_SIZE, "stretch", "jpeg", 95),
            "width": IMAGE_SIZE,
            "height": IMAGE_SIZE,
        }
        for split, label, file in files
    )
    write_rows(path, PROCESSED_SCHEMA, rows, 256)


def build_model(name: str, random_init: bool) -> tuple[nn.Module, Preprocessing, str]:
    """The backbone with ImageNet weights (or a seeded random start) and the default seed head."""
    torch.manual_seed(0)
    spec = get_backbone_spec(name)
    backbone = spec.build()
    weights = "random init (seed 0)"
    if not random_init and spec.fetch_imagenet is not None:
        try:
            backbone.module.load_state_dict(spec.fetch_imagenet())
            weights = "ImageNet"
        except Exception as error:  # offline: torchvision cannot download; speed is the same
            text = str(error).strip()
            reason = text.splitlines()[0][:80] if text else type(error).__name__
            weights = f"random init (ImageNet weights unavailable: {reason})"
    model = EmbeddingNet(backbone, "seed", 512)
    prep = Preprocessing(IMAGE_SIZE, "stretch", backbone.mean, backbone.std)
    return model.eval(), prep, weights


def to_input(data: bytes, prep: Preprocessing) -> torch.Tensor:
    """One image's bytes -> a normalised [3, H, W] tensor, the plain torchvision way."""
    from torchvision.transforms import functional as F

    tensor = F.to_tensor(Image.open(io.BytesIO(data)).convert("RGB"))
    return F.normalize(tensor, prep.mean, prep.std)


class EncodedImages(Dataset):
    """Image bytes decoded in the DataLoader's worker processes."""

    def __init__(self, encoded: list[bytes], prep: Preprocessing):
        self.encoded = encoded
        self.prep = prep

    def __len__(self) -> int:
        return len(self.encoded)

    def __getitem__(self, i: int) -> torch.Tensor:
        return to_input(self.encoded[i], self.prep)


def original_path(model: nn.Module, path: Path, prep: Preprocessing, limit: int) -> np.ndarray:
    """(A) batch 1, fp32, eager, autograd on (every forward records its graph); `limit` images."""
    assert torch.is_grad_enabled(), "the original's path runs with autograd on"
    outs = []
    for batch in iter_batches(path, ["image"], 256):
        for data in batch.column(0).to_pylist()[: limit - len(outs)]:
            out = model(to_input(data, prep).unsqueeze(0))
            outs.append(nn.functional.normalize(out, dim=1).detach().numpy())
        if len(outs) >= limit:
            break
    return np.concatenate(outs)


def dataloader_path(model: nn.Module, path: Path, prep: Preprocessing) -> np.ndarray:
    """(B) plain batched fp32 with a 2-worker DataLoader, under no_grad."""
    encoded = read_table(path, ["image"]).column("image").to_pylist()
    loader = DataLoader(EncodedImages(encoded, prep), batch_size=BATCH, num_workers=2)
    outs = []
    with torch.no_grad():
        for batch in loader:
            outs.append(nn.functional.normalize(model(batch), dim=1).numpy())
    return np.concatenate(outs)


def timed(fn, *args) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="64 images instead of 256")
    parser.add_argument("--images", type=int, help="how many food10 photos (default 256)")
    parser.add_argument(
        "--backbone",
        default="efficientnet_lite2",
        help="a registered backbone (default efficientnet_lite2; e.g. resnet50)",
    )
    parser.add_argument(
        "--random-init",
        action="store_true",
        help="skip the ImageNet weights (speed does not depend on them)",
    )
    args = parser.parse_args(argv)
    n = args.images or (64 if args.quick else 256)
    n_original = min(n, 16 if args.quick else 64)
    model, prep, weights = build_model(args.backbone, args.random_init)
    precision = resolve_precision("auto", torch.device("cpu"))
    with tempfile.TemporaryDirectory(prefix="bench-embedding-") as tmp:
        path = Path(tmp) / "test.parquet"
        os.environ[CACHE_ENV] = tmp  # an empty ONNX export cache: the export below is timed
        build_processed(n, path)
        warm = read_table(path, ["image"]).column("image").to_pylist()[:BATCH]

        embedder = Embedder(copy.deepcopy(model), prep, precision, batch_size=BATCH)
        embedder.embed_tensor(decode_batch(warm, prep))  # untimed: first-call kernel setup
        project, project_s = timed(embedder.embed_parquet, path)

        # what a CPU without fast bf16 gets: fp32, but still batched and channels_last
        fp32 = resolve_precision("fp32", torch.device("cpu"))
        fp32_embedder = Embedder(copy.deepcopy(model), prep, fp32, batch_size=BATCH)
        fp32_embedder.embed_tensor(decode_batch(warm, prep))
        fp32_vectors, fp32_s = timed(fp32_embedder.embed_parquet, path)

        try:
            onnx, export_s = timed(
                Embedder, copy.deepcopy(model), prep, precision, BATCH, True, "onnxruntime"
            )
        except UserError as error:
            onnx, onnx_skipped = None, str(error)
        if onnx is not None:
            onnx.embed_tensor(decode_batch(warm, prep))
            onnx_vectors, onnx_s = timed(onnx.embed_parquet, path)

        plain = copy.deepcopy(model).eval()
        with torch.no_grad():
            plain(torch.stack([to_input(b, prep) for b in warm]))
        reference, loader_s = timed(dataloader_path, plain, path, prep)

        original = copy.deepcopy(model).eval()
        original(to_input(warm[0], prep).unsqueeze(0))
        _, original_s = timed(original_path, original, path, prep, n_original)

    cosine = np.sum(project * reference, axis=1)
    ok = bool(cosine.min() >= MIN_COSINE)
    guards = [
        f"accuracy guard: cosine(project {precision.name}, fp32) mean {cosine.mean():.5f}, min "
        f"{cosine.min():.5f} (must be >= {MIN_COSINE}): {'PASS' if ok else 'FAIL'}"
    ]
    rows = [
        Row(
            f"Embedder {precision.name} b{BATCH} vs (A) original b1",
            n / project_s,
            n_original / original_s,
            "images/s",
        ),
        Row(
            f"Embedder {precision.name} b{BATCH} vs (B) DataLoader fp32",
            n / project_s,
            n / loader_s,
            "images/s",
        ),
    ]
    notes = [
        "(A) batch 1, fp32, eager, eval mode, autograd on (the original's path); "
        f"rate over the first {n_original} images",
        f"(B) DataLoader with 2 workers, batch {BATCH}, fp32, torch.no_grad()",
        f"project precision: {precision.name}, channels_last {precision.channels_last};"
        f" torch threads {torch.get_num_threads()}; each path warmed once, untimed",
    ]
    fp32_cosine = np.sum(fp32_vectors * reference, axis=1)
    fp32_ok = bool(fp32_cosine.min() >= MIN_COSINE_FP32)
    ok = ok and fp32_ok
    rows.append(
        Row(f"Embedder fp32 b{BATCH} vs (B) DataLoader fp32", n / fp32_s, n / loader_s, "images/s")
    )
    guards.append(
        f"accuracy guard: cosine(Embedder fp32 channels_last, fp32) min {fp32_cosine.min():.6f} "
        f"(must be >= {MIN_COSINE_FP32}): {'PASS' if fp32_ok else 'FAIL'}"
    )
    if onnx is None:
        notes.append(f"onnxruntime rows skipped: {onnx_skipped}")
    else:
        onnx_cosine = np.sum(onnx_vectors * reference, axis=1)
        onnx_ok = bool(onnx_cosine.min() >= MIN_COSINE_FP32)
        ok = ok and onnx_ok
        name = f"onnxruntime fp32 b{BATCH}"
        rows += [
            Row(f"{name} vs (A) original b1", n / onnx_s, n_original / original_s, "images/s"),
            Row(f"{name} vs (B) DataLoader fp32", n / onnx_s, n / loader_s, "images/s"),
            Row(
                f"{name} vs Embedder torch {precision.name}", n / onnx_s, n / project_s, "images/s"
            ),
        ]
        notes.append(
            f"onnxruntime {_ort_version()}: CPUExecutionProvider, "
            f"{onnx._session.get_session_options().intra_op_num_threads} intra-op threads; "
            f"ONNX export + session {export_s:.1f} s, once per stage, not in the rate"
        )
        guards.append(
            f"accuracy guard: cosine(onnxruntime fp32, fp32) mean {onnx_cosine.mean():.6f}, min "
            f"{onnx_cosine.min():.6f} (must be >= {MIN_COSINE_FP32}): "
            f"{'PASS' if onnx_ok else 'FAIL'}"
        )
    print_table(
        f"bench_embedding: {args.backbone} ({weights}), {n} images at {IMAGE_SIZE} px",
        rows,
        notes + guards,
    )
    return 0 if ok else 1


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


if __name__ == "__main__":
    raise SystemExit(main())
