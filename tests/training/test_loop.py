"""The training loop on images a tiny network can learn: colour decides the class."""

import io
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from siamese_cv.config.params import TrainParams
from siamese_cv.data.triplets import pk_batches, random_triplets, rng_for
from siamese_cv.inference.hardware import resolve_precision
from siamese_cv.models.siamese import Preprocessing, build_model
from siamese_cv.training import feature_cache, optimisation
from siamese_cv.training.loop import fit
from siamese_cv.training.settings import FitData, FitSettings, Schedule, SplitImages

PREP = Preprocessing(32, "stretch", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
COLOURS = [(140, 115, 115), (115, 140, 115), (115, 115, 140)]  # subtle: noise is larger


def split(n_per_class: int, seed: int) -> SplitImages:
    rng = np.random.default_rng(seed)
    encoded, labels = [], []
    for label, colour in enumerate(COLOURS):
        for _ in range(n_per_class):
            noise = rng.integers(-60, 60, size=(32, 32, 3))
            pixels = np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="PNG")
            encoded.append(buffer.getvalue())
            labels.append(label)
    return SplitImages(encoded, np.array(labels))


def run(
    params: TrainParams,
    freeze=None,
    pk=False,
    cache_engine="torch",
    embed_from="head",
    trained: list | None = None,
    prep: Preprocessing = PREP,
    validation: bool = True,
):
    """Train the tiny network on coloured noise; `trained` receives the model it kept."""
    torch.manual_seed(0)
    model, _ = build_model("tiny", "linear", 16)
    if trained is not None:
        trained.append(model)
    model.freeze(freeze)
    train, val = split(8, 0), split(4, 1) if validation else SplitImages([], np.zeros(0, int))
    if pk:
        epochs = [
            list(pk_batches(train.labels, 3, 4, rng_for(0, "pk", e))) for e in range(params.epochs)
        ]
    else:
        epochs = [
            [
                t.T.ravel()
                for t in np.array_split(random_triplets(train.labels, rng_for(0, "train", e)), 4)
            ]
            for e in range(params.epochs)
        ]
    val_triplets = (
        random_triplets(val.labels, rng_for(0, "validation", 0))
        if validation
        else np.zeros((0, 3), int)
    )
    precision = resolve_precision("fp32", torch.device("cpu"))
    return fit(
        model,
        prep,
        FitData(train, val, Schedule(epochs, not pk), val_triplets),
        FitSettings(
            params,
            precision,
            batch_size_eval=16,
            cache_engine=cache_engine,
            embed_from=embed_from,
        ),
    )


def val_map_at_r(model: torch.nn.Module, prep: Preprocessing = PREP) -> float:
    """MAP@R of the validation split as the shared embedder embeds it with `model`."""
    from siamese_cv.evaluation.metrics import retrieval_metrics
    from siamese_cv.inference.embedder import Embedder

    val = split(4, 1)
    embedder = Embedder(model, prep, resolve_precision("fp32", torch.device("cpu")))
    embeddings = embedder.embed_encoded(val.encoded)
    return retrieval_metrics(embeddings, val.labels, recall_at=(1,))["map_at_r"]


def untrained_map_at_r() -> float:
    torch.manual_seed(0)
    return val_map_at_r(build_model("tiny", "linear", 16)[0])


def assert_same_training_other_scores(result, reference) -> None:
    """The same steps and head-side validation loss as `reference`, other retrieval metrics."""
    for a, b in zip(result.history, reference.history, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)
    assert [h["val_map_at_r"] for h in result.history] != pytest.approx(
        [h["val_map_at_r"] for h in reference.history], abs=1e-4
    )


def test_training_learns_colours_and_keeps_the_best_epoch():
    result = run(TrainParams(epochs=6, lr=3e-3, workers=0))
    assert len(result.history) == 6 and not result.cached_features
    assert result.best["val_map_at_r"] == max(h["val_map_at_r"] for h in result.history)
    before = untrained_map_at_r()
    assert before < 0.8 and result.best["val_map_at_r"] > before + 0.15, (before, result.best)
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]


