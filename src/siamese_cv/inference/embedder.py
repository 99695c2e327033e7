"""The one batched embedder: training caches, evaluation, the gallery and search all use it.

It always runs the network in eval mode under `inference_mode`, overlaps JPEG decoding (in a
thread: Pillow releases the GIL) with inference, uses bf16 autocast + channels_last where the
hardware is fast at it, and returns float32 vectors, L2-normalised unless asked for raw features.

Engines: `torch` runs the module itself; `onnxruntime` exports the same module (backbone and
head) to ONNX when the embedder is made (seconds; cached by content, `onnx_export.py`), and runs
it with ONNX Runtime in fp32 on the CPU. Decoding, batching and normalisation are the same for both.
"""

from __future__ import annotations

import functools
import io
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence, Sized
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from PIL import Image
from torch import nn

from siamese_cv.config.choices import ENGINES
from siamese_cv.core import logs
from siamese_cv.core.errors import UserError
from siamese_cv.data.parquet import count_rows, iter_batches
from siamese_cv.inference.hardware import Precision
from siamese_cv.inference.onnx_export import exported
from siamese_cv.models.ensemble import at_sizes
from siamese_cv.models.siamese import Preprocessing

log = logging.getLogger(__name__)

ONNX_PACKAGES = "onnxruntime==1.32.0 onnx==1.23.2 onnxscript==0.7.2"  # as requirements.txt pins


def to_tensor(images: Sequence[Image.Image], prep: Preprocessing) -> torch.Tensor:
    """Stack same-size RGB images into a normalised float batch [B, 3, H, W]."""
    array = np.stack([np.asarray(img.convert("RGB"), dtype=np.uint8) for img in images])
    batch = torch.from_numpy(array).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(prep.mean).view(1, 3, 1, 1)
    std = torch.tensor(prep.std).view(1, 3, 1, 1)
    return batch.sub_(mean).div_(std)


def decode_batch(encoded: Sequence[bytes], prep: Preprocessing) -> torch.Tensor:
    """Decode already-resized image bytes (from data/processed) into a normalised batch."""
    images = []
    for data in encoded:
        img = Image.open(io.BytesIO(data))
        img.draft("RGB", (prep.image_size, prep.image_size))
        img = img.convert("RGB")
        if img.size != (prep.image_size, prep.image_size):
            img = img.resize((prep.image_size, prep.image_size), Image.Resampling.BICUBIC)
        images.append(img)
    return to_tensor(images, prep)


