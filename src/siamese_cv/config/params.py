"""A typed, validated view of params.yaml: the one place for defaults and checks.

Every stage reads its sections through `load_params`, so a bad key fails the same way everywhere:
one line naming the key and what is allowed. Unknown keys are rejected, never passed on.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from siamese_cv.core.errors import ParamsError

PROXY_LOSSES = ("normalized_softmax", "proxy_anchor")  # one learned vector per class, no miner
ENGINES = ("torch", "onnxruntime")  # what runs the embedder's network (siamese_cv.inference.embedder)

PARAMS_FILE = "params.yaml"


def _opt(
    default: Any,
    *,
    choices: tuple | None = None,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    doc: str = "",
) -> Any:
    """A dataclass field with its allowed values recorded for validation and messages."""
    meta = {"choices": choices, "ge": ge, "gt": gt, "le": le, "doc": doc}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class DataParams:
    source: str = _opt(
        "hf:Matthijs/snacks", doc="hf:<id>[@revision], an image folder, or a CSV manifest"
    )
    val_fraction: float = _opt(
        0.1, gt=0.0, le=0.5, doc="share of train held out when the source has no validation split"
    )
    seed: int = _opt(42, ge=0)
    retries: int = _opt(3, ge=0, doc="hub download retries on transient errors")
    streaming: bool = _opt(
        False,
        doc="hf sources: read the hub's files as a stream instead of caching the whole dataset",
    )


@dataclass(frozen=True)
class PreprocessParams:
    image_size: int = _opt(244, ge=16, le=2048)
    resize: str = _opt("stretch", choices=("stretch", "shorter_side_crop"))
    format: str = _opt("jpeg", choices=("jpeg", "png", "webp"))
    quality: int = _opt(95, ge=1, le=100)
    workers: int = _opt(0, ge=0, doc="0 uses every core")
    row_group_size: int = _opt(256, ge=1)
    shards: int = _opt(
        1,
        ge=1,
        le=4096,
        doc="pieces processed by separate processes, each resumable after a failure; "
        "the output is the same for any count",
    )


@dataclass(frozen=True)
class TripletParams:
    seed: int = _opt(42, ge=0)
    test_draws: int = _opt(10, ge=1)
    sampler: str = _opt(
        "random",
        choices=("random", "pk"),
        doc="random: the original's triplets; pk: class-balanced batches for online mining",
    )
    classes_per_batch: int = _opt(16, ge=2)
    samples_per_class: int = _opt(4, ge=2)


@dataclass(frozen=True)
class ModelParams:
    backbone: str = _opt("resnet50")
    weights: str = _opt("imagenet", doc="imagenet | none | a .safetensors/.pt file")
    head: str = _opt("seed", choices=("seed", "linear", "mlp", "identity"))
    embedding_dim: int = _opt(512, ge=1)
    pooling: str = _opt(
        "avg",
        choices=("avg", "gem", "avgmax"),
        doc="avg: the backbone's own | gem: generalised mean, learned exponent | avgmax: mean of average and max",
    )
    embed_from: str = _opt(
        "head",
        choices=("head", "pooled"),
        doc="head: the head's output | pooled: the pooled backbone features under it (the head then only serves the loss)",
    )
    inference_sizes: list = _opt(
        [],
        doc="input sizes (px) the trained network embeds at; several: the mean of their "
        "L2-normalised embeddings; [] = preprocess.image_size; with train.members > 1, "
        "one list per member ([[244], [372]]) gives each member its own sizes",
    )


@dataclass(frozen=True)
class TrainParams:
    epochs: int = _opt(25, ge=1)
    batch_size: int = _opt(32, ge=1, doc="triplets per batch (random sampler)")
    optimizer: str = _opt("adam", choices=("adam", "adamw", "sgd"))
    lr: float = _opt(1e-4, gt=0.0)
    backbone_lr: float = _opt(0.0, ge=0.0, doc="0 uses train.lr")
    weight_decay: float = _opt(0.0, ge=0.0)
    scheduler: str = _opt("none", choices=("none", "cosine"))
    schedule_epochs: int = _opt(
        0,
        ge=0,
        doc="epochs the cosine decay spans; 0 = train.epochs; more stops training before the "
        "learning rate reaches zero",
    )
    warmup_epochs: float = _opt(0.0, ge=0.0)
    loss: str = _opt(
        "triplet_l2sq",
        choices=(
            "triplet_l2sq",
            "triplet_cosine",
            "multi_similarity",
            "proxy_anchor",
            "normalized_softmax",
        ),
    )
    miner: str = _opt("none", choices=("none", "semihard", "batch_hard", "multi_similarity"))
    margin: float = _opt(1.0, ge=0.0)
    proxy_alpha: float = _opt(
        32.0,
        gt=0.0,
        doc="proxy_anchor: the scale of its log-sum-exp (the paper's 32); lower pulls each class tighter",
    )
    proxy_lr: float = _opt(
        0.0, ge=0.0, doc="proxy losses: learning rate of the class proxies; 0 uses 100 x train.lr"
    )
    freeze: str | int = _opt(
        "none",
        doc="none | all | N: freeze the backbone's first N stages (negative N: all but the last -N)",
    )
    augment: bool = _opt(False)
    augment_views: int = _opt(
        4,
        ge=0,
        doc="with augment and frozen leading stages: precompute this many augmented views of each image through them (0: augment on the fly)",
    )
    members: int = _opt(
        1,
        ge=1,
        le=16,
        doc="> 1: train that many networks (seeds train.seed, +1, ...; each its own epochs of "
        "triplets) and embed with the mean of their L2-normalised embeddings (a deep ensemble)",
    )
    ema: float = _opt(
        0.0,
        ge=0.0,
        le=0.9999,
        doc="> 0: validate and keep an exponential moving average of the weights, this decay "
        "per step (lowered where it would span more than two epochs)",
    )
    precision: str = _opt("auto", choices=("auto", "fp32", "bf16", "fp16"))
    device: str = _opt("auto", doc="auto | cpu | cuda | cuda:N")
    workers: int = _opt(2, ge=0)
    seed: int = _opt(42, ge=0)
    devices: int = _opt(
        1,
        ge=1,
        doc="training processes per node, one per GPU (or CPU processes); "
        "> 1 relaunches the stage through torch.distributed",
    )
    nodes: int = _opt(
        1,
        ge=1,
        doc="machines; > 1: start the stage on every node with torchrun (docs/distributed.md)",
    )
    cross_rank_negatives: bool = _opt(
        False,
        doc="pk batches on several processes: mine and "
        "score against every process's embeddings, not only its own",
    )

    @property
    def sampled_epochs(self) -> int:
        """Epochs of steps the sample_triplets stage writes: `epochs` for each of the `members`."""
        return self.epochs * self.members


def _engine_opt():
    """`evaluate.engine` and `export.engine`: the same choice for the embedder of each stage."""
    return _opt(
        "torch",
        choices=ENGINES,
        doc="torch | onnxruntime: the model exported to ONNX at stage start and run by ONNX "
        "Runtime in fp32 on the CPU (needs onnxruntime and onnxscript)",
    )


@dataclass(frozen=True)
class EvaluateParams:
    batch_size: int = _opt(64, ge=1)
    recall_at: list = _opt([1, 5, 10])
    precision: str = _opt("auto", choices=("auto", "fp32", "bf16", "fp16"))
    engine: str = _engine_opt()


@dataclass(frozen=True)
class ExportParams:
    splits: list = _opt(["train"])
    batch_size: int = _opt(64, ge=1)
    top_k: int = _opt(20, ge=1)
    precision: str = _opt("auto", choices=("auto", "fp32", "bf16", "fp16"))
    engine: str = _engine_opt()
    shards: int = _opt(
        1,
        ge=1,
        le=4096,
        doc="pieces embedded by separate processes (one per GPU where there are several), "
        "each resumable after a failure",
    )


@dataclass(frozen=True)
class SearchParams:
    index: str = _opt(
        "exact",
        choices=("exact", "ivf"),
        doc="the index index_gallery saves for siamese-search; ivf: FAISS IVF-SQ8 for large galleries",
    )
    nlist: int = _opt(0, ge=0, doc="ivf: inverted lists; 0 = about 4 x sqrt(gallery size)")
    nprobe: int = _opt(0, ge=0, doc="ivf: lists scanned per query; 0 = 1/128 of them, at least 8")
    seed: int = _opt(0, ge=0, doc="ivf: k-means sample and initialisation")


@dataclass(frozen=True)
class Params:
    data: DataParams = field(default_factory=DataParams)
    preprocess: PreprocessParams = field(default_factory=PreprocessParams)
    triplets: TripletParams = field(default_factory=TripletParams)
    model: ModelParams = field(default_factory=ModelParams)
    train: TrainParams = field(default_factory=TrainParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    export: ExportParams = field(default_factory=ExportParams)
    search: SearchParams = field(default_factory=SearchParams)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SPLITS = ("train", "validation", "test")


def _check_value(key: str, value: Any, hint: Any, meta: dict) -> Any:
    origin = typing.get_origin(hint)
    if hint is bool:
        if not isinstance(value, bool):
            raise ParamsError(f"{key}: expected true or false, got {value!r}")
    elif hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(f"{key}: expected an integer, got {value!r}")
    elif hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamsError(f"{key}: expected a number, got {value!r}")
        value = float(value)
    elif hint is str:
        if not isinstance(value, str):
            raise ParamsError(f"{key}: expected a string, got {value!r}")
    elif hint is list or origin is list:
        if not isinstance(value, list):
            raise ParamsError(f"{key}: expected a list, got {value!r}")
        return list(value)
    choices = meta.get("choices")
    if choices and value not in choices:
        raise ParamsError(f"{key}: {value!r} is not one of {', '.join(map(str, choices))}")
    for bound, ok, word in (
        ("ge", lambda v, b: v >= b, ">="),
        ("gt", lambda v, b: v > b, ">"),
        ("le", lambda v, b: v <= b, "<="),
    ):
        limit = meta.get(bound)
        if limit is not None and not ok(value, limit):
            raise ParamsError(f"{key}: {value!r} must be {word} {limit}")
    return value


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{prefix or 'params.yaml'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ParamsError(
            f"unknown key {where}{unknown[0]}; known keys{' of ' + prefix if prefix else ''}: "
            + ", ".join(fields)
        )
    values = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, raw.get(name), key)
        elif name in raw:
            values[name] = _check_value(key, raw[name], hint, dict(f.metadata))
    return cls(**values)


def _check_cross(params: Params) -> None:
    """Checks that involve more than one key, or the registries."""
    from siamese_cv.models.backbones import list_backbones  # registry import is heavy: keep lazy

    backbone = params.model.backbone
    if not backbone.startswith("timm:") and backbone not in list_backbones():
        raise ParamsError(
            f"model.backbone: unknown backbone {backbone!r}; known: {', '.join(list_backbones())}, or timm:<name>"
        )
    parse_freeze(params.train.freeze)
    for split in params.export.splits:
        if split not in SPLITS:
            raise ParamsError(f"export.splits: {split!r} is not one of {', '.join(SPLITS)}")
    if not params.export.splits:
        raise ParamsError("export.splits: list at least one of train, validation, test")
    for section in ("evaluate", "export"):
        engine, precision = getattr(params, section).engine, getattr(params, section).precision
        if engine == "onnxruntime" and precision not in ("auto", "fp32"):
            raise ParamsError(
                f"{section}.engine: onnxruntime runs the model in fp32 on the CPU, not "
                f"{precision}; set {section}.precision: auto or fp32, or {section}.engine: torch"
            )
    for k in params.evaluate.recall_at:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ParamsError(f"evaluate.recall_at: {k!r} must be a positive integer")
    member_sizes(params)
    device = params.train.device
    if device not in ("auto", "cpu", "cuda") and not (
        device.startswith("cuda:") and device[5:].isdigit()
    ):
        raise ParamsError(f"train.device: {device!r} is not one of auto, cpu, cuda, cuda:N")
    schedule = params.train.schedule_epochs
    if schedule and schedule < params.train.epochs:
        raise ParamsError(
            f"train.schedule_epochs: {schedule} is shorter than train.epochs: "
            f"{params.train.epochs}, whose last epochs would train at a zero learning rate; "
            "set it to 0 or at least train.epochs"
        )
    if params.train.miner != "none" and params.triplets.sampler != "pk":
        raise ParamsError(
            f"train.miner: {params.train.miner!r} mines inside class-balanced batches; set triplets.sampler: pk"
        )
    if params.search.index == "exact" and (params.search.nlist or params.search.nprobe):
        raise ParamsError(
            "search.nlist / search.nprobe: an exact index has no lists; set them to 0 or "
            "search.index: ivf"
        )
    if params.train.loss in PROXY_LOSSES and params.train.miner != "none":
        raise ParamsError(
            f"train.loss: {params.train.loss} compares samples with class proxies and uses no "
            "miner; set train.miner: none"
        )
    if params.train.loss == "multi_similarity" and params.triplets.sampler != "pk":
        raise ParamsError(
            "train.loss: multi_similarity needs class-balanced batches; set triplets.sampler: pk"
        )
    _check_distributed(params)


def _check_distributed(params: Params) -> None:
    """Several processes split each step's rows: every process must get whole classes to compare."""
    train, world = params.train, params.train.devices * params.train.nodes
    if train.cross_rank_negatives and train.loss in PROXY_LOSSES:
        raise ParamsError(
            f"train.cross_rank_negatives: {train.loss} compares samples with class proxies, "
            "not with other processes' samples; set train.cross_rank_negatives: false"
        )
    if train.cross_rank_negatives and params.triplets.sampler != "pk":
        raise ParamsError(
            "train.cross_rank_negatives: the random sampler's triplets already name "
            "their negatives; set triplets.sampler: pk or "
            "train.cross_rank_negatives: false"
        )
    if train.devices > 1 and train.device.startswith("cuda:"):
        raise ParamsError(
            f"train.device: {train.device!r} names one GPU but train.devices: "
            f"{train.devices} uses one GPU per process; set train.device: cuda "
            "or auto"
        )
    if world == 1 or params.triplets.sampler != "pk":
        return
    classes = params.triplets.classes_per_batch
    if classes % world:
        raise ParamsError(
            f"triplets.classes_per_batch: {classes} classes do not split evenly over "
            f"train.devices x train.nodes = {world} processes; make it a multiple "
            f"of {world}"
        )
    if classes // world < 2 and not train.cross_rank_negatives:
        raise ParamsError(
            f"triplets.classes_per_batch: {classes} over {world} processes leaves "
            f"one class per process, so no negatives; raise it to {2 * world} or "
            "more, or set train.cross_rank_negatives: true"
        )


