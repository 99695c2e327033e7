"""Tensors on disk as `.npy` files (numpy's own format, no pickle), memory-mapped when read.

bf16 tensors are stored as their raw 16 bits (numpy has no bf16); the reader names the dtype.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch


def save_tensor(path: Path, tensor: torch.Tensor) -> None:
    tensor = tensor.detach().cpu().contiguous()
    array = tensor.view(torch.uint16).numpy() if tensor.dtype is torch.bfloat16 else tensor.numpy()
    np.save(path, array, allow_pickle=False)


def load_tensor(path: Path, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The tensor in `path`, memory-mapped (read-only) on the CPU, or copied to `device`."""
    array = np.load(path, mmap_mode="r", allow_pickle=False)
    with warnings.catch_warnings():  # read-only is what we want: nothing writes to the store
        warnings.filterwarnings("ignore", message=".*not writable.*")
        tensor = torch.from_numpy(array)
    if dtype is torch.bfloat16:
        tensor = tensor.view(torch.bfloat16)
    return tensor if device.type == "cpu" else tensor.to(device)
