"""A typed, validated view of params.yaml: the one place for defaults and checks.

Every stage reads its sections through `load_params`, so a bad key fails the same way everywhere:
one line naming the key and what is allowed. The sections are frozen pydantic models that reject
unknown keys and never coerce (`"yes"` is not a boolean, `2.5` not an integer); the lists of
choices come from `siamese_cv.config.choices`, which the registries check themselves against.
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from siamese_cv.config.choices import (
    BACKBONES,
    ENCODE_FORMATS,
    ENGINES,
    HEADS,
    HIDDEN_BACKBONES,
    INDEX_KINDS,
    LOSSES,
    MINERS,
    POOLINGS,
    PROXY_LOSSES,
    RESIZE_MODES,
)
from siamese_cv.core.errors import ParamsError

PARAMS_FILE = "params.yaml"
SPLITS = ("train", "validation", "test")

Precision = Literal["auto", "fp32", "bf16", "fp16"]
PixelSize = Annotated[int, Field(ge=16, le=2048)]


class _Section(BaseModel):
    """A params.yaml section: frozen, strict types, unknown keys rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class DataParams(_Section):
    source: str = Field(
        "hf:Matthijs/snacks", description="hf:<id>[@revision], an image folder, or a CSV manifest"
    )
    val_fraction: float = Field(
        0.1,
        ge=0.0,
        le=0.5,
        description="share of train held out when the source has no validation split (0: none)",
    )
    seed: int = Field(42, ge=0)
    retries: int = Field(3, ge=0, description="hub download retries on transient errors")
    streaming: bool = Field(
        False,
        description="hf sources: read the hub's files as a stream instead of caching the whole dataset",
    )


class PreprocessParams(_Section):
    image_size: PixelSize = 244
    resize: Literal[RESIZE_MODES] = "stretch"
    format: Literal[ENCODE_FORMATS] = "jpeg"
    quality: int = Field(95, ge=1, le=100)
    workers: int = Field(0, ge=0, description="0 uses every core")
    row_group_size: int = Field(256, ge=1)
    shards: int = Field(
        1,
        ge=1,
        le=4096,
        description="pieces processed by separate processes, each resumable after a failure; "
        "the output is the same for any count",
    )


class TripletParams(_Section):
    seed: int = Field(42, ge=0)
    test_draws: int = Field(10, ge=1)
    sampler: Literal["random", "pk"] = Field(
        "random",
        description="random: the original's triplets; pk: class-balanced batches for online mining",
    )
    classes_per_batch: int = Field(16, ge=2)
    samples_per_class: int = Field(4, ge=2)


class ModelParams(_Section):
    backbone: str = Field(
        "resnet50", description=f"{' | '.join(BACKBONES)} | timm:<name> (any timm model)"
    )
    weights: str = Field("imagenet", description="imagenet | none | a .safetensors/.pt file")
    head: Literal[HEADS] = "seed"
    embedding_dim: int = Field(512, ge=1)
    pooling: Literal[POOLINGS] = Field(
        "avg",
        description="avg: the backbone's own | gem: generalised mean, learned exponent | "
        "avgmax: mean of average and max",
    )
    embed_from: Literal["head", "pooled"] = Field(
        "head",
        description="head: the head's output | pooled: the pooled backbone features under it "
        "(the head then only serves the loss)",
    )
    # checked with train.members by Params (member_sizes): one list, or one list per member
    inference_sizes: list = Field(
        default_factory=list,
        description="input sizes (px) the trained network embeds at; several: the mean of their "
        "L2-normalised embeddings; [] = preprocess.image_size; with train.members > 1, "
        "one list per member ([[244], [372]]) gives each member its own sizes",
    )

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, name: str) -> str:
        if name.startswith("timm:") or name in BACKBONES or name in HIDDEN_BACKBONES:
            return name
        raise ValueError(
            f"model.backbone: unknown backbone {name!r}; known: {', '.join(BACKBONES)}, "
            "or timm:<name>"
        )


