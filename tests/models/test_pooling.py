"""`model.pooling`: GeM and avg+max replace a backbone's global pooling everywhere it is used."""

import pytest
import torch

from siamese_cv.core.errors import UserError
from siamese_cv.models.backbones import Backbone, get_backbone_spec
from siamese_cv.models.pooling import AvgMax, GeM
from siamese_cv.models.siamese import build_model, load_checkpoint, save_checkpoint


def test_gem_is_the_power_mean_of_each_channel():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 2, 2).repeat(2, 3, 1, 1)
    gem = GeM()
    expected = ((1 + 8 + 27 + 64) / 4) ** (1 / 3)  # p = 3 to start with
    assert torch.allclose(gem(x), torch.full((2, 3), expected))
    with torch.no_grad():
        gem.p.fill_(1.0)
    assert torch.allclose(gem(x), torch.full((2, 3), 2.5))  # p = 1: the average
    with torch.no_grad():
        gem.p.fill_(60.0)
    assert torch.allclose(gem(x), torch.full((2, 3), 4.0), atol=0.1)  # large p: the maximum
    assert GeM(flatten=False)(x).shape == (2, 3, 1, 1)
    assert torch.allclose(AvgMax()(x), torch.full((2, 3), (2.5 + 4.0) / 2))


@pytest.mark.parametrize("name", ["tiny", "resnet18", "efficientnet_lite0"])
@pytest.mark.parametrize("kind", ["gem", "avgmax"])
def test_the_pooling_is_replaced_in_the_network_and_in_its_chain(name, kind):
    torch.manual_seed(0)
    model, backbone = build_model(name, "linear", 8, kind)
    pool = GeM if kind == "gem" else AvgMax
    assert sum(isinstance(m, pool) for m in model.modules()) == 1
    x = torch.rand(2, 3, 64, 64)
    model.eval()
    assert backbone.module(x).shape == (2, backbone.feature_dim)
    # training's frozen-prefix cache runs the chain: it must pool the same way
    model.freeze(1)
    prefix, rest = model.split_frozen()
    assert torch.allclose(rest(prefix(x)), model(x), atol=1e-5)
    if kind == "gem":  # p is learned with the unfrozen stages, also behind a cached prefix
        assert any(
            p is backbone.module.get_submodule(backbone.pool_attr).p for p in rest.parameters()
        )
        assert model.backbone.get_submodule(backbone.pool_attr).p.requires_grad


def test_a_learned_exponent_survives_the_checkpoint(tmp_path):
    torch.manual_seed(1)
    model, backbone = build_model("tiny", "linear", 8, "gem")
    with torch.no_grad():
        backbone.module.pool.p.fill_(4.25)
    model.eval()
    config = {"backbone": "tiny", "head": "linear", "embedding_dim": 8, "pooling": "gem"}
    save_checkpoint(model, config, tmp_path)
    loaded, _ = load_checkpoint(tmp_path)
    x = torch.rand(3, 3, 32, 32)
    assert loaded.backbone.pool.p.item() == 4.25 and torch.equal(model(x), loaded(x))


def test_avg_keeps_the_backbones_own_pooling_and_old_configs_load(tmp_path):
    model, backbone = build_model("tiny", "linear", 8, "avg")
    assert type(backbone.module.pool).__name__ == "Sequential"
    save_checkpoint(model, {"backbone": "tiny", "head": "linear", "embedding_dim": 8}, tmp_path)
    loaded, _ = load_checkpoint(tmp_path)  # a config from before model.pooling existed
    assert type(loaded.backbone.pool).__name__ == "Sequential"


def test_a_backbone_without_a_pooling_module_says_to_use_avg():
    net = get_backbone_spec("tiny").build().module
    backbone = Backbone(net, [["stem"]], 32, (0.5,) * 3, (0.5,) * 3)
    backbone.set_pooling("avg")
    with pytest.raises(UserError, match="model.pooling: gem .* use model.pooling: avg"):
        backbone.set_pooling("gem")


@pytest.mark.parametrize("kind", ["gem", "avgmax"])
def test_the_onnxruntime_engine_pools_as_torch_does(kind):
    pytest.importorskip("onnxruntime")
    from siamese_cv.inference.embedder import Embedder
    from siamese_cv.inference.hardware import resolve_precision
    from siamese_cv.models.siamese import Preprocessing

    torch.manual_seed(2)
    model, backbone = build_model("tiny", "linear", 8, kind)
    if kind == "gem":
        with torch.no_grad():
            backbone.module.pool.p.fill_(2.5)  # a learned value, not the initial one
    prep = Preprocessing(32, "stretch", (0.5,) * 3, (0.5,) * 3)
    fp32 = resolve_precision("fp32", torch.device("cpu"))
    x = torch.rand(4, 3, 32, 32)
    ort = Embedder(model, prep, fp32, engine="onnxruntime").embed_tensor(x)
    assert torch.allclose(
        torch.from_numpy(ort),
        torch.from_numpy(Embedder(model, prep, fp32).embed_tensor(x)),
        atol=1e-5,
    )
