"""The frozen prefix's feature maps of the photos embedded after training, computed once.

With `train.freeze`, a trained network's first stages are the pretrained ones, unchanged, so the
`prefix_maps` stage runs the gallery, the test photos and the copies through them once, at every
inference size, and after each training run `export_gallery` and `evaluate` run only the trained
rest on the stored maps (on EfficientNet-Lite2 cut before its last three stages, about a sixth of
the network's inference). A model whose prefix is not the stored one (other weights, another
freeze), another engine or precision, or another preprocessing embeds from the images instead.

On disk, in the stage's folder: `<set>_<size>.npy` in float32 (`data/arrays.py`), memory-mapped
when read, and `card.json`, which says what made them.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from siamese_cv.config.params import parse_freeze
from siamese_cv.core.atomic import atomic_path, read_json, write_json
from siamese_cv.data.arrays import load_tensor
from siamese_cv.inference.embedder import Embedder
from siamese_cv.inference.hardware import Precision
from siamese_cv.models.ensemble import Ensemble
from siamese_cv.models.siamese import EmbeddingNet, Preprocessing

log = logging.getLogger(__name__)

CARD = "card.json"
BUDGET_BYTES = 6 * 2**30  # as the training features': above it, the stages embed the images


def prefix_fingerprint(prefix: nn.Module) -> str:
    """A hash of the prefix's weights and buffers: a trained model's prefix must match it."""
    digest = hashlib.sha256()
    for name, tensor in prefix.state_dict().items():
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def ids_digest(ids: Sequence[str]) -> str:
    """A short hash of a photo set's ids in order: maps stand in only for the same photos."""
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]


def _setting(prep: Preprocessing) -> dict[str, Any]:
    """What of the preprocessing changes the maps: the stored size, resize and normalisation."""
    return {k: v for k, v in prep.to_dict().items() if k != "input_sizes"}


@dataclass(frozen=True)
class PhotoSet:
    """Photos to store maps of: a name (`gallery`, `test`, `copies`), how many, how to run them.

    `run(embedder, label)` embeds them as the stage that reads the maps would embed the images
    (stored photos decoded as they are, copies resized as search resizes a query); `about` says
    which photos they are (their ids, the copies' seed), checked on use.
    """

    name: str
    count: int
    run: Callable[[Embedder, str], np.ndarray]
    about: dict[str, Any]

    @classmethod
    def stored(cls, name: str, images: Sequence[bytes], about: dict[str, Any]) -> PhotoSet:
        """Processed photos (stored at the image size), decoded as `Embedder` decodes them."""
        return cls(name, len(images), lambda e, label: e.embed_encoded(images, label), about)


def write_prefix_maps(
    folder: Path,
    prefix: nn.Module,
    fingerprint: str,
    prep: Preprocessing,
    sizes: Sequence[int],
    sets: Sequence[PhotoSet],
    precision: Precision,
    batch_size: int,
    engine: str,
    about: dict[str, Any],
) -> dict[str, Any]:
    """Run `prefix` over every set at every size and write the maps and the card; returns it.

    Over `BUDGET_BYTES` it writes only the card, saying so: the stages then embed the images.
    """

    def extractor(size: int) -> Embedder:
        at = replace(prep, input_sizes=() if size == prep.image_size else (size,))
        return Embedder(prefix, at, precision, batch_size, normalize=False, engine=engine)

    per_photo = {size: map_bytes(prefix, size, precision.device) for size in sizes}
    needed = sum(s.count for s in sets) * sum(per_photo.values())
    # over the budget nothing runs: the card alone says why (the extractors' exports cost seconds)
    extractors = {size: extractor(size) for size in sizes} if needed <= BUDGET_BYTES else {}
    card: dict[str, Any] = {
        **about,
        "prefix_fingerprint": fingerprint,
        "preprocessing": _setting(prep),
        "engine": engine,
        "precision": _stored_precision(engine, precision),
        "sizes": list(sizes),
        "sets": {s.name: {"count": s.count, **s.about} for s in sets},
    }
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        if needed > BUDGET_BYTES:
            why = (
                f"{needed / 2**30:.1f} GiB of maps, over the {BUDGET_BYTES / 2**30:.0f} GiB budget"
            )
            write_json(tmp / CARD, {**card, "stored": False, "why": why})
            return {**card, "stored": False, "why": why}
        started = time.perf_counter()
        for photos in sets:
            for size in sizes:
                maps = photos.run(extractors[size], f"prefix_maps: {photos.name} at {size} px")
                np.save(tmp / f"{photos.name}_{size}.npy", maps, allow_pickle=False)
        written = sum(f.stat().st_size for f in tmp.iterdir())
        card = {
            **card,
            "stored": True,
            "bytes": written,
            "fill_seconds": round(time.perf_counter() - started, 1),
        }
        write_json(tmp / CARD, card)
    return card


