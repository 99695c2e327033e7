"""The shared embedder on real photos with the real ImageNet Lite2: bf16 guard, order, overlap,
and the onnxruntime engine against torch fp32."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from conftest import food10_photos

from siamese_cv.core.errors import run_cli
from siamese_cv.inference.embedder import Embedder, decode_batch
from siamese_cv.inference.hardware import cpu_has_fast_bf16, resolve_precision
from siamese_cv.models.backbones import get_backbone_spec
from siamese_cv.models.siamese import EmbeddingNet, Preprocessing, build_model

PREP = Preprocessing(244, "stretch", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


@pytest.fixture(scope="module")
def lite2() -> torch.nn.Module:
    spec = get_backbone_spec("efficientnet_lite2")
    backbone = spec.build()
    backbone.module.load_state_dict(spec.fetch_imagenet())
    return backbone.module


@pytest.fixture(scope="module")
def photos() -> list[bytes]:
    from siamese_cv.data.images import prepare_image

    files = [f for group in food10_photos("test", 6, 3).values() for f in group]
    return [prepare_image(f.read_bytes(), PREP.image_size, "stretch", "jpeg", 95) for f in files]


def test_embed_batches_keeps_order_whatever_the_batch_size(lite2, photos):
    fp32 = resolve_precision("fp32", torch.device("cpu"))
    one_by_one = np.concatenate(
        [Embedder(lite2, PREP, fp32).embed_tensor(decode_batch([p], PREP)) for p in photos]
    )
    overlapped = Embedder(lite2, PREP, fp32, batch_size=5).embed_encoded(photos)
    assert overlapped.shape == (len(photos), 1280)
    assert np.allclose(np.linalg.norm(overlapped, axis=1), 1.0, atol=1e-5)
    # the same images in the same rows (batching changes float rounding only)
    assert np.min(np.sum(overlapped * one_by_one, axis=1)) > 0.9999


@pytest.mark.skipif(not cpu_has_fast_bf16(), reason="this CPU has no fast bf16 (AMX/AVX512-BF16)")
def test_bf16_embeddings_stay_within_the_cosine_guard_of_fp32(lite2, photos):
    device = torch.device("cpu")
    fp32 = Embedder(lite2, PREP, resolve_precision("fp32", device)).embed_encoded(photos)
    auto = resolve_precision("auto", device)
    assert auto.dtype is torch.bfloat16 and auto.channels_last
    bf16 = Embedder(lite2, PREP, auto).embed_encoded(photos)
    cosines = np.sum(fp32 * bf16, axis=1)
    assert cosines.min() > 0.99, cosines
    # and the ranking it induces is the same: each photo's nearest other photo agrees
    nearest = lambda e: np.argsort(-(e @ e.T), axis=1)[:, 1]  # noqa: E731
    assert np.mean(nearest(fp32) == nearest(bf16)) >= 0.9


@pytest.fixture(scope="module")
def lite2_net() -> torch.nn.Module:
    """Real ImageNet Lite2 with the default seed head: exactly what the stages embed with."""
    spec = get_backbone_spec("efficientnet_lite2")
    backbone = spec.build()
    backbone.module.load_state_dict(spec.fetch_imagenet())
    torch.manual_seed(0)
    return EmbeddingNet(backbone, "seed", 512)


def test_onnxruntime_engine_matches_torch_fp32(lite2_net, photos):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    fp32 = resolve_precision("fp32", torch.device("cpu"))
    reference = Embedder(lite2_net, PREP, fp32).embed_encoded(photos)
    # batch 5 over 18 photos: full and partial batches through the one dynamic-batch graph
    ort = Embedder(lite2_net, PREP, fp32, batch_size=5, engine="onnxruntime")
    assert ort._session.get_session_options().intra_op_num_threads == torch.get_num_threads()
    embedded = ort.embed_encoded(photos)
    assert embedded.dtype == np.float32 and embedded.shape == reference.shape == (len(photos), 512)
    assert np.allclose(np.linalg.norm(embedded, axis=1), 1.0, atol=1e-5)
    cosines = np.sum(embedded * reference, axis=1)
    assert cosines.min() > 0.999, cosines
    nearest = lambda e: np.argsort(-(e @ e.T), axis=1)[:, 1]  # noqa: E731
    assert np.array_equal(nearest(embedded), nearest(reference))
    one = ort.embed_tensor(decode_batch(photos[:1], PREP))  # batch 1, as siamese-search runs
    assert float(one[0] @ reference[0]) > 0.999


def test_missing_onnxruntime_stops_with_one_line_saying_what_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now fails
    model, _ = build_model("tiny", "seed", 8)
    fp32 = resolve_precision("fp32", torch.device("cpu"))

    def make(argv):
        Embedder(model, PREP, fp32, engine="onnxruntime")

    assert run_cli(make) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("error: engine onnxruntime: onnxruntime is not installed")
    assert "pip install onnxruntime==1.32.0 onnx==1.23.2 onnxscript==0.7.2" in err[0]