@pytest.mark.parametrize("freeze", [None, -1])
def test_without_validation_the_last_epoch_is_kept(freeze, caplog):
    caplog.set_level("INFO", logger="siamese_cv.training.loop")
    params = TrainParams(epochs=3, lr=3e-3, workers=0, ema=0.5)
    trained: list = []
    result = run(params, freeze=freeze, validation=False, trained=trained)
    assert result.best_epoch == 3 and "val_map_at_r" not in result.best
    assert val_map_at_r(trained[0]) > untrained_map_at_r()
    lines = [r.getMessage() for r in caplog.records]
    assert "train: kept epoch 3 of 3 (the last: no validation split to choose by)" in lines[-1]
    assert lines[0].startswith("train: epoch 1/3: loss ") and "val" not in lines[0]


def test_cached_prefix_trains_exactly_like_the_images(monkeypatch):
    params = TrainParams(epochs=2, lr=3e-3, workers=0)
    cached = run(params, freeze=1)
    monkeypatch.setattr(feature_cache, "CACHE_BUDGET_BYTES", 0)
    plain = run(params, freeze=1)
    assert cached.cached_features and not plain.cached_features
    for a, b in zip(cached.history, plain.history, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a["val_map_at_r"] == pytest.approx(b["val_map_at_r"], abs=1e-6)


def test_an_onnxruntime_filled_cache_trains_like_the_torch_one(monkeypatch):
    from siamese_cv.inference import embedder as embedding

    sessions = []
    real_session = embedding._ort_session
    monkeypatch.setattr(
        embedding, "_ort_session", lambda *a: sessions.append(a) or real_session(*a)
    )
    params = TrainParams(epochs=2, lr=3e-3, workers=0, augment=True, augment_views=2)
    torch_cache = run(params, freeze=1, pk=True)
    assert not sessions
    ort_cache = run(params, freeze=1, pk=True, cache_engine="onnxruntime")
    assert ort_cache.cached_features and len(sessions) == 1
    for a, b in zip(ort_cache.history, torch_cache.history, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-3)
        assert a["val_map_at_r"] == pytest.approx(b["val_map_at_r"], abs=1e-3)


def test_a_cache_too_small_for_every_view_keeps_as_many_as_fit(monkeypatch, caplog):
    torch.manual_seed(0)
    model, _ = build_model("tiny", "linear", 16)
    model.freeze(1)
    per_image = 4 * model.split_frozen()[0].eval()(torch.zeros(1, 3, 32, 32)).numel()
    n_train, n_val = 3 * 8, 3 * 4  # run()'s splits
    monkeypatch.setattr(feature_cache, "CACHE_BUDGET_BYTES", per_image * (2 * n_train + n_val))
    params = TrainParams(epochs=1, lr=3e-3, workers=0, augment=True, augment_views=5)
    result = run(params, freeze=1, pk=True)
    assert result.cached_features and result.cached_views == 2
    assert "5 augmented views of 24 images would need" in caplog.text
    monkeypatch.setattr(feature_cache, "CACHE_BUDGET_BYTES", per_image * (n_train + n_val) - 1)
    assert not run(params, freeze=1, pk=True).cached_features


def test_pk_batches_with_a_miner_and_cached_augmented_views():
    params = TrainParams(
        epochs=3,
        lr=3e-3,
        workers=0,
        loss="triplet_cosine",
        miner="semihard",
        margin=0.2,
        augment=True,
        augment_views=2,
    )
    result = run(params, freeze=2, pk=True)
    assert result.cached_features
    assert result.best["val_map_at_r"] > 0.8


@pytest.mark.parametrize("loss", ["proxy_anchor", "normalized_softmax"])
def test_proxy_losses_train_the_model_and_their_class_proxies(loss):
    params = TrainParams(epochs=4, lr=3e-3, workers=0, loss=loss, margin=0.1)
    result = run(params, pk=True)
    before = untrained_map_at_r()
    assert result.best["val_map_at_r"] > before + 0.15, (before, result.best)
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]


