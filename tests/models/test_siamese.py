import pytest
import torch

from siamese_cv.core.errors import UserError
from siamese_cv.models.siamese import build_model, list_heads, load_checkpoint, save_checkpoint


def trainable(model):
    return {n.split(".")[0] for n, p in model.backbone.named_parameters() if p.requires_grad}


def test_freeze_counts_stages_like_a_slice():
    model, _ = build_model("tiny", "seed", 16)
    assert model.freeze(None) == [] and trainable(model) == {"stem", "stage1", "stage2"}
    model, _ = build_model("tiny", "seed", 16)
    model.freeze(-1)
    assert trainable(model) == {"stage2"}
    model, _ = build_model("tiny", "seed", 16)
    model.freeze(10**6)
    assert model.backbone_frozen and all(p.requires_grad for p in model.head.parameters())


def test_frozen_batchnorm_stays_in_eval_mode_while_training():
    model, _ = build_model("tiny", "seed", 16)
    model.freeze(-1)
    model.train()
    bn_stem, bn_last = model.backbone.stem[1], model.backbone.stage2[1]
    assert not bn_stem.training and bn_last.training
    before = bn_stem.running_mean.clone()
    model(torch.randn(4, 3, 32, 32))
    assert torch.equal(bn_stem.running_mean, before)


def test_seed_head_is_linear_relu():
    model, _ = build_model("tiny", "seed", 16)
    assert [type(m).__name__ for m in model.head] == ["Linear", "ReLU"]
    assert set(list_heads()) >= {"seed", "linear", "mlp", "identity"}
    with pytest.raises(UserError, match="model.head"):
        build_model("tiny", "nope", 16)


def test_checkpoint_round_trip_gives_the_same_outputs(tmp_path):
    torch.manual_seed(3)
    model, _ = build_model("tiny", "linear", 8)
    model.eval()
    config = {"backbone": "tiny", "head": "linear", "embedding_dim": 8}
    fingerprint = save_checkpoint(model, config, tmp_path)
    loaded, saved = load_checkpoint(tmp_path)
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(model(x), loaded(x)) and saved["fingerprint"] == fingerprint
    assert not loaded.training
    with pytest.raises(UserError, match="run `dvc repro train`"):
        load_checkpoint(tmp_path / "missing")


def test_a_dropped_head_embeds_the_pooled_features_and_survives_a_checkpoint(tmp_path):
    torch.manual_seed(4)
    model, _ = build_model("tiny", "linear", 8)
    model.eval()
    x = torch.randn(3, 3, 32, 32)
    pooled, projected = model.backbone(x), model(x)
    model.drop_head()
    assert model.embedding_dim == model.feature_dim == pooled.shape[1] != projected.shape[1]
    assert not [k for k in model.state_dict() if k.startswith("head.")]
    assert torch.equal(model(x), pooled)
    config = {"backbone": "tiny", "head": "identity", "embedding_dim": model.embedding_dim}
    save_checkpoint(model, config, tmp_path)
    loaded, _ = load_checkpoint(tmp_path)
    assert torch.equal(loaded(x), pooled) and loaded.embedding_dim == model.feature_dim


def test_weights_and_config_from_different_runs_are_refused(tmp_path):
    """train writes the weights, then config.json: a kill in between must not pass as a model."""
    import json

    config = {"backbone": "tiny", "head": "linear", "embedding_dim": 8}
    torch.manual_seed(1)
    save_checkpoint(build_model("tiny", "linear", 8)[0], config, tmp_path)
    old_config = (tmp_path / "config.json").read_text()
    torch.manual_seed(2)
    save_checkpoint(build_model("tiny", "linear", 8)[0], config, tmp_path)
    (tmp_path / "config.json").write_text(old_config)
    assert json.loads(old_config)["fingerprint"]
    with pytest.raises(UserError, match="from different training runs"):
        load_checkpoint(tmp_path)