class TrainParams(_Section):
    epochs: int = Field(25, ge=1)
    batch_size: int = Field(32, ge=1, description="triplets per batch (random sampler)")
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = Field(1e-4, gt=0.0)
    backbone_lr: float = Field(0.0, ge=0.0, description="0 uses train.lr")
    weight_decay: float = Field(0.0, ge=0.0)
    scheduler: Literal["none", "cosine"] = "none"
    schedule_epochs: int = Field(
        0,
        ge=0,
        description="epochs the cosine decay spans; 0 = train.epochs; more stops training "
        "before the learning rate reaches zero",
    )
    warmup_epochs: float = Field(0.0, ge=0.0)
    loss: Literal[LOSSES] = "triplet_l2sq"
    miner: Literal[MINERS] = "none"
    margin: float = Field(1.0, ge=0.0)
    proxy_alpha: float = Field(
        32.0,
        gt=0.0,
        description="proxy_anchor: the scale of its log-sum-exp (the paper's 32); lower pulls "
        "each class tighter",
    )
    proxy_lr: float = Field(
        0.0,
        ge=0.0,
        description="proxy losses: learning rate of the class proxies; 0 uses 100 x train.lr",
    )
    freeze: str | int = Field(
        "none",
        description="none | all | N: freeze the backbone's first N stages (negative N: all but "
        "the last -N)",
    )
    augment: bool = False
    augment_views: int = Field(
        4,
        ge=0,
        description="with augment and frozen leading stages: precompute this many augmented "
        "views of each image through them (0: augment on the fly)",
    )
    members: int = Field(
        1,
        ge=1,
        le=16,
        description="> 1: train that many networks (seeds train.seed, +1, ...; each its own "
        "epochs of triplets) and embed with the mean of their L2-normalised embeddings",
    )
    ema: float = Field(
        0.0,
        ge=0.0,
        le=0.9999,
        description="> 0: validate and keep an exponential moving average of the weights, this "
        "decay per step (lowered where it would span more than two epochs)",
    )
    precision: Precision = Field(
        "auto",
        description="auto: on a CPU with bf16 units, bf16 steps if timed clearly faster than "
        "fp32, else fp32; on a GPU bf16 (fp16 without bf16)",
    )
    compile: bool = Field(
        False,
        description="torch.compile the trained part (compiled during the first steps; slower "
        "than eager on a 2-core CPU, benchmarks/bench_train.py)",
    )
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    workers: int = Field(2, ge=0)
    seed: int = Field(42, ge=0)
    devices: int = Field(
        1,
        ge=1,
        description="training processes per node, one per GPU (or CPU processes); "
        "> 1 relaunches the stage through torch.distributed",
    )
    nodes: int = Field(
        1,
        ge=1,
        description="machines; > 1: start the stage on every node with torchrun "
        "(docs/distributed.md)",
    )
    cross_rank_negatives: bool = Field(
        False,
        description="pk batches on several processes: mine and score against every "
        "process's embeddings, not only its own",
    )

    @property
    def sampled_epochs(self) -> int:
        """Epochs of steps the sample_triplets stage writes: `epochs` for each of the `members`."""
        return self.epochs * self.members

    @field_validator("freeze", mode="before")
    @classmethod
    def _freeze(cls, value: Any) -> Any:
        try:
            parse_freeze(value)
        except ParamsError as error:
            raise ValueError(str(error)) from None
        return value

    @field_validator("device")
    @classmethod
    def _device(cls, device: str) -> str:
        if device in ("auto", "cpu", "cuda") or (
            device.startswith("cuda:") and device[5:].isdigit()
        ):
            return device
        raise ValueError(f"train.device: {device!r} is not one of auto, cpu, cuda, cuda:N")

    @model_validator(mode="after")
    def _consistent(self) -> TrainParams:
        if self.schedule_epochs and self.schedule_epochs < self.epochs:
            raise ValueError(
                f"train.schedule_epochs: {self.schedule_epochs} is shorter than train.epochs: "
                f"{self.epochs}, whose last epochs would train at a zero learning rate; "
                "set it to 0 or at least train.epochs"
            )
        if self.loss in PROXY_LOSSES and self.miner != "none":
            raise ValueError(
                f"train.loss: {self.loss} compares samples with class proxies and uses no "
                "miner; set train.miner: none"
            )
        if self.cross_rank_negatives and self.loss in PROXY_LOSSES:
            raise ValueError(
                f"train.cross_rank_negatives: {self.loss} compares samples with class proxies, "
                "not with other processes' samples; set train.cross_rank_negatives: false"
            )
        if self.devices > 1 and self.device.startswith("cuda:"):
            raise ValueError(
                f"train.device: {self.device!r} names one GPU but train.devices: "
                f"{self.devices} uses one GPU per process; set train.device: cuda or auto"
            )
        return self


Engine = Annotated[
    Literal[ENGINES],
    Field(
        description="torch | onnxruntime: the model exported to ONNX at stage start and run by "
        "ONNX Runtime in fp32 on the CPU (needs onnxruntime and onnxscript)"
    ),
]


class _EmbedSection(_Section):
    """What `evaluate` and `export` share: the embedder's engine must run its precision.

    No fields here, so each section keeps its own key order (written into outputs and keys).
    """

    @model_validator(mode="after")
    def _engine_runs_precision(self) -> _EmbedSection:
        engine, precision = self.engine, self.precision  # type: ignore[attr-defined]
        if engine == "onnxruntime" and precision not in ("auto", "fp32"):
            section = "evaluate" if isinstance(self, EvaluateParams) else "export"
            raise ValueError(
                f"{section}.engine: onnxruntime runs the model in fp32 on the CPU, not "
                f"{precision}; set {section}.precision: auto or fp32, or {section}.engine: torch"
            )
        return self