def test_the_optimizer_trains_a_proxy_loss_at_its_own_learning_rate():
    from siamese_cv.training.losses import build_loss

    model, _ = build_model("tiny", "linear", 16)
    proxies = build_loss("proxy_anchor", 0.1, num_classes=3, dim=16)
    optimizer = optimisation.build_optimizer(model, TrainParams(lr=1e-3), proxies)
    assert [g["lr"] for g in optimizer.param_groups][-1] == pytest.approx(0.1)
    assert optimizer.param_groups[-1]["params"] == list(proxies.parameters())
    optimizer = optimisation.build_optimizer(model, TrainParams(lr=1e-3, proxy_lr=0.05), proxies)
    assert optimizer.param_groups[-1]["lr"] == pytest.approx(0.05)


@pytest.mark.parametrize("freeze", [None, 1], ids=["images", "cached-prefix"])
def test_a_moving_average_of_the_weights_is_what_gets_validated_and_kept(freeze):
    params = TrainParams(epochs=4, lr=3e-3, workers=0)
    plain = run(params, freeze=freeze)
    # a decay near 0 averages nothing: the same run, step for step
    instant = run(TrainParams(epochs=4, lr=3e-3, workers=0, ema=1e-6), freeze=freeze)
    for a, b in zip(instant.history, plain.history, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["val_map_at_r"] == pytest.approx(b["val_map_at_r"], abs=1e-5)
    averaged = run(TrainParams(epochs=4, lr=3e-3, workers=0, ema=0.8), freeze=freeze)
    # the same steps are taken (the average never feeds back into training) ...
    assert [h["train_loss"] for h in averaged.history] == pytest.approx(
        [h["train_loss"] for h in plain.history], rel=1e-5
    )
    # ... but what is scored is the average, and it still learned
    assert [h["val_loss"] for h in averaged.history] != pytest.approx(
        [h["val_loss"] for h in plain.history], rel=1e-3
    )
    assert averaged.best["val_map_at_r"] > untrained_map_at_r() + 0.15


def test_the_moving_average_spans_at_most_two_epochs():
    """With 4 steps an epoch, a decay of 0.99 (100 steps) would average over the whole run."""
    capped = run(TrainParams(epochs=3, lr=3e-3, workers=0, ema=0.99))
    assert capped.ema_decay == pytest.approx(1 - 1 / 8)
    explicit = run(TrainParams(epochs=3, lr=3e-3, workers=0, ema=1 - 1 / 8))
    assert [h["val_loss"] for h in capped.history] == [h["val_loss"] for h in explicit.history]
    below = run(TrainParams(epochs=3, lr=3e-3, workers=0, ema=0.5))
    assert below.ema_decay == 0.5 and run(TrainParams(epochs=1, workers=0)).ema_decay == 0.0


@pytest.mark.parametrize("freeze", [None, 1], ids=["images", "cached-prefix"])
def test_embedding_from_the_pooled_features_validates_and_keeps_them(freeze):
    params = TrainParams(epochs=4, lr=3e-3, workers=0, ema=0.8)
    head = run(params, freeze=freeze)
    trained = []
    pooled = run(params, freeze=freeze, embed_from="pooled", trained=trained)
    # the same steps and head-side validation loss, but the pooled features' retrieval metrics:
    # those of the weights it kept
    assert_same_training_other_scores(pooled, head)
    assert trained[0].feature_dim != trained[0].embedding_dim
    assert val_map_at_r(trained[0].backbone) == pytest.approx(pooled.best["val_map_at_r"], abs=1e-6)
    assert pooled.best["val_map_at_r"] > untrained_map_at_r() + 0.15


@pytest.mark.parametrize("freeze", [None, 1], ids=["images", "cached-prefix"])
def test_validation_embeds_at_the_inference_sizes_as_the_exported_model_will(freeze):
    params = TrainParams(epochs=2, lr=1e-3, workers=0)
    multi = replace(PREP, input_sizes=(32, 48))
    trained = []
    at_sizes = run(params, freeze=freeze, prep=multi, trained=trained)
    # training runs at the stored size, and the loss is the first size's: both unchanged, while
    # the retrieval metrics are the two sizes' mean embedding's, as the embedder computes it
    # from the weights that were kept
    assert_same_training_other_scores(at_sizes, run(params, freeze=freeze))
    assert val_map_at_r(trained[0], multi) == pytest.approx(at_sizes.best["val_map_at_r"], abs=1e-6)
    assert at_sizes.best["val_map_at_r"] > untrained_map_at_r() + 0.15


def lr_factors(params: TrainParams, steps_per_epoch: int, steps: int) -> list[float]:
    """The rate of each of `steps` optimiser steps under `lr_schedule`, as a fraction of train.lr."""
    model, _ = build_model("tiny", "linear", 16)
    optimizer = optimisation.build_optimizer(model, params, torch.nn.Identity())
    scheduler = optimisation.lr_schedule(optimizer, params, steps_per_epoch)
    factors = []
    for _ in range(steps):
        factors.append(optimizer.param_groups[0]["lr"] / params.lr)
        optimizer.step()
        scheduler.step()
    return factors


def hand_written_factor(params: TrainParams, steps_per_epoch: int, step: int) -> float:
    """The schedule as this project wrote it by hand before it used torch's schedulers."""
    total = max(1, (params.schedule_epochs or params.epochs) * steps_per_epoch)
    warmup = int(params.warmup_epochs * steps_per_epoch)
    if warmup and step < warmup:
        return (step + 1) / warmup
    if params.scheduler == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + np.cos(np.pi * min(1.0, progress)))
    return 1.0


