"""One home for the device, the precision names and the memory sampler (imagenets_hf.runtime)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from imagenets_hf.runtime import RssPeak, autocast_dtype, resolve_device, resolve_dtype


def test_precision_names():
    for names, dtype in (
        (("fp32", "float32", "no"), torch.float32),
        (("bf16", "bfloat16"), torch.bfloat16),
        (("fp16", "float16"), torch.float16),
    ):
        assert {resolve_dtype(name) for name in names} == {dtype}
    assert resolve_dtype(None) is None and resolve_dtype(torch.float16) is torch.float16
    assert resolve_dtype("auto", torch.device("cpu")) is torch.float32
    assert autocast_dtype("no") is None and autocast_dtype("fp16") is torch.float16
    assert autocast_dtype("bf16") is torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype 'half'"):
        resolve_dtype("half")


def test_device_choice():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device().type == resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")


def test_rss_peak_sees_an_allocation():
    with RssPeak() as rss:
        block = np.ones(64 * 2**20 // 8)  # 64 MiB, written so that its pages are resident
    del block
    # the sampler reads the RSS at entry, every 2 ms and at exit (the block still held); a lower bound of 32 MiB
    # leaves room for memory the allocator had already freed and now reuses
    assert rss.growth_bytes > 32 * 2**20
