from pathlib import Path

import pytest
import yaml

from siamese_cv.config.cli import main as params_main
from siamese_cv.config.params import Params, load_params, member_sizes, parse_freeze
from siamese_cv.core.errors import ParamsError, run_cli

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