@pytest.mark.parametrize("scheduler", ["none", "cosine"])
@pytest.mark.parametrize("warmup_epochs", [0.0, 0.5, 1.0, 2.5])
@pytest.mark.parametrize(("epochs", "schedule_epochs"), [(1, 0), (3, 0), (3, 5)])
@pytest.mark.parametrize("steps_per_epoch", [1, 4, 7])
def test_torch_schedulers_give_the_hand_written_rates(
    scheduler, warmup_epochs, epochs, schedule_epochs, steps_per_epoch
):
    """Every step's rate: the same to 1e-12, and the same float32 (the weights' dtype)."""
    params = TrainParams(
        epochs=epochs,
        lr=3e-3,
        scheduler=scheduler,
        warmup_epochs=warmup_epochs,
        schedule_epochs=schedule_epochs,
    )
    steps = epochs * steps_per_epoch + 1  # and the rate after the last step, which is logged
    library = lr_factors(params, steps_per_epoch, steps)
    by_hand = [hand_written_factor(params, steps_per_epoch, s) for s in range(steps)]
    assert library == pytest.approx(by_hand, rel=1e-12, abs=1e-15)
    assert np.array_equal(
        np.float32(np.array(library) * params.lr), np.float32(np.array(by_hand) * params.lr)
    )


def test_a_longer_schedule_stops_training_before_the_decay_ends():
    """`train.schedule_epochs`: the cosine spans 12 epochs, training stops after 8 of them."""
    cosine = TrainParams(epochs=8, scheduler="cosine", warmup_epochs=1.0)
    full = lr_factors(cosine, 10, 81)
    truncated = lr_factors(cosine.model_copy(update={"schedule_epochs": 12}), 10, 121)
    assert full[0] == truncated[0] == pytest.approx(0.1)  # the same warm-up
    assert full[9] == truncated[9] == pytest.approx(1.0)
    assert full[80] == pytest.approx(0.0, abs=1e-12)
    assert truncated[80] == pytest.approx(0.5 * (1 + np.cos(np.pi * 70 / 110)))  # about 0.29
    assert truncated[120] == pytest.approx(0.0, abs=1e-12)
