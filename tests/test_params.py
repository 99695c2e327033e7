import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from siamese_cv.config import choices
from siamese_cv.config.cli import main as params_main
from siamese_cv.config.params import (
    Params,
    TrainParams,
    load_params,
    member_sizes,
    parse_freeze,
)
from siamese_cv.core.errors import ParamsError, UserError, run_cli

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_committed_params_are_the_original_recipe():
    params = load_params(ROOT / "params.yaml")
    assert params.data.source == "hf:Matthijs/snacks"
    assert params.model.backbone == "resnet50" and params.model.head == "seed"
    assert params.model.embedding_dim == 512
    assert (params.train.epochs, params.train.batch_size, params.train.lr) == (25, 32, 1e-4)
    assert (params.train.loss, params.train.margin, params.train.optimizer) == (
        "triplet_l2sq",
        1.0,
        "adam",
    )
    assert params.preprocess.image_size == 244 and params.triplets.test_draws == 10


def test_defaults_fill_missing_sections(tmp_path):
    assert load_params(write(tmp_path, {})) == Params()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"preprocess": {"image_size": 0}}, "preprocess.image_size: 0 must be >= 16"),
        ({"train": {"batch_size": -1}}, "train.batch_size: -1 must be >= 1"),
        ({"train": {"lr": "fast"}}, "train.lr: expected a number"),
        ({"train": {"epochs": 2.5}}, "train.epochs: expected an integer"),
        ({"train": {"colour": 1}}, "unknown key train.colour; known keys of train: epochs"),
        ({"extra": {}}, "unknown key extra"),
        (
            {"model": {"backbone": "resnet51"}},
            "model.backbone: unknown backbone 'resnet51'; known: ",
        ),
        (
            {"preprocess": {"resize": "squash"}},
            "preprocess.resize: 'squash' is not one of stretch, shorter_side_crop",
        ),
        ({"train": {"freeze": "most"}}, "train.freeze: 'most' is not one of none, all"),
        ({"preprocess": {"shards": 0}}, "preprocess.shards: 0 must be >= 1"),
        ({"export": {"shards": "four"}}, "export.shards: expected an integer, got 'four'"),
        ({"data": {"streaming": "yes"}}, "data.streaming: expected true or false, got 'yes'"),
        ({"train": {"miner": "semihard"}}, "set triplets.sampler: pk"),
        (
            {"export": {"splits": ["holdout"]}},
            "export.splits: 'holdout' is not one of train, validation, test",
        ),
        (
            {"evaluate": {"engine": "tensorrt"}},
            "evaluate.engine: 'tensorrt' is not one of torch, onnxruntime",
        ),
        ({"export": {"engine": "onnx"}}, "export.engine: 'onnx' is not one of torch, onnxruntime"),
        (
            {"export": {"engine": "onnxruntime", "precision": "bf16"}},
            "export.engine: onnxruntime runs the model in fp32 on the CPU, not bf16; set "
            "export.precision: auto or fp32",
        ),
        (
            {"model": {"inference_sizes": [244, "big"]}},
            "model.inference_sizes: 'big' must be a whole number of pixels, 16 to 2048",
        ),
        (
            {"model": {"inference_sizes": [8]}},
            "model.inference_sizes: 8 must be a whole number of pixels, 16 to 2048",
        ),
        ({"model": {"inference_sizes": 340}}, "model.inference_sizes: expected a list"),
        ({"model": {"inference_sizes": [340, 340]}}, "model.inference_sizes: [340, 340] lists"),
        ({"train": {"proxy_alpha": 0}}, "train.proxy_alpha: 0.0 must be > 0.0"),
        (
            {"model": {"inference_sizes": [[244], [372]]}},
            "model.inference_sizes: 2 lists of sizes for train.members: 1",
        ),
        (
            {"model": {"inference_sizes": [[244], 372]}, "train": {"members": 2}},
            "model.inference_sizes: [[244], 372] mixes sizes and lists",
        ),
        (
            {"model": {"inference_sizes": [[244], [372, 372]]}, "train": {"members": 2}},
            "model.inference_sizes: [372, 372] lists a size twice",
        ),
        ({"train": {"members": 0}}, "train.members: 0 must be >= 1"),
        (
            {"train": {"epochs": 8, "schedule_epochs": 6}},
            "train.schedule_epochs: 6 is shorter than train.epochs: 8",
        ),
    ],
)
def test_bad_values_name_the_key(tmp_path, data, message):
    with pytest.raises(ParamsError) as error:
        load_params(write(tmp_path, data))
    assert message in str(error.value)


