"""Inference after training: ONNX Runtime's settings, the batch size and decoding overlap.

export_gallery and evaluate embed every photo with the offline profile's ensemble (two
efficientnet_lite2 networks, at 244 and 372 px: about 3.3 passes of 244 px a photo) through the
onnxruntime engine. This times that embedding, end to end from processed JPEG bytes, in each
alternative setting against today's (`OrtSettings()`, the stages' batch of 64, decoding the next
batch in a thread while ONNX Runtime runs the current one), and checks that each keeps the same
vectors: the least cosine to today's must be at least 0.99999. Session creation (graph
optimisation) is timed apart: it happens once per stage.

The ensemble's members are both the ImageNet weights: speed does not depend on the values.

Run: python benchmarks/bench_onnx_settings.py [--quick] [--images N]
"""

from __future__ import annotations

import argparse
import functools
import time
from dataclasses import replace

import numpy as np
import torch
from _common import Row, food10_files, print_table

from siamese_cv.data.images import prepare_image
from siamese_cv.inference.embedder import Embedder, OrtSettings, decode_batch
from siamese_cv.inference.hardware import resolve_precision
from siamese_cv.models.backbones import get_backbone_spec
from siamese_cv.models.ensemble import Ensemble
from siamese_cv.models.siamese import EmbeddingNet, Preprocessing

MIN_COSINE = 0.99999
TODAY_BATCH = 64


def ensemble() -> Ensemble:
    state = get_backbone_spec("efficientnet_lite2").fetch_imagenet()
    members = []
    for _ in range(2):
        backbone = get_backbone_spec("efficientnet_lite2").build()
        backbone.module.load_state_dict(state)
        members.append(EmbeddingNet(backbone, "identity", 1280))
    return Ensemble(members, [(244,), (372,)])


def timed_embedding(
    model: Ensemble, photos: list[bytes], settings: OrtSettings, batch: int, overlap: bool
) -> tuple[float, float, np.ndarray]:
    """(session seconds, embedding seconds, vectors) for one setting."""
    prep = Preprocessing(244, "stretch", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    cpu = resolve_precision("fp32", torch.device("cpu"))
    started = time.perf_counter()
    embedder = Embedder(model, prep, cpu, batch, engine="onnxruntime", ort=settings)
    session_s = time.perf_counter() - started
    embedder.embed_encoded(photos[:batch])  # warm-up: first-run allocations
    started = time.perf_counter()
    if overlap:
        vectors = embedder.embed_encoded(photos)
    else:
        chunks = [photos[i : i + batch] for i in range(0, len(photos), batch)]
        vectors = np.concatenate([embedder.embed_tensor(decode_batch(c, prep)) for c in chunks])
    return session_s, time.perf_counter() - started, vectors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="64 photos and fewer settings")
    parser.add_argument("--images", type=int, default=256, help="photos to embed (default 256)")
    args = parser.parse_args()
    n = 64 if args.quick else args.images
    photos = [
        prepare_image(path.read_bytes(), 244, "stretch", "jpeg", 95)
        for _, _, path in food10_files(n)
    ]
    model = ensemble().eval()
    today = OrtSettings()
    threads = torch.get_num_threads()
    candidates = [
        ("idle threads spin", replace(today, spinning=True), TODAY_BATCH, True),
        ("graph optimisation: extended", replace(today, optimization="extended"), TODAY_BATCH, True),
        ("graph optimisation: basic", replace(today, optimization="basic"), TODAY_BATCH, True),
        ("batch 16", today, 16, True),
        ("batch 32", today, 32, True),
        ("batch 32, idle threads spin", replace(today, spinning=True), 32, True),
        ("batch 128", today, 128, True),
        ("decoding in the same thread", today, TODAY_BATCH, False),
        (f"{max(threads - 1, 1)} intra-op threads", replace(today, threads=max(threads - 1, 1)), TODAY_BATCH, True),
    ]  # fmt: skip
    if args.quick:
        candidates = candidates[:1] + candidates[-2:-1]
    run = functools.partial(timed_embedding, model, photos)
    run(today, TODAY_BATCH, True)  # exports the ensemble to ONNX (cached for the others)
    base_session, base_s, base_vectors = run(today, TODAY_BATCH, True)
    results = [(c, run(c[1], c[2], c[3])) for c in candidates]
    # today's again, last: the faster of its two runs is the baseline, so drift favours it
    again_session, again_s, _ = run(today, TODAY_BATCH, True)
    base_s, base_session = min(base_s, again_s), min(base_session, again_session)
    rows, notes = [], []
    for (name, *_), (session_s, seconds, vectors) in results:
        cosine = float(np.min(np.sum(vectors * base_vectors, axis=1)))
        rows.append(Row(f"{name} (least cosine {cosine:.6f})", n / seconds, n / base_s, "img/s"))
        notes.append(f"{name}: session {session_s:.1f} s (today's {base_session:.1f} s)")
        if cosine < MIN_COSINE:
            notes.append(f"{name}: vectors moved: least cosine {cosine:.6f} < {MIN_COSINE}")
    notes.insert(
        0,
        f"today: {OrtSettings()}, batch {TODAY_BATCH}, decoding overlapped, {threads} threads: "
        f"{n / base_s:.1f} photos/s ({n} photos, two networks at 244 and 372 px)",
    )
    print_table("onnxruntime embedding with the profile's ensemble", rows, notes)


if __name__ == "__main__":
    main()