class EvaluateParams(_EmbedSection):
    batch_size: int = Field(64, ge=1)
    recall_at: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [1, 10])
    top_k: int = Field(
        20, ge=1, description="neighbours per query in the retrieval figure (10 at most)"
    )
    precision: Precision = "auto"
    engine: Engine = "torch"


class ExportParams(_EmbedSection):
    splits: list[Literal[SPLITS]] = Field(default_factory=lambda: ["train"])
    batch_size: int = Field(64, ge=1)
    precision: Precision = "auto"
    engine: Engine = "torch"
    shards: int = Field(
        1,
        ge=1,
        le=4096,
        description="pieces embedded by separate processes (one per GPU where there are "
        "several), each resumable after a failure",
    )

    @field_validator("splits")
    @classmethod
    def _some_split(cls, splits: list[str]) -> list[str]:
        if not splits:
            raise ValueError("export.splits: list at least one of train, validation, test")
        return splits


class SearchParams(_Section):
    index: Literal[INDEX_KINDS] = Field(
        "exact",
        description="the index index_gallery saves for siamese-search; ivf: FAISS IVF-SQ8 for "
        "large galleries",
    )
    nlist: int = Field(0, ge=0, description="ivf: inverted lists; 0 = about 4 x sqrt(gallery size)")
    nprobe: int = Field(
        0, ge=0, description="ivf: lists scanned per query; 0 = 1/128 of them, at least 8"
    )
    seed: int = Field(0, ge=0, description="ivf: k-means sample and initialisation")

    @model_validator(mode="after")
    def _lists_need_ivf(self) -> SearchParams:
        if self.index == "exact" and (self.nlist or self.nprobe):
            raise ValueError(
                "search.nlist / search.nprobe: an exact index has no lists; set them to 0 or "
                "search.index: ivf"
            )
        return self


class CopiesParams(_Section):
    """Near-duplicate search: the copy descriptor's flag rule and the copy-detection metrics."""

    queries: int = Field(
        100,
        ge=0,
        description="gallery photos copied with every edit for the copy metrics (0: none)",
    )
    seed: int = Field(42, ge=0, description="which photos are copied, and each edit's strength")
    margin: Literal["auto"] | Annotated[float, Field(ge=0.0, le=2.0)] = Field(
        "auto",
        description="a hit is a copy when its copy score beats the mean of the query's next 10 "
        "photos by this much; auto: chosen on the validation split",
    )
    false_flags: float = Field(
        0.01,
        gt=0.0,
        lt=1.0,
        description="margin auto: the share of validation photos with no copy that may be flagged",
    )
    whitening: int = Field(
        1024,
        ge=0,
        description="PCA-whiten the copy descriptor to this many dims, fitted on the gallery's "
        "photos (it needs twice as many); 0: unwhitened",
    )


class Params(_Section):
    """All of params.yaml. `Params.model_validate(raw, context={"check": False})` skips the
    checks that span sections (what `load_params(check=False)` does)."""

    data: DataParams = Field(default_factory=DataParams)
    preprocess: PreprocessParams = Field(default_factory=PreprocessParams)
    triplets: TripletParams = Field(default_factory=TripletParams)
    model: ModelParams = Field(default_factory=ModelParams)
    train: TrainParams = Field(default_factory=TrainParams)
    evaluate: EvaluateParams = Field(default_factory=EvaluateParams)
    export: ExportParams = Field(default_factory=ExportParams)
    search: SearchParams = Field(default_factory=SearchParams)
    copies: CopiesParams = Field(default_factory=CopiesParams)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()

    @model_validator(mode="before")
    @classmethod
    def _empty_sections(cls, raw: Any) -> Any:
        """A section written with no keys (`train:`) is YAML's null: take it as all defaults."""
        if isinstance(raw, dict):
            return {key: {} if value is None else value for key, value in raw.items()}
        return raw

    @model_validator(mode="after")
    def _across_sections(self, info: ValidationInfo) -> Params:
        if (info.context or {}).get("check", True):
            try:
                _check_cross(self)
            except ParamsError as error:
                raise ValueError(str(error)) from None
        return self


def _check_cross(params: Params) -> None:
    """Checks that involve keys of more than one section."""
    member_sizes(params)
    sampler = params.triplets.sampler
    if params.train.miner != "none" and sampler != "pk":
        raise ParamsError(
            f"train.miner: {params.train.miner!r} mines inside class-balanced batches; "
            "set triplets.sampler: pk"
        )
    if params.train.loss == "multi_similarity" and sampler != "pk":
        raise ParamsError(
            "train.loss: multi_similarity needs class-balanced batches; set triplets.sampler: pk"
        )
    _check_distributed(params)