class Embedder:
    """Embeds batches of images with `model` on `precision.device`.

    Args:
        model: maps [B, 3, H, W] to [B, D]; put in eval mode here, whatever it was.
        prep: the preprocessing the model was trained with; with `input_sizes`, the model runs
            inside a wrapper that resizes the stored-size batch (`models/ensemble.py`).
        precision: device, autocast dtype and memory format (see `hardware.resolve_precision`);
            the onnxruntime engine runs fp32 on the CPU and records that as its precision.
        batch_size: images per forward pass.
        normalize: L2-normalise the outputs (True for every search/metric use).
        engine: `torch`, or `onnxruntime` (the model exported to ONNX, run by ONNX Runtime
            with as many threads as torch would use).
        ort: the onnxruntime session's settings (default: `OrtSettings()`).
        input_shape: what `model` takes without the batch, when not a [3, size, size] image
            (a feature map, for the part after a frozen prefix); only the ONNX export needs it.

    Raises:
        UserError: the onnxruntime engine without the onnxruntime or onnxscript package.
    """

    def __init__(
        self,
        model: nn.Module,
        prep: Preprocessing,
        precision: Precision,
        batch_size: int = 64,
        normalize: bool = True,
        engine: str = "torch",
        ort: OrtSettings | None = None,
        input_shape: tuple[int, ...] | None = None,
    ):
        if engine not in ENGINES:
            raise ValueError(f"engine {engine!r} is not one of {', '.join(ENGINES)}")
        self.prep = prep
        self.batch_size = batch_size
        self.normalize = normalize
        self.engine = engine
        self._session = None
        model = at_sizes(model, prep.sizes, prep.image_size)
        if engine == "onnxruntime":
            self.precision = Precision(torch.device("cpu"), None, channels_last=False)
            self.model = model.eval().to("cpu")
            shape = input_shape or prep.image_size
            self._session = _ort_session(self.model, shape, ort or OrtSettings())
            return
        self.precision = precision
        self.model = model.eval().to(precision.device, memory_format=precision.memory_format)

    @torch.inference_mode()
    def embed_tensor(self, batch: torch.Tensor) -> np.ndarray:
        """Embed one preprocessed batch; returns float32 [B, D]."""
        if self._session is not None:
            # run() releases the GIL, so the decoding thread keeps going meanwhile
            (features,) = self._session.run(None, {"images": batch.contiguous().numpy()})
            out = torch.from_numpy(features)
        else:
            p = self.precision
            batch = batch.to(p.device, non_blocking=True).contiguous(memory_format=p.memory_format)
            with p.autocast():
                out = self.model(batch)
        out = out.float()
        if self.normalize:
            out = torch.nn.functional.normalize(out, dim=1)
        return out.cpu().numpy()

    def embed_encoded(
        self, encoded: Iterable[bytes], progress: str | None = None, total: int | None = None
    ) -> np.ndarray:
        """Embed image bytes, decoding the next batch while the current one runs.

        Args:
            progress: a label: show a bar under it while embedding, and log a summary line.
            total: how many images `encoded` holds, for the bar (default: its length, if any).
        """
        if total is None and isinstance(encoded, Sized):
            total = len(encoded)
        return self.embed_batches(
            (
                functools.partial(decode_batch, chunk, self.prep)
                for chunk in _chunks(encoded, self.batch_size)
            ),
            total,
            progress,
        )

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        chunks = [images[i : i + self.batch_size] for i in range(0, len(images), self.batch_size)]
        outs = [self.embed_tensor(to_tensor(chunk, self.prep)) for chunk in chunks]
        return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)

    def embed_parquet(self, path: Path, progress: str | None = None) -> np.ndarray:
        """Embed every image of a processed split, streaming it row group by row group.

        Args:
            progress: as in `embed_encoded`.
        """

        def encoded() -> Iterator[bytes]:
            for batch in iter_batches(path, ["image"], self.batch_size):
                yield from batch.column(0).to_pylist()

        return self.embed_encoded(encoded(), progress, count_rows(path) if progress else None)

    def embed_batches(
        self,
        makers: Iterable[Callable[[], torch.Tensor]],
        total: int | None = None,
        progress: str | None = None,
    ) -> np.ndarray:
        """Embed the batches `makers` build, building the next (in a thread) while one runs.

        Args:
            makers: each returns one preprocessed batch.
            total: how many images the batches hold, for the bar (None: unknown).
            progress: a label: show a bar (images, rate, time left) under it while embedding,
                and log `<label>: N images in S s` when done.
        """
        outs: list[np.ndarray] = []
        started = time.perf_counter()
        bar = logs.progress(total=total, desc=progress, unit="img", enabled=progress is not None)

        def embed(batch: torch.Tensor) -> None:
            outs.append(self.embed_tensor(batch))
            bar.update(len(outs[-1]))

        with bar, ThreadPoolExecutor(max_workers=1) as pool:
            pending = None
            for make in makers:
                future = pool.submit(make)
                if pending is not None:
                    embed(pending.result())
                pending = future
            if pending is not None:
                embed(pending.result())
        if not outs:
            raise ValueError("nothing to embed")
        vectors = np.concatenate(outs).astype(np.float32, copy=False)
        if progress is not None:
            seconds = time.perf_counter() - started
            log.info(
                "%s: %d images in %.1f s (%.0f images/s)",
                progress,
                len(vectors),
                seconds,
                len(vectors) / max(seconds, 1e-9),
            )
        return vectors


def import_onnxruntime() -> ModuleType:
    """The onnxruntime module, checked before any work starts.

    Raises:
        UserError: onnxruntime, or onnxscript (which torch.onnx.export needs), is not installed;
            the message says what to install.
    """
    try:
        import onnxruntime
        import onnxscript  # noqa: F401  (torch.onnx.export's exporter imports it)
    except ImportError as error:
        raise UserError(
            f"engine onnxruntime: {error.name or 'onnxruntime'} is not installed; "
            f"pip install {ONNX_PACKAGES} (or use engine torch)"
        ) from None
    return onnxruntime


@dataclass(frozen=True)
class OrtSettings:
    """How the onnxruntime engine's session runs; the defaults are what measured fastest here.

    benchmarks/bench_onnx_settings.py times the alternatives on the profile's ensemble.
    threads: intra-op threads (None: as many as torch uses); spinning: idle workers spin
    instead of sleeping; optimization: ONNX Runtime's graph optimisation level.
    """

    threads: int | None = None
    spinning: bool = False  # sleeping leaves the cores to the decoding thread
    optimization: str = "all"  # all | extended | basic | disabled


def _ort_session(model: nn.Module, shape: int | tuple[int, ...], settings: OrtSettings):
    """`model` exported to ONNX (or its cached export) in an fp32 CPU inference session."""
    ort = import_onnxruntime()
    options = ort.SessionOptions()
    options.intra_op_num_threads = settings.threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.add_session_config_entry(
        "session.intra_op.allow_spinning", "1" if settings.spinning else "0"
    )
    level = ort.GraphOptimizationLevel
    options.graph_optimization_level = {
        "all": level.ORT_ENABLE_ALL,
        "extended": level.ORT_ENABLE_EXTENDED,
        "basic": level.ORT_ENABLE_BASIC,
        "disabled": level.ORT_DISABLE_ALL,
    }[settings.optimization]
    with exported(model, shape) as path:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _chunks(items: Iterable[bytes], size: int) -> Iterator[list[bytes]]:
    chunk: list[bytes] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
