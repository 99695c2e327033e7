"""The Siamese embedding network (backbone + head), its freezing, and its safetensors checkpoint.

The three branches of the original notebook share weights, so one network embeds anchor,
positive and negative. A checkpoint is `model.safetensors` plus `config.json`, which holds
everything needed to rebuild the network and its preprocessing: no pickle anywhere.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from siamese_cv.config.choices import HEADS, check_registered
from siamese_cv.core.atomic import atomic_path, write_json
from siamese_cv.core.errors import UserError
from siamese_cv.models.backbones import Backbone, get_backbone_spec
from siamese_cv.models.ensemble import Ensemble

_HEADS: dict[str, Callable[[int, int], nn.Module]] = {}


def register_head(name: str):
    def decorator(fn: Callable[[int, int], nn.Module]) -> Callable[[int, int], nn.Module]:
        if name in _HEADS:
            raise ValueError(f"head {name!r} is registered twice")
        _HEADS[name] = fn
        return fn

    return decorator


def list_heads() -> list[str]:
    return sorted(_HEADS)


@register_head("seed")
def _seed_head(feature_dim: int, embedding_dim: int) -> nn.Module:
    """The original's Linear + ReLU (the ReLU zeroes about a quarter of the dimensions)."""
    return nn.Sequential(nn.Linear(feature_dim, embedding_dim), nn.ReLU())


@register_head("linear")
def _linear_head(feature_dim: int, embedding_dim: int) -> nn.Module:
    return nn.Sequential(nn.Linear(feature_dim, embedding_dim))


@register_head("mlp")
def _mlp_head(feature_dim: int, embedding_dim: int) -> nn.Module:
    hidden = max(embedding_dim, feature_dim // 2)
    return nn.Sequential(
        nn.Linear(feature_dim, hidden),
        nn.BatchNorm1d(hidden),
        nn.ReLU(),
        nn.Linear(hidden, embedding_dim),
    )


@register_head("identity")
def _identity_head(feature_dim: int, embedding_dim: int) -> nn.Module:
    """No head: the pooled backbone features are the embedding (the frozen baseline)."""
    return nn.Sequential()


check_registered("head", _HEADS, HEADS)


@dataclass(frozen=True)
class Preprocessing:
    """How a photo becomes the network's input; saved with every checkpoint and gallery.

    Photos are resized to `image_size` (as the preprocess stage stored them); at inference the
    network sees them at each of `input_sizes` (`model.inference_sizes`; empty: `image_size`).
    """

    image_size: int
    resize: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    input_sizes: tuple[int, ...] = ()

    @property
    def sizes(self) -> tuple[int, ...]:
        """The input sizes the network embeds at."""
        return self.input_sizes or (self.image_size,)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocessing:
        """Configs written before `input_sizes` existed load with none (the stored size)."""
        return cls(
            int(data["image_size"]),
            str(data["resize"]),
            tuple(data["mean"]),
            tuple(data["std"]),
            tuple(int(s) for s in data.get("input_sizes", ())),
        )


class EmbeddingNet(nn.Module):
    """backbone -> pooled features -> head -> embedding (un-normalised; the embedder normalises)."""

    def __init__(self, backbone: Backbone, head: str, embedding_dim: int):
        super().__init__()
        if head not in _HEADS:
            raise UserError(f"model.head: {head!r} is not one of {', '.join(list_heads())}")
        self.backbone = backbone.module
        self.head = _HEADS[head](backbone.feature_dim, embedding_dim)
        self.stages = backbone.stages
        self.frozen_stages = 0
        self._chain = backbone  # not a submodule: its modules are already registered above
        self.feature_dim = backbone.feature_dim
        self.embedding_dim = backbone.feature_dim if head == "identity" else embedding_dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))

    def freeze(self, n_stages: int | None) -> list[str]:
        """Freeze the backbone's first `n_stages` stages (slice semantics; None freezes nothing).

        Returns:
            The module-name prefixes that were frozen.
        """
        if n_stages is None:
            return []
        everything = n_stages >= len(self.stages)
        self.frozen_stages = len(self.stages[:n_stages]) if not everything else len(self.stages)
        frozen = [p for stage in self.stages[:n_stages] for p in stage]
        prefixes = tuple(p + "." for p in frozen)
        for name, param in self.backbone.named_parameters():
            if everything or name.startswith(prefixes):
                param.requires_grad_(False)
        return frozen

    def train(self, mode: bool = True) -> EmbeddingNet:
        """Train mode everywhere except frozen parts, whose BatchNorm statistics must not drift."""
        super().train(mode)
        if mode:
            for module in self.backbone.modules():
                params = list(module.parameters(recurse=False))
                if params and not any(p.requires_grad for p in params):
                    module.eval()
        return self

    def split_frozen(self) -> tuple[nn.Module, nn.Module] | None:
        """(frozen prefix, trainable rest including the head), or None if it cannot be cut."""
        if self.frozen_stages == 0:
            return None
        parts = self._chain.split(self.frozen_stages)
        if parts is None:
            return None
        prefix, rest = parts
        return prefix, nn.Sequential(rest, self.head)

    def drop_head(self) -> None:
        """Embed with the pooled backbone features: the head was only the loss's projection.

        As with SimCLR's projection head, the features under a trained head can keep more of the
        similarity structure than its output does (`model.embed_from: pooled`). The saved model is
        then the backbone with an `identity` head, so every engine and stage embeds it unchanged.
        """
        self.head = _HEADS["identity"](self.feature_dim, self.feature_dim)
        self.embedding_dim = self.feature_dim

    @property
    def backbone_frozen(self) -> bool:
        return not any(p.requires_grad for p in self.backbone.parameters())


