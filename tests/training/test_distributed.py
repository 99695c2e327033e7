"""Two CPU processes (gloo) train like one process on the same data, and the stage runs as two.

The data and network are tests/training/test_loop.py's: coloured noise images and the `tiny`
backbone. Each scenario trains once in one process and once in two spawned ranks; the ranks
must end with identical weights (DDP all-reduces gradients, so they take identical steps).

Against one process the tolerance depends on what the trainable part computes per batch:
- only the head trains (linear, no BatchNorm) on features cached from the frozen backbone: the
  gradient of each rank's share, weighted and averaged by DDP, is the gradient of the whole step,
  so the runs differ only in the order floating-point sums are taken (~1e-7 relative per step).
  Weights agree to 1e-5 (measured: ~1e-7 and ~1e-6) and validation metrics to 1e-4 after three
  Adam epochs, for fixed triplets split unevenly (5 triplets: 3 + 2) and for P x K batches
  mined across ranks (one class per rank, so every negative comes from the other rank).
- a BatchNorm stage trains too: each rank normalises with statistics of its half of the batch,
  not of the whole batch, so the runs take different steps; both must still learn the colours,
  and their best validation MAP@R may differ by at most 0.15.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from test_loop import PREP, split

from siamese_cv.config.params import Params, TrainParams, load_params
from siamese_cv.core.errors import ParamsError, UserError
from siamese_cv.data.triplets import pk_batches, random_triplets, rng_for
from siamese_cv.inference.hardware import resolve_precision
from siamese_cv.models.siamese import build_model
from siamese_cv.training.distributed import SINGLE, World
from siamese_cv.training.launch import RankUserError, launch
from siamese_cv.training.launch import train as launch_train
from siamese_cv.training.loop import fit
from siamese_cv.training.settings import FitData, FitSettings, Schedule
from siamese_cv.training.sharding import share_of

WORLD = 2
EPOCHS = 3
FREEZE_ALL = 10**6
SCENARIOS = {
    # name: (train params, frozen backbone stages, P x K batches?)
    "head_triplets": (TrainParams(epochs=EPOCHS, lr=3e-3, workers=0), FREEZE_ALL, False),
    "head_pk_cross_rank": (
        TrainParams(
            epochs=EPOCHS,
            lr=3e-3,
            workers=0,
            loss="triplet_cosine",
            miner="semihard",
            margin=0.2,
            cross_rank_negatives=True,
        ),
        FREEZE_ALL,
        True,
    ),
    "batchnorm_triplets": (TrainParams(epochs=EPOCHS, lr=3e-3, workers=0), 2, False),
}
TIGHT = ("head_triplets", "head_pk_cross_rank")


def _fit(name: str, world: World) -> tuple[dict[str, torch.Tensor], list[dict]]:
    params, freeze, pk = SCENARIOS[name]
    torch.manual_seed(0)
    model, _ = build_model("tiny", "linear", 16)
    model.freeze(freeze)
    train, val = split(8, 0), split(4, 1)
    if pk:
        # 2 of the 3 classes per step: one per rank, so only cross-rank mining finds negatives
        epochs = [list(pk_batches(train.labels, 2, 4, rng_for(0, "pk", e))) for e in range(EPOCHS)]
    else:  # 24 triplets in 5 steps: 5, 5, 5, 5, 4, so ranks get 3 + 2 triplets of most steps
        triplets = [random_triplets(train.labels, rng_for(0, "train", e)) for e in range(EPOCHS)]
        epochs = [[t.T.ravel() for t in np.array_split(epoch, 5)] for epoch in triplets]
    val_triplets = random_triplets(val.labels, rng_for(0, "validation", 0))
    precision = resolve_precision("fp32", torch.device("cpu"))
    result = fit(
        model,
        PREP,
        FitData(train, val, Schedule(epochs, not pk), val_triplets),
        FitSettings(params, precision, batch_size_eval=16, world=world),
    )
    assert result.cached_features
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    return state, result.history


def _rank(rank: int, out: str, store: str) -> None:
    """One spawned rank: every scenario in turn, weights and history written to `out`."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        for name in SCENARIOS:
            state, history = _fit(name, World(rank, rank, WORLD, WORLD))
            save_file(state, f"{out}/{name}-{rank}.safetensors")
            Path(f"{out}/{name}-{rank}.json").write_text(json.dumps(history))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict]:
    """Per scenario: the single-process run, and each rank's weights and history."""
    out = tmp_path_factory.mktemp("ranks")
    torch.multiprocessing.spawn(_rank, args=(str(out), str(out / "store")), nprocs=WORLD)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the ranks: the same summation order in the same kernels
    try:
        single = {name: _fit(name, SINGLE) for name in SCENARIOS}
    finally:
        torch.set_num_threads(threads)
    return {
        name: {
            "single": single[name],
            "ranks": [
                (
                    load_file(str(out / f"{name}-{r}.safetensors")),
                    json.loads((out / f"{name}-{r}.json").read_text()),
                )
                for r in range(WORLD)
            ],
        }
        for name in SCENARIOS
    }


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_both_ranks_end_with_identical_weights(runs, name):
    (first, first_history), (second, second_history) = runs[name]["ranks"]
    assert first.keys() == second.keys() and not any(k.startswith("module.") for k in first)
    for key in first:
        assert torch.equal(first[key], second[key]), key
    assert [h["val_map_at_r"] for h in first_history] == [h["val_map_at_r"] for h in second_history]
    assert [h["train_loss"] for h in first_history] == [h["train_loss"] for h in second_history]