def _stored_precision(engine: str, precision: Precision) -> str:
    """The precision `engine` computes in: the onnxruntime engine runs fp32 (`Embedder`)."""
    return "fp32" if engine == "onnxruntime" else precision.name


def map_bytes(prefix: nn.Module, size: int, device: torch.device, itemsize: int = 4) -> int:
    """Bytes of `prefix`'s output for one photo at `size` px, its values `itemsize` bytes each."""
    with torch.inference_mode():
        sample = prefix.eval()(torch.zeros(1, 3, size, size, device=device))
    return sample.numel() * itemsize


@dataclass
class _Tail:
    """One member's trained rest after the prefix, and the sizes it embeds at."""

    module: nn.Module
    sizes: tuple[int, ...]


class TailEmbedder:
    """Embeds stored photo sets with a trained model's rest after its frozen prefix.

    The embedding is what the whole model gives on the images: per (member, size), the rest on
    that size's maps, L2-normalised; their mean, normalised again (`models/ensemble.py`).
    """

    def __init__(
        self,
        folder: Path,
        card: dict[str, Any],
        tails: list[_Tail],
        prep: Preprocessing,
        precision: Precision,
        batch_size: int,
        engine: str,
    ):
        self.folder, self.card, self.tails = folder, card, tails
        self.prep, self.batch_size, self.engine = prep, batch_size, engine
        self.precision = precision
        self.precision_name = _stored_precision(engine, precision)  # for the gallery's card
        self._embedders: dict[tuple[int, int], Embedder] = {}

    def covers(self, name: str, about: dict[str, Any], stage: str) -> bool:
        """Whether set `name` was stored for exactly the photos `about` describes (else says so)."""
        stored = self.card["sets"].get(name)
        if stored is not None and all(stored.get(k) == v for k, v in about.items()):
            return True
        log.info("%s: %s: embedding the images (no stored maps of these photos)", stage, name)
        return False

    def _embedder(self, index: int, size: int, shape: tuple[int, ...]) -> Embedder:
        if (index, size) not in self._embedders:
            self._embedders[index, size] = Embedder(
                self.tails[index].module,
                replace(self.prep, input_sizes=()),
                self.precision,
                self.batch_size,
                engine=self.engine,
                input_shape=shape,
            )
        return self._embedders[index, size]

    def embed(self, name: str, progress: str) -> np.ndarray:
        """Set `name`'s embeddings, float32 [n, D], L2-normalised."""
        started = time.perf_counter()
        total: torch.Tensor | None = None
        pairs = 0
        for index, tail in enumerate(self.tails):
            for size in tail.sizes:
                maps = load_tensor(self.folder / f"{name}_{size}.npy", torch.float32, _CPU)
                embedder = self._embedder(index, size, tuple(maps.shape[1:]))
                member = f", member {index + 1}" if len(self.tails) > 1 else ""
                vectors = embedder.embed_batches(
                    _slices(maps, self.batch_size), len(maps), f"{progress}{member} at {size} px"
                )
                total = torch.from_numpy(vectors) + (0 if total is None else total)
                pairs += 1
        if total is None:
            raise ValueError("a tail embedder without members")
        out = torch.nn.functional.normalize(total / pairs, dim=1).numpy()
        log.info(
            "%s: %d photos from the stored prefix maps in %.1f s",
            progress,
            len(out),
            time.perf_counter() - started,
        )
        return out


_CPU = torch.device("cpu")


def _slices(maps: torch.Tensor, size: int) -> Iterator[Callable[[], torch.Tensor]]:
    for start in range(0, len(maps), size):
        yield lambda start=start: maps[start : start + size].clone()


