"""data/features on disk: exact round trips (fp32 and bf16), memory-mapped reads, one-line refusals
of features made for other settings, and a failed write that leaves the last complete output."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from siamese_cv.core.errors import UserError
from siamese_cv.training import feature_store
from siamese_cv.training.feature_cache import PrefixCache
from siamese_cv.training.feature_store import read_features, write_features
from siamese_cv.training.settings import SplitImages

CPU = torch.device("cpu")


def split(n: int) -> SplitImages:
    return SplitImages([b"x"] * n, np.arange(n) % 2)


def cache(dtype: torch.dtype = torch.float32) -> PrefixCache:
    generator = torch.Generator().manual_seed(0)
    train = torch.randn(3, 5, 4, 2, 2, generator=generator).to(dtype)
    validation = {64: torch.randn(2, 4, 2, 2, generator=generator).to(dtype)}
    return PrefixCache(train, validation, 3)


def card_for(stored: PrefixCache) -> dict:
    return {
        "cached": True, "views": stored.views, "asked_views": 3, "frozen_stages": 1,
        "validation_sizes": list(stored.validation), "seed": 42, "train_images": 5,
        "validation_images": 2, "dtype": str(stored.train.dtype).removeprefix("torch."),
    }  # fmt: skip


def read(folder, **changes):
    wanted = {"frozen_stages": 1, "views": 3, "seed": 42, "sizes": [64]} | changes
    return read_features(
        folder,
        wanted["frozen_stages"],
        wanted["views"],
        wanted["seed"],
        split(5),
        split(2),
        wanted["sizes"],
        CPU,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stored_features_read_back_exactly_and_memory_mapped(tmp_path, dtype):
    stored = cache(dtype)
    written = write_features(tmp_path / "features", stored, card_for(stored))
    back = read(tmp_path / "features")
    assert back.views == 3 and back.train.dtype == dtype
    assert torch.equal(back.train, stored.train) and torch.equal(
        back.validation[64], stored.validation[64]
    )
    assert isinstance(np.load(tmp_path / "features/train.npy", mmap_mode="r"), np.memmap)
    assert written == sum(f.stat().st_size for f in (tmp_path / "features").glob("*.npy"))


def test_features_made_for_other_settings_are_refused_in_one_line(tmp_path):
    stored = cache()
    write_features(tmp_path / "features", stored, card_for(stored))
    with pytest.raises(UserError) as refused:
        read(tmp_path / "features", views=4, sizes=[64, 96])
    assert str(refused.value) == (
        f"{tmp_path / 'features'}: made for other settings: asked_views 3 (needed 4), no "
        "validation at 96 px; run `dvc repro features`"
    )
    with pytest.raises(UserError, match=r"no stored features; run `dvc repro features`"):
        read(tmp_path / "missing")


def test_a_marker_means_train_on_the_images(tmp_path):
    write_features(tmp_path / "features", None, {"cached": False, "why": "nothing is frozen"})
    assert [p.name for p in (tmp_path / "features").iterdir()] == ["card.json"]
    assert read(tmp_path / "features") is None


def test_a_write_that_fails_midway_keeps_the_last_complete_features(tmp_path, monkeypatch):
    stored = cache()
    write_features(tmp_path / "features", stored, card_for(stored))
    before = {p.name: p.read_bytes() for p in (tmp_path / "features").iterdir()}
    saved = feature_store.save_tensor

    def fail_on_validation(path, tensor):
        if path.name.startswith("validation"):
            raise OSError("disk full")
        saved(path, tensor)

    monkeypatch.setattr(feature_store, "save_tensor", fail_on_validation)
    with pytest.raises(OSError):
        write_features(tmp_path / "features", cache(torch.bfloat16), card_for(stored))
    after = {p.name: p.read_bytes() for p in (tmp_path / "features").iterdir()}
    assert after == before
    assert [p.name for p in tmp_path.iterdir()] == ["features"]  # no half-written folder left