def test_each_member_gets_its_own_sizes_or_the_shared_ones(tmp_path):
    shared = {"model": {"inference_sizes": [244, 372]}, "train": {"members": 3}}
    assert member_sizes(load_params(write(tmp_path, shared))) == [(244, 372)] * 3
    own = {"model": {"inference_sizes": [[244], [372, 404]]}, "train": {"members": 2}}
    assert member_sizes(load_params(write(tmp_path, own))) == [(244,), (372, 404)]
    assert member_sizes(Params()) == [()]


def test_engine_defaults_to_torch_and_accepts_onnxruntime(tmp_path):
    assert load_params(ROOT / "params.yaml").evaluate.engine == "torch"
    assert Params().export.engine == "torch"
    loaded = load_params(
        write(
            tmp_path, {"evaluate": {"engine": "onnxruntime"}, "export": {"engine": "onnxruntime"}}
        )
    )
    assert loaded.evaluate.engine == loaded.export.engine == "onnxruntime"


def test_freeze_values():
    assert parse_freeze("none") is None
    assert parse_freeze("all") >= 100
    assert parse_freeze("-2") == -2 and parse_freeze(3) == 3


def test_check_command_prints_one_line_and_fails(tmp_path, capsys):
    path = write(tmp_path, {"preprocess": {"image_size": 0}})
    assert run_cli(params_main, ["check", "--params", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: preprocess.image_size")
    assert run_cli(params_main, ["check", "--params", str(ROOT / "params.yaml")]) == 0


def test_apply_profile_keeps_comments_and_validates(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text())
    assert (
        run_cli(
            params_main,
            [
                "apply",
                str(ROOT / "profiles/offline.yaml"),
                "--params",
                str(params),
                "--set",
                "data.source=/some/folder",
            ],
        )
        == 0
    )
    text = params.read_text()
    assert "# the dataset card's 244" in text
    loaded = load_params(params)
    assert loaded.model.backbone == "efficientnet_lite2" and loaded.data.source == "/some/folder"
    before = params.read_text()
    assert (
        run_cli(params_main, ["apply", "--params", str(params), "--set", "train.batch_size=-1"])
        == 2
    )
    assert params.read_text() == before  # a bad override leaves the file as it was


def test_params_and_its_command_import_without_torch(tmp_path):
    """Checking params.yaml (every stage's first step) must not pay for importing torch."""
    code = (
        "import sys\n"
        "from siamese_cv.config.cli import main\n"
        f"assert main(['check', '--params', {str(ROOT / 'params.yaml')!r}]) == 0\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'timm'))\n"
        "assert not heavy, heavy\n"
        "assert not [m for m in sys.modules if m.startswith('siamese_cv.models')]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)


def test_the_tiny_test_backbone_is_accepted_but_never_offered(tmp_path):
    from siamese_cv.models.backbones import get_backbone_spec, list_backbones

    assert load_params(write(tmp_path, {"model": {"backbone": "tiny"}})).model.backbone == "tiny"
    assert "tiny" in list_backbones(hidden=True) and "tiny" not in list_backbones()
    with pytest.raises(ParamsError) as from_params:
        load_params(write(tmp_path, {"model": {"backbone": "vgg16"}}))
    with pytest.raises(UserError) as from_registry:
        get_backbone_spec("vgg16")
    for error in (from_params, from_registry):
        assert "tiny" not in str(error.value)
        assert f"known: {', '.join(list_backbones())}, or timm:<name>" in str(error.value)


def _registries() -> list[tuple[str, list[str], tuple[str, ...]]]:
    from siamese_cv.models.backbones import list_backbones
    from siamese_cv.models.pooling import list_poolings
    from siamese_cv.models.siamese import list_heads
    from siamese_cv.training.losses import list_losses, list_miners

    return [
        ("model.backbone", list_backbones(), choices.BACKBONES),
        ("model.head", list_heads(), choices.HEADS),
        ("model.pooling", list_poolings(), choices.POOLINGS),
        ("train.loss", list_losses(), choices.LOSSES),
        ("train.miner", list_miners(), choices.MINERS),
    ]


def test_every_choice_params_offers_is_what_its_registry_builds(tmp_path):
    for key, registered, declared in _registries():
        assert sorted(registered) == sorted(declared), key
        section, name = key.split(".")
        model = Params.model_fields[section].annotation
        annotation = model.model_fields[name].annotation
        if name != "backbone":  # a Literal of exactly the registry's names
            assert set(typing.get_args(annotation)) == set(registered), key
            with pytest.raises(ParamsError) as error:
                load_params(write(tmp_path, {section: {name: "nonesuch"}}))
            assert str(error.value) == f"{key}: 'nonesuch' is not one of {', '.join(declared)}"


def test_a_registry_that_disagrees_with_the_declared_names_fails_at_import():
    from siamese_cv.models.backbones import register_backbone

    choices.check_registered("head", ["seed", "linear"], ("seed", "linear"))
    with pytest.raises(
        RuntimeError, match=r"registered only \['cosine'\], declared only \['mlp'\]"
    ):
        choices.check_registered("head", ["seed", "cosine"], ("seed", "mlp"))
    with pytest.raises(ValueError, match="declare it in siamese_cv.config.choices"):
        register_backbone("vgg16")(lambda: None)


def test_params_are_frozen_and_reject_coercion():
    params = Params()
    with pytest.raises(ValidationError):
        params.train.epochs = 3  # type: ignore[misc]
    with pytest.raises(ValidationError):
        TrainParams(epochs="3")  # strict: a string is not an integer
    assert TrainParams(lr=1).lr == 1.0 and isinstance(TrainParams(lr=1).lr, float)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"evaluate": {"recall_at": [1, 0]}}, "evaluate.recall_at: 0 must be >= 1"),
        ({"export": {"splits": []}}, "export.splits: list at least one of train, validation"),
        ({"train": 5}, "train: expected a mapping, got 5"),
        ({"train": {"freeze": 1.5}}, "train.freeze: 1.5 is not one of none, all"),
        ({"search": {"index": "hnsw"}}, "search.index: 'hnsw' is not one of exact, ivf"),
        ({"train": {"device": "gpu"}}, "train.device: 'gpu' is not one of auto, cpu, cuda"),
    ],
)
def test_more_bad_values_give_one_line_naming_the_key(tmp_path, data, message):
    with pytest.raises(ParamsError) as error:
        load_params(write(tmp_path, data))
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_an_empty_section_takes_the_defaults(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train:\nmodel:\n  head: mlp\n")
    loaded = load_params(path)
    assert loaded.train == TrainParams() and loaded.model.head == "mlp"


def test_apply_names_the_known_keys_of_a_section(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text("train:\n  epochs: 3\n")
    before = params.read_text()
    for setting, message in [
        ("train.colour=red", "error: train.colour: unknown key; known keys of train: epochs, "),
        ("train.lr=0.1", "does not write this key; add it under train: (default 0.0001)"),
        ("trian.epochs=2", "error: trian.epochs: unknown section 'trian'; known sections: data"),
    ]:
        assert run_cli(params_main, ["apply", "--params", str(params), "--set", setting]) == 2
        assert message in capsys.readouterr().err
        assert params.read_text() == before