@pytest.mark.slow
@pytest.mark.parametrize("name", TIGHT)
def test_two_ranks_train_like_one_process(runs, name):
    single_state, single_history = runs[name]["single"]
    state, history = runs[name]["ranks"][0]
    for key, value in single_state.items():
        if name == "head_triplets" and key == "head.0.bias":
            # cancels in a - p and a - n under the squared-L2 triplet loss: its true gradient is 0,
            # and Adam scales rounding noise to full-size steps, in one process as in two
            continue
        torch.testing.assert_close(state[key], value, rtol=1e-5, atol=1e-5, msg=key)
    for one, two in zip(single_history, history, strict=True):
        for metric in ("train_loss", "val_loss"):
            assert two[metric] == pytest.approx(one[metric], abs=1e-4), (metric, one, two)
        # rankings: weights equal to rounding (above) can still swap one near-tied pair, which
        # moves MAP@R by about 0.005 on this validation set (seen with channels_last kernels)
        for metric in ("val_map_at_r", "val_triplet_accuracy"):
            assert two[metric] == pytest.approx(one[metric], abs=0.01), (metric, one, two)


@pytest.mark.slow
def test_batchnorm_on_half_batches_still_learns_like_one_process(runs):
    single = max(h["val_map_at_r"] for h in runs["batchnorm_triplets"]["single"][1])
    ranks = max(h["val_map_at_r"] for h in runs["batchnorm_triplets"]["ranks"][0][1])
    assert ranks == pytest.approx(single, abs=0.15), (single, ranks)
    assert min(single, ranks) > 0.7


def _fail_in_rank_one(kind: str) -> int:
    import os

    if os.environ["RANK"] == "1":
        if kind == "user":
            raise RankUserError("train.lr: too fast")
        raise ValueError("a bug in rank 1")
    return 0


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kind", "line"),
    [
        ("user", "rank 1 of 2: train.lr: too fast"),
        ("bug", "rank 1 of 2 failed with ValueError: a bug in rank 1; its traceback is above"),
    ],
)
def test_a_failed_rank_fails_the_launch_with_one_line(kind, line, capfd, caplog):
    with pytest.raises(UserError) as raised:
        launch(_fail_in_rank_one, (kind,), 2)
    assert str(raised.value) == line
    err = capfd.readouterr().err + caplog.text  # the bug's traceback is logged as an error
    assert ("Traceback" in err) == (kind == "bug"), err


