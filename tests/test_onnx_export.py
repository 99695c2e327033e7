"""ONNX exports are cached by content: made once, never confused with another model's."""

import copy

import numpy as np
import pytest
import torch
from tiny_inputs import noise_photos, tiny_net

from siamese_cv.core.cache import CACHE_ENV
from siamese_cv.inference import onnx_export
from siamese_cv.inference.embedder import Embedder
from siamese_cv.inference.hardware import resolve_precision
from siamese_cv.models.siamese import Preprocessing

pytest.importorskip("onnxruntime")

PREP = Preprocessing(32, "stretch", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
FP32 = resolve_precision("fp32", torch.device("cpu"))


@pytest.fixture
def cache(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    calls = []
    real = onnx_export._export
    monkeypatch.setattr(onnx_export, "_export", lambda *a: calls.append(a) or real(*a))
    return tmp_path / "onnx", calls


def test_an_export_is_made_once_and_found_again_by_content(cache):
    directory, exports = cache
    model = tiny_net()
    first = Embedder(model, PREP, FP32, engine="onnxruntime").embed_encoded(noise_photos())
    again = Embedder(copy.deepcopy(model), PREP, FP32, engine="onnxruntime").embed_encoded(
        noise_photos()
    )
    assert len(exports) == 1 and len(list(directory.glob("*.onnx"))) == 1
    np.testing.assert_array_equal(again, first)
    torch_fp32 = Embedder(model, PREP, FP32).embed_encoded(noise_photos())
    np.testing.assert_allclose(first, torch_fp32, atol=1e-5)

    with torch.no_grad():
        model.head[0].weight[0, 0] += 1.0  # one weight changed: another model, another file
    changed = Embedder(model, PREP, FP32, engine="onnxruntime").embed_encoded(noise_photos())
    assert len(exports) == 2 and len(list(directory.glob("*.onnx"))) == 2
    assert not np.allclose(changed, first, atol=1e-3)
    np.testing.assert_allclose(
        changed, Embedder(model, PREP, FP32).embed_encoded(noise_photos()), atol=1e-5
    )


def test_the_key_covers_weights_buffers_and_input_size():
    model = tiny_net()
    key = onnx_export.export_key(model, 32)
    assert onnx_export.export_key(copy.deepcopy(model), 32) == key
    assert onnx_export.export_key(model, 64) != key
    assert onnx_export.export_key(tiny_net(seed=1), 32) != key
    moved = copy.deepcopy(model)
    bn = next(m for m in moved.modules() if isinstance(m, torch.nn.BatchNorm2d))
    bn.running_mean += 0.5  # a buffer, not a parameter
    assert onnx_export.export_key(moved, 32) != key


def test_the_key_covers_the_helpers_of_this_packages_modules():
    from siamese_cv.models.ensemble import MultiScale

    # a helper that MultiScale.forward calls is part of what the key hashes ...
    assert "def resize(" in onnx_export.source_of(MultiScale)
    # ... while a library's class contributes its forward (its version is in the key)
    conv = onnx_export.source_of(torch.nn.Conv2d)
    assert conv.lstrip().startswith("def forward(") and "class Conv2d" not in conv
    key = onnx_export.export_key(MultiScale(tiny_net(), (32, 48)), 32)
    assert key != onnx_export.export_key(MultiScale(tiny_net(), (32, 40)), 32)


def test_only_the_most_recently_used_exports_are_kept(cache, monkeypatch):
    directory, _ = cache
    monkeypatch.setattr(onnx_export, "KEEP", 2)
    models = [tiny_net(seed) for seed in range(3)]
    for model in models:
        with onnx_export.exported(model, 32):
            pass
    kept = {p.stem for p in directory.glob("*.onnx")}
    assert kept == {onnx_export.export_key(m, 32) for m in models[1:]}


def test_a_cache_that_cannot_be_written_still_exports(cache, monkeypatch, tmp_path):
    _, exports = cache
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the cache directory would go")
    monkeypatch.setenv(CACHE_ENV, str(blocker))
    model = tiny_net()
    out = Embedder(model, PREP, FP32, engine="onnxruntime").embed_encoded(noise_photos())
    np.testing.assert_allclose(
        out, Embedder(model, PREP, FP32).embed_encoded(noise_photos()), atol=1e-5
    )
    Embedder(model, PREP, FP32, engine="onnxruntime")
    assert len(exports) == 2 and blocker.read_text().startswith("a file")


def test_without_a_home_directory_nothing_is_cached_but_the_engine_runs(cache, monkeypatch):
    _, exports = cache
    for name in (CACHE_ENV, "XDG_CACHE_HOME", "HOME"):
        monkeypatch.delenv(name, raising=False)

    def no_home():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(onnx_export.Path, "home", staticmethod(no_home))
    assert onnx_export.cache_dir() is None
    model = tiny_net()
    out = Embedder(model, PREP, FP32, engine="onnxruntime").embed_encoded(noise_photos())
    np.testing.assert_allclose(
        out, Embedder(model, PREP, FP32).embed_encoded(noise_photos()), atol=1e-5
    )
    Embedder(model, PREP, FP32, engine="onnxruntime")
    assert len(exports) == 2  # exported each time: there is nowhere to keep it


def test_the_cache_follows_xdg_cache_home(monkeypatch, tmp_path):
    monkeypatch.delenv(CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert onnx_export.cache_dir() == tmp_path / "siamese-cv" / "onnx"
