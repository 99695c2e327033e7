"""Precision choices: what each request resolves to on this machine's CPU."""

import pytest
import torch

from siamese_cv.core.errors import UserError
from siamese_cv.inference.hardware import resolve_precision
from siamese_cv.models.siamese import build_model

CPU = torch.device("cpu")


def test_fp32_on_a_cpu_runs_channels_last_and_gives_the_same_embeddings():
    precision = resolve_precision("fp32", CPU)
    assert precision.dtype is None and precision.channels_last
    torch.manual_seed(0)
    model, _ = build_model("tiny", "linear", 16)
    images = torch.rand(4, 3, 32, 32)
    with torch.inference_mode():
        plain = model.eval()(images)
        fast = model.to(memory_format=torch.channels_last)(
            images.contiguous(memory_format=torch.channels_last)
        )
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)


def test_fp16_on_a_cpu_is_refused_with_what_to_use_instead():
    with pytest.raises(UserError, match="only on a GPU"):
        resolve_precision("fp16", CPU)