def member_sizes(params: Params) -> list[tuple[int, ...]]:
    """Each of the `train.members` networks' inference sizes (empty: the stored size).

    `model.inference_sizes` is either one list for every member or a list of lists, one per member.

    Raises:
        ParamsError: a size that is not a pixel count, a repeat, or lists for another number of
            members.
    """
    sizes, members = params.model.inference_sizes, params.train.members
    nested = [isinstance(s, list) for s in sizes]
    if any(nested) and not all(nested):
        raise ParamsError(
            f"model.inference_sizes: {sizes} mixes sizes and lists; give one list of sizes, "
            "or one list per member"
        )
    per_member = sizes if sizes and all(nested) else [sizes] * members
    if len(per_member) != members:
        raise ParamsError(
            f"model.inference_sizes: {len(per_member)} lists of sizes for train.members: "
            f"{members}; give one list per member, or one flat list for all"
        )
    for own in per_member:
        for size in own:
            if isinstance(size, bool) or not isinstance(size, int) or not 16 <= size <= 2048:
                raise ParamsError(
                    f"model.inference_sizes: {size!r} must be a whole number of pixels, 16 to 2048"
                )
        if len(set(own)) != len(own):
            raise ParamsError(f"model.inference_sizes: {own} lists a size twice")
    return [tuple(own) for own in per_member]


def parse_freeze(value: str | int) -> int | None:
    """`train.freeze` as a stage count: None = nothing frozen; a large number = everything.

    Returns:
        The Python-slice end of the frozen stages (`stages[:n]`), or None for `none`.
    """
    text = str(value).strip().lower()
    if text == "none":
        return None
    if text == "all":
        return 10**6
    try:
        return int(text)
    except ValueError:
        raise ParamsError(
            f"train.freeze: {value!r} is not one of none, all, or an integer N (freeze the first N "
            "backbone stages; -2 trains only the last two)"
        ) from None


def load_params(path: str | Path = PARAMS_FILE, *, check: bool = True) -> Params:
    """Read and validate params.yaml.

    Args:
        path: the YAML file.
        check: also run the cross-key checks (backbone registry, miner needs pk batches, ...).

    Raises:
        ParamsError: naming the first bad key and the allowed values.
    """
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: no such parameters file; run from the project root")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ParamsError(f"{path}: not valid YAML ({error})") from None
    params = _build(Params, raw, "")
    if check:
        _check_cross(params)
    return params