def build_model(
    backbone_name: str, head: str, embedding_dim: int, pooling: str = "avg"
) -> tuple[EmbeddingNet, Backbone]:
    backbone = get_backbone_spec(backbone_name).build()
    backbone.set_pooling(pooling)
    return EmbeddingNet(backbone, head, embedding_dim), backbone


def state_fingerprint(state: dict[str, torch.Tensor]) -> str:
    """A content hash of a state dict (names, dtypes, shapes and bytes), for galleries and caches."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def save_checkpoint(
    model: nn.Module, config: dict[str, Any], directory: Path, stem: str = "model"
) -> str:
    """Write `<stem>.safetensors` and `config.json` atomically; returns the weights fingerprint."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    fingerprint = state_fingerprint(state)
    with atomic_path(directory / f"{stem}.safetensors") as tmp:
        save_file(state, str(tmp), metadata={"fingerprint": fingerprint})
    write_json(directory / "config.json", {**config, "fingerprint": fingerprint})
    return fingerprint


def load_checkpoint(directory: str | Path, stem: str = "model") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the network (or ensemble) from `config.json` and load `<stem>.safetensors` into it.

    Raises:
        UserError: when the files are missing (the train stage has not run).
    """
    from safetensors.torch import load_file

    directory = Path(directory)
    weights, config_path = directory / f"{stem}.safetensors", directory / "config.json"
    if not weights.is_file() or not config_path.is_file():
        raise UserError(
            f"{directory}: no trained model there; run `dvc repro train` (or `dvc pull`)"
        )
    config = json.loads(config_path.read_text(encoding="utf-8"))
    from safetensors import safe_open

    with safe_open(str(weights), "pt") as handle:
        saved = (handle.metadata() or {}).get("fingerprint")
    if saved and config.get("fingerprint") and saved != config["fingerprint"]:
        raise UserError(
            f"{directory}: {weights.name} and config.json are from different training "
            "runs (train stopped between the two writes?); rerun `dvc repro train`"
        )
    model = _rebuild(config)
    model.load_state_dict(load_file(str(weights)))
    model.eval()
    return model, config


def _rebuild(config: dict[str, Any]) -> nn.Module:
    """The untrained network a config describes: one `EmbeddingNet`, or an `Ensemble` of them."""

    def network() -> EmbeddingNet:
        model, _ = build_model(
            config["backbone"],
            config["head"],
            config["embedding_dim"],
            config.get("pooling", "avg"),
        )
        return model

    members = config.get("members")
    if not members:
        return network()
    return Ensemble([network() for _ in members], [m["input_sizes"] for m in members])
