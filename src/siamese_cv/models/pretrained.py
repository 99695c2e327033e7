"""Resolve a backbone's starting weights once (download stage) and load them later (train, evaluate).

The weights land in `models/pretrained/` as safetensors with a JSON card, so the later stages
never touch the network, and `model.weights: none` is an explicit, seeded random start rather
than a silent fallback.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from siamese_cv.config.params import ModelParams, PreprocessParams
from siamese_cv.core.atomic import atomic_path
from siamese_cv.core.errors import UserError
from siamese_cv.models.backbones import Backbone, get_backbone_spec, load_weights_file
from siamese_cv.models.siamese import Preprocessing, state_fingerprint

WEIGHTS_FILE = "weights.safetensors"
CARD_FILE = "pretrained.json"


def _fetch_imagenet(name: str) -> dict[str, torch.Tensor]:
    spec = get_backbone_spec(name)
    if spec.fetch_imagenet is None:
        raise UserError(f"model.weights: imagenet is not available for {name}: {spec.weights_hint}")
    try:
        return spec.fetch_imagenet()
    except UserError:
        raise
    except Exception as error:  # urllib, requests and hub errors all mean: not downloadable now
        reason = (
            str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
        )
        raise UserError(
            f"cannot download the ImageNet weights of {name} ({reason}); {spec.weights_hint}. "
            "Offline? Set model.weights to a local weights file, or run the offline profile: "
            "make repro-offline DATA=<image folder>"
        ) from None


def resolve_pretrained(model: ModelParams, out_dir: Path, seed: int) -> dict[str, Any]:
    """Write the backbone's starting weights and their card into `out_dir` (atomically).

    Args:
        model: the `model` section: backbone name and `weights` (imagenet | none | a file).
        out_dir: usually models/pretrained.
        seed: seeds the random start of `weights: none`.

    Returns:
        The card written to `pretrained.json`.

    Raises:
        UserError: weights that cannot be downloaded, found, or fitted to the backbone.
    """
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    backbone = get_backbone_spec(model.backbone).build()
    if model.weights == "none":
        state, origin = backbone.module.state_dict(), f"random (seed {seed})"
    elif model.weights == "imagenet":
        state, origin = _fetch_imagenet(model.backbone), "imagenet"
    else:
        path = Path(model.weights)
        state, origin = load_weights_file(path, backbone), str(path)
    try:
        backbone.module.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise UserError(
            f"model.weights: {origin} does not fit {model.backbone}: {str(error)[:200]}"
        ) from None
    state = {k: v.detach().cpu().contiguous() for k, v in backbone.module.state_dict().items()}
    card = {
        "backbone": model.backbone,
        "weights": origin,
        "feature_dim": backbone.feature_dim,
        "mean": list(backbone.mean),
        "std": list(backbone.std),
        "fingerprint": state_fingerprint(state),
    }
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"fingerprint": card["fingerprint"]})
        (tmp / CARD_FILE).write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
    return card


def load_pretrained(directory: Path) -> tuple[Backbone, dict[str, Any]]:
    """The backbone with its resolved starting weights, and its card."""
    from safetensors.torch import load_file

    card_path, weights = directory / CARD_FILE, directory / WEIGHTS_FILE
    if not card_path.is_file() or not weights.is_file():
        raise UserError(f"{directory}: no pretrained weights there; run `dvc repro download`")
    card = json.loads(card_path.read_text(encoding="utf-8"))
    backbone = get_backbone_spec(card["backbone"]).build()
    backbone.module.load_state_dict(load_file(str(weights)))
    return backbone, card


def preprocessing_of(preprocess: PreprocessParams, card: dict[str, Any]) -> Preprocessing:
    """The input pipeline of a pretrained backbone: the size and resize of `preprocess`, the
    mean and std its card records."""
    return Preprocessing(
        preprocess.image_size, preprocess.resize, tuple(card["mean"]), tuple(card["std"])
    )