@pytest.mark.slow
def test_two_devices_through_the_stage_write_a_loadable_checkpoint(tmp_path):
    from pipeline_project import copy_photos, make_project, run

    from siamese_cv.models.siamese import load_checkpoint

    photos = copy_photos(tmp_path / "photos", train=6, test=3, classes=3)
    root = make_project(
        tmp_path / "project",
        photos,
        # a frozen stage: both ranks memory-map the features stage's outputs
        {"train.devices": "2", "train.epochs": "1", "train.precision": "fp32", "train.freeze": "1"},
    )
    for stage in ("download", "preprocess", "sample_triplets", "features"):
        run(root, "python", f"stages/{stage}.py")
    out = run(root, "python", "stages/train.py")
    assert "train: best epoch 1/1" in out.stdout, out.stdout
    model, config = load_checkpoint(root / "models")
    assert config["world_size"] == 2 and config["train"]["devices"] == 2
    assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 512)
    assert (root / "metrics/train/metrics.json").is_file()


def test_several_nodes_need_torchrun(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    params = Params(train=TrainParams(devices=4, nodes=2))
    with pytest.raises(UserError, match=r"torchrun --nnodes 2 --nproc-per-node 4 --node-rank R"):
        launch_train(params)


@pytest.mark.parametrize(
    ("train", "triplets", "message"),
    [
        (
            {"cross_rank_negatives": True},
            {},
            "train.cross_rank_negatives: .* set triplets.sampler: pk",
        ),
        ({"devices": 3}, {"sampler": "pk", "classes_per_batch": 16}, "multiple of 3"),
        ({"devices": 2, "nodes": 2}, {"sampler": "pk", "classes_per_batch": 4}, "one class per"),
        ({"devices": 2, "device": "cuda:1"}, {}, "set train.device: cuda or auto"),
        ({"devices": 0}, {}, "train.devices: 0 must be >= 1"),
    ],
)
def test_distributed_params_are_checked(tmp_path, train, triplets, message):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"train": train, "triplets": triplets}))
    with pytest.raises(ParamsError, match=message):
        load_params(path)
    cross = {"devices": 2, "nodes": 2, "cross_rank_negatives": True}
    pk = {"sampler": "pk", "classes_per_batch": 4}
    path.write_text(yaml.safe_dump({"train": cross, "triplets": pk}))
    assert load_params(path).train.cross_rank_negatives


def test_pk_shares_are_whole_classes_and_triplet_weights_average_to_the_step():
    labels = np.repeat(np.arange(4), 4)
    rows = pk_batches(labels, 4, 2, np.random.default_rng(0))[0]
    shares = [share_of(rows, labels, False, r, 2) for r in range(2)]
    assert sorted(np.concatenate([s.rows for s in shares])) == sorted(rows)
    assert not set(labels[shares[0].rows]) & set(labels[shares[1].rows])
    assert [len(set(labels[s.rows])) for s in shares] == [2, 2]
    flat = np.arange(15)  # 5 triplets: anchors 0-4, positives 5-9, negatives 10-14
    first, second = (share_of(flat, labels, True, r, 2) for r in range(2))
    assert list(first.rows) == [0, 1, 2, 5, 6, 7, 10, 11, 12]
    assert list(second.rows) == [3, 4, 8, 9, 13, 14]
    assert (first.weight, second.weight) == (1.2, 0.8)
    empty = share_of(np.arange(3), labels, True, 1, 2)  # one triplet, two ranks
    assert empty.weight == 0.0 and list(empty.rows) == [0, 1, 2]
    with pytest.raises(UserError, match="fewer than the 3"):
        share_of(rows[labels[rows] < 2], labels, False, 0, 3)
    with pytest.raises(UserError, match="do not split evenly over 2"):
        share_of(rows[labels[rows] < 3], labels, False, 0, 2, equal=True)
    short = np.repeat(np.arange(4), [4, 4, 1, 4])  # class 2 is smaller than K
    uneven = pk_batches(short, 4, 2, np.random.default_rng(0))[0]
    assert len(uneven) == 7 and len(share_of(uneven, short, False, 0, 2).rows) in (3, 4)
    with pytest.raises(UserError, match="cross_rank_negatives: a P x K step's shares differ"):
        share_of(uneven, short, False, 0, 2, equal=True)
