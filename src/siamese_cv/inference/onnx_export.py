"""ONNX exports of embedding networks, kept on disk by content so that each is made once.

`torch.onnx.export` takes 11-14 s for Lite2 on two cores, and every stage that runs the
onnxruntime engine, and every `siamese-search --engine onnxruntime` query, would pay it again.
The file is named by a hash of everything the export depends on: the module tree, the source of
each module class (`source_of`), every parameter and buffer, the input size and the versions of
torch, timm, onnx and onnxscript; a changed model never meets a stale file. ONNX files are
protobuf, not pickles. The directory is `$SIAMESE_CV_CACHE/onnx` (default
`~/.cache/siamese-cv/onnx`), holds the `KEEP` most recently used exports, and is optional: where
it cannot be written, the export goes to a temporary directory as before.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import inspect
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from siamese_cv.core.cache import cache_root
from siamese_cv.core.errors import UserError

KEEP = 8  # exports kept; a Lite2 export is about 25 MB, a ResNet-50 one about 100 MB


def cache_dir() -> Path | None:
    """Where exports are kept; None when no directory can be named (then nothing is cached)."""
    root = cache_root()
    return None if root is None else root / "onnx"


def export_key(model: nn.Module, image_size: int | tuple[int, ...]) -> str:
    """A hash of what the exported graph depends on (see the module docstring)."""
    digest = hashlib.sha256()
    versions = [_version(name) for name in ("torch", "timm", "onnx", "onnxscript")]
    digest.update(f"{versions} {image_size} {repr(model)}".encode())
    for cls in sorted({type(m) for m in model.modules()}, key=lambda c: c.__qualname__):
        digest.update(source_of(cls).encode())
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:32]


def source_of(cls: type) -> str:
    """The code a module class's exported graph depends on.

    For this package's classes, their whole source file, so that a helper their `forward`
    calls (a resize, a pooling formula) is covered too; for a library's classes, `forward`
    (the library's version is in the key beside it).
    """
    try:
        if cls.__module__.startswith("siamese_cv."):
            return inspect.getsource(sys.modules[cls.__module__])
        return inspect.getsource(cls.forward)
    except (OSError, TypeError):  # source unavailable: the versions stand in for it
        return f"{cls.__module__}.{cls.__qualname__}"


@contextlib.contextmanager
def exported(model: nn.Module, image_size: int | tuple[int, ...]) -> Iterator[Path]:
    """An ONNX file of `model` (input `images` [batch, 3, size, size] -> `features`).

    `image_size` may instead be a whole input shape without the batch, e.g. a feature map's
    (channels, height, width) for the part of a network after its frozen prefix.

    Yields a cached file when there is one, else exports (and caches it when the cache can be
    written). Only valid inside the `with` block when the cache cannot be written.

    Raises:
        UserError: the model cannot be exported; the message says to use engine torch.
    """
    directory = cache_dir()
    path = directory / f"{export_key(model, image_size)}.onnx" if directory else None
    if path is not None and path.is_file():
        with contextlib.suppress(OSError):
            os.utime(path)  # most recently used: kept by the next prune
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="siamese-cv-onnx-") as tmp:
        fresh = Path(tmp) / "model.onnx"
        _export(model, image_size, fresh)
        yield _keep(fresh, path) if path is not None else fresh


def _export(model: nn.Module, image_size: int | tuple[int, ...], path: Path) -> None:
    shape = image_size if isinstance(image_size, tuple) else (3, image_size, image_size)
    example = torch.zeros(2, *shape)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's notices, not the user's concern
            program = torch.onnx.export(
                model,
                (example,),
                dynamo=True,
                verbose=False,
                input_names=["images"],
                output_names=["features"],
                dynamic_shapes=({0: torch.export.Dim("batch")},),
            )
        program.save(str(path))
    except Exception as error:  # the exporter raises many types; all mean "not exportable"
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise UserError(
            f"engine onnxruntime: cannot export {type(model).__name__} to ONNX ({reason}); "
            "use engine torch"
        ) from error


def _keep(fresh: Path, path: Path) -> Path:
    """Move a fresh single-file export into the cache; the fresh file if that cannot be done."""
    if len(list(fresh.parent.iterdir())) != 1:  # weights saved beside the graph: not cached
        return fresh
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, part = tempfile.mkstemp(dir=path.parent, suffix=".part")
    except OSError:
        return fresh
    try:
        os.close(handle)
        shutil.copyfile(fresh, part)
        os.replace(part, path)  # atomic: a killed process leaves only a .part file
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(part)
        return fresh
    _prune(path.parent)
    return path


def _prune(directory: Path) -> None:
    """Keep the `KEEP` most recently used exports; drop .part files of killed exports."""
    files = sorted(directory.glob("*.onnx"), key=lambda p: p.stat().st_mtime, reverse=True)
    stale = [p for p in directory.glob("*.part") if time.time() - p.stat().st_mtime > 3600]
    for old in files[KEEP:] + stale:
        with contextlib.suppress(OSError):
            old.unlink()


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "-"