def tail_embedder(
    folder: Path,
    model: nn.Module,
    config: dict[str, Any],
    precision: Precision,
    batch_size: int,
    engine: str,
    stage: str,
) -> TailEmbedder | None:
    """A `TailEmbedder` for the trained `model` (from `load_checkpoint`) on `folder`'s maps.

    None, with one line saying why, when the maps cannot stand in for the images: none stored,
    another engine or precision (`precision` as the stage would embed with `engine`), another
    preprocessing, or a model whose frozen prefix is not the stored one.
    """
    prep = Preprocessing.from_dict(config["preprocessing"])
    if isinstance(model, Ensemble):
        if prep.input_sizes:
            return _refuse(stage, "an ensemble with preprocessing input sizes")
        members = list(zip(model.members, model.sizes, strict=True))
    else:
        members = [(model, tuple(prep.input_sizes))]
    n_frozen = parse_freeze(config.get("train", {}).get("freeze", "none"))
    card = _card(folder)
    return _tail_embedder(
        folder, card, members, n_frozen, prep, precision, batch_size, engine, stage
    )


def frozen_tail_embedder(
    folder: Path,
    network: nn.Module,
    prep: Preprocessing,
    precision: Precision,
    batch_size: int,
    engine: str,
    stage: str,
) -> TailEmbedder | None:
    """A `TailEmbedder` for an untrained pretrained `network` (the baseline, the copy
    descriptor), cut where the stored maps were cut; None (saying why) as `tail_embedder`."""
    card = _card(folder)
    n_frozen = card.get("frozen_stages") if card else None
    members = [(network, tuple(prep.input_sizes))]
    return _tail_embedder(
        folder, card, members, n_frozen, prep, precision, batch_size, engine, stage
    )


def from_maps_or_images(
    tail: TailEmbedder | None,
    name: str,
    about: dict[str, Any],
    stage: str,
    images: Callable[[], np.ndarray],
) -> np.ndarray:
    """Set `name`'s embeddings from the stored maps when they are of these photos (`about`),
    else `images()`: the same vectors either way."""
    if tail is not None and tail.covers(name, about, stage):
        return tail.embed(name, f"{stage}: {name}")
    return images()


def _card(folder: Path) -> dict[str, Any] | None:
    return read_json(folder / CARD) if (folder / CARD).is_file() else None


def _refuse(stage: str, why: str) -> None:
    log.info("%s: embedding the images (the stored prefix maps do not apply: %s)", stage, why)


def _tail_embedder(
    folder: Path,
    card: dict[str, Any] | None,
    members: list[tuple[nn.Module, Sequence[int]]],
    n_frozen: int | None,
    prep: Preprocessing,
    precision: Precision,
    batch_size: int,
    engine: str,
    stage: str,
) -> TailEmbedder | None:
    if card is None:
        return None
    why = _mismatch(card, prep, engine, precision)
    if why is not None:
        return _refuse(stage, why)
    tails: list[_Tail] = []
    for member, own_sizes in members:
        parts = None
        if isinstance(member, EmbeddingNet) and n_frozen:
            member.freeze(n_frozen)  # a saved model does not record what was frozen
            parts = member.split_frozen()
        sizes = tuple(own_sizes) or (prep.image_size,)
        if parts is None:
            return _refuse(stage, "the model has no frozen prefix")
        if prefix_fingerprint(parts[0]) != card["prefix_fingerprint"]:
            return _refuse(
                stage, "the model's frozen prefix is not the one the maps were made with"
            )
        if missing := [s for s in sizes if s not in card["sizes"]]:
            return _refuse(stage, f"no maps at {', '.join(map(str, missing))} px")
        tails.append(_Tail(parts[1], sizes))
    log.info("%s: the frozen prefix's maps are stored in %s: running the rest", stage, folder)
    return TailEmbedder(folder, card, tails, prep, precision, batch_size, engine)


def _mismatch(card: dict[str, Any], prep: Preprocessing, engine: str, precision: Precision):
    if not card.get("stored", False):
        return card.get("why", "none stored")
    if card["engine"] != engine:
        return f"made with engine {card['engine']}, this stage runs {engine}"
    ran = _stored_precision(engine, precision)
    if card["precision"] != ran:
        return f"made in {card['precision']}, this stage runs {ran}"
    if card["preprocessing"] != _setting(prep):
        return "made with other preprocessing"
    return None