def _check_distributed(params: Params) -> None:
    """Several processes split each step's rows: every process must get whole classes to compare."""
    train, world = params.train, params.train.devices * params.train.nodes
    if train.cross_rank_negatives and params.triplets.sampler != "pk":
        raise ParamsError(
            "train.cross_rank_negatives: the random sampler's triplets already name "
            "their negatives; set triplets.sampler: pk or train.cross_rank_negatives: false"
        )
    if world == 1 or params.triplets.sampler != "pk":
        return
    classes = params.triplets.classes_per_batch
    if classes % world:
        raise ParamsError(
            f"triplets.classes_per_batch: {classes} classes do not split evenly over "
            f"train.devices x train.nodes = {world} processes; make it a multiple of {world}"
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


def every_inference_size(params: Params) -> list[int]:
    """Every member's inference sizes, the first member's first, without reading train.members.

    What the frozen-prefix features are computed at: an edit of the number of members (which
    `member_sizes` reads) must not change them. A member without sizes embeds at the stored one.
    """
    sizes = params.model.inference_sizes
    lists = sizes if sizes and isinstance(sizes[0], list) else [sizes]
    stored = params.preprocess.image_size
    return list(dict.fromkeys(s for own in lists for s in (own or [stored])))


def parse_freeze(value: str | int) -> int | None:
    """`train.freeze` as a stage count: None = nothing frozen; a large number = everything.

    Returns:
        The Python-slice end of the frozen stages (`stages[:n]`), or None for `none`.

    Raises:
        ParamsError: not none, all or a whole number.
    """
    text = str(value).strip().lower()
    if text == "none":
        return None
    if text == "all":
        return 10**6
    try:
        if isinstance(value, bool):
            raise ValueError
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
        check: also run the checks across sections (miner needs pk batches, ...).

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
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of sections, got {raw!r}")
    try:
        return Params.model_validate(raw, context={"check": check})
    except ValidationError as error:
        raise ParamsError(error_line(error)) from None


# --- pydantic's errors as our one-line messages ------------------------------------------------

_EXPECTED = {
    "bool_type": "true or false",
    "int_type": "an integer",
    "float_type": "a number",
    "string_type": "a string",
    "list_type": "a list",
    "model_type": "a mapping",
    "dict_type": "a mapping",
}
_BOUNDS = {
    "greater_than_equal": ("ge", ">="),
    "greater_than": ("gt", ">"),
    "less_than_equal": ("le", "<="),
    "less_than": ("lt", "<"),
}


def error_line(error: ValidationError) -> str:
    """The first error of a `Params` validation as one line that names the key."""
    first = error.errors(include_url=False)[0]
    kind, value, ctx = first["type"], first["input"], first.get("ctx") or {}
    names, model, rest, annotation = _walk(first["loc"])
    key = ".".join(names)
    if kind == "value_error":  # our validators' messages already name their key
        return str(ctx["error"])
    if kind == "extra_forbidden":
        unknown = ".".join([*names, str(rest[0])])
        known = ", ".join(model.model_fields) if model else ""
        return f"unknown key {unknown}; known keys{' of ' + key if key else ''}: {known}"
    if kind in _EXPECTED:
        return f"{key}: expected {_EXPECTED[kind]}, got {value!r}"
    if kind == "literal_error":
        return f"{key}: {value!r} is not one of {', '.join(map(str, _literal_args(annotation)))}"
    if kind in _BOUNDS:
        name, word = _BOUNDS[kind]
        limit = ctx[name]
        shown = float(value) if isinstance(limit, float) and isinstance(value, int) else value
        return f"{key}: {shown!r} must be {word} {limit}"
    return f"{key or 'params.yaml'}: {first['msg']}"


def _walk(loc: tuple) -> tuple[list[str], type[BaseModel] | None, tuple, Any]:
    """Follow an error location through the models: (key names, the model the last name
    belongs to or is, the unmatched rest of `loc`, the last field's annotation)."""
    model: type[BaseModel] | None = Params
    names: list[str] = []
    annotation: Any = None
    for i, part in enumerate(loc):
        if isinstance(part, int):  # a list item: the key is the list's
            continue
        if model is None or part not in model.model_fields:
            return names, model, loc[i:], annotation
        annotation = model.model_fields[part].annotation
        names.append(part)
        inner = annotation if isinstance(annotation, type) else None
        model = inner if inner is not None and issubclass(inner, BaseModel) else None
    return names, model, (), annotation


def _literal_args(annotation: Any) -> tuple:
    """The choices of the `Literal` inside `annotation` (e.g. `list[Literal[...]]`)."""
    if typing.get_origin(annotation) is Literal:
        return typing.get_args(annotation)
    for arg in typing.get_args(annotation):
        found = _literal_args(arg)
        if found:
            return found
    return ()
