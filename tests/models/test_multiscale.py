"""Test-time input sizes and ensembles: the wrappers resize inside the module, the embedder uses them."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from tiny_inputs import noise_photos, tiny_net
from torch.nn import functional as F

from siamese_cv.core.cache import CACHE_ENV
from siamese_cv.inference.embedder import Embedder
from siamese_cv.inference.hardware import resolve_precision
from siamese_cv.models.ensemble import Ensemble, MultiScale, Resized, at_sizes, resize
from siamese_cv.models.siamese import Preprocessing, load_checkpoint, save_checkpoint

PREP = Preprocessing(32, "stretch", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
FP32 = resolve_precision("fp32", torch.device("cpu"))


def test_resize_keeps_a_batch_at_its_size_and_interpolates_otherwise():
    x = torch.randn(2, 3, 32, 32)
    assert resize(x, 32) is x
    up = resize(x, 48)
    assert up.shape == (2, 3, 48, 48)
    torch.testing.assert_close(up, F.interpolate(x, size=(48, 48), mode="bilinear"))
    # shrinking is anti-aliased: a one-pixel checkerboard averages out instead of aliasing
    checker = ((torch.arange(48)[:, None] + torch.arange(48)[None, :]) % 2).float()
    checker = checker.expand(1, 3, 48, 48)
    aliased = F.interpolate(checker, size=(16, 16), mode="bilinear")
    assert aliased.std() > 0.45  # every third pixel: a checkerboard again
    assert (resize(checker, 16)[..., 1:-1, 1:-1] - 0.5).abs().max() < 0.1


def test_multi_scale_is_the_mean_of_each_sizes_normalised_embedding():
    model, x = tiny_net(), torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        got = MultiScale(model, (32, 48, 24))(x)
        want = [F.normalize(model(resize(x, s)), dim=1) for s in (32, 48, 24)]
        torch.testing.assert_close(got, sum(want) / 3)
        torch.testing.assert_close(Resized(model, 48)(x), model(resize(x, 48)))
    assert not torch.allclose(want[0], want[1], atol=1e-3)  # the sizes really differ


def test_an_ensemble_is_the_mean_over_every_member_and_its_sizes():
    first, second, x = tiny_net(0), tiny_net(1), torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        got = Ensemble([first, second], [(32, 48), ()])(x)  # () : the input's own size
        want = [F.normalize(first(resize(x, s)), dim=1) for s in (32, 48)]
        want.append(F.normalize(second(x), dim=1))
        torch.testing.assert_close(got, sum(want) / 3)
        assert not torch.allclose(want[0], want[2], atol=1e-3)  # the members really differ
    with pytest.raises(ValueError, match="2 members but 1 lists of sizes"):
        Ensemble([first, second], [(32,)])


def test_an_ensemble_checkpoint_loads_back_as_the_same_ensemble(tmp_path):
    ensemble = Ensemble([tiny_net(0), tiny_net(1)], [(32,), (48,)])
    members = [{"input_sizes": [32]}, {"input_sizes": [48]}]
    config = {"backbone": "tiny", "head": "linear", "embedding_dim": 16, "members": members}
    save_checkpoint(ensemble, config, tmp_path)
    loaded, saved = load_checkpoint(tmp_path)
    assert isinstance(loaded, Ensemble) and loaded.sizes == ((32,), (48,))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), ensemble(x))
    assert saved["members"] == members


def test_at_sizes_wraps_only_when_the_input_size_changes():
    model = tiny_net()
    assert at_sizes(model, (), 32) is model and at_sizes(model, (32,), 32) is model
    assert isinstance(at_sizes(model, (48,), 32), Resized)
    wrapped = at_sizes(model, (32, 48), 32)
    assert isinstance(wrapped, MultiScale) and "sizes=(32, 48)" in repr(wrapped)


def test_the_embedder_embeds_stored_photos_at_the_inference_sizes():
    model, encoded = tiny_net(), noise_photos()
    at_32 = Embedder(model, PREP, FP32).embed_encoded(encoded)
    at_48 = Embedder(model, replace(PREP, input_sizes=(48,)), FP32).embed_encoded(encoded)
    both = Embedder(model, replace(PREP, input_sizes=(32, 48)), FP32).embed_encoded(encoded)
    np.testing.assert_allclose(
        both, (at_32 + at_48) / np.linalg.norm(at_32 + at_48, axis=1)[:, None], atol=1e-6
    )
    assert not np.allclose(at_32, at_48, atol=1e-3)


def test_onnxruntime_runs_the_same_resizing_graph_as_torch(monkeypatch, tmp_path):
    pytest.importorskip("onnxruntime")

    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    model, encoded = tiny_net(), noise_photos()
    for sizes in [(48,), (32, 48), (24, 40)]:
        prep = replace(PREP, input_sizes=sizes)
        ort = Embedder(model, prep, FP32, engine="onnxruntime").embed_encoded(encoded)
        np.testing.assert_allclose(
            ort, Embedder(model, prep, FP32).embed_encoded(encoded), atol=1e-5
        )
    assert len(list((tmp_path / "onnx").glob("*.onnx"))) == 3  # each size set its own export
    ensemble = Ensemble([model, tiny_net(1)], [(32,), (48,)])
    ort = Embedder(ensemble, PREP, FP32, engine="onnxruntime").embed_encoded(encoded)
    np.testing.assert_allclose(
        ort, Embedder(ensemble, PREP, FP32).embed_encoded(encoded), atol=1e-5
    )


def test_preprocessing_records_the_sizes_and_reads_configs_without_them():
    prep = replace(PREP, input_sizes=(32, 48))
    assert Preprocessing.from_dict(prep.to_dict()) == prep and prep.sizes == (32, 48)
    old = {k: v for k, v in PREP.to_dict().items() if k != "input_sizes"}
    assert Preprocessing.from_dict(old) == PREP and PREP.sizes == (32,)
