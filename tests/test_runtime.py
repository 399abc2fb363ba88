"""One home for the device, the precision names and the memory sampler (imagenets_hf.runtime)."""

from __future__ import annotations

import mmap

import numpy as np
import pytest
import torch

from imagenets_hf.runtime import RssPeak, autocast_dtype, resolve_device, resolve_dtype, set_tf32


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


@pytest.fixture
def fake_gpu(monkeypatch):
    """torch.cuda answering as on one GPU of a given compute capability (set `fake_gpu["capability"]`), and saying
    bfloat16 is supported as torch does by default on any CUDA GPU that can emulate it. torch's TF32 switches are
    restored afterwards."""
    gpu = {"capability": (8, 0)}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: gpu["capability"])
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    matmul, cudnn = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    yield gpu
    torch.set_float32_matmul_precision(matmul)
    torch.backends.cudnn.allow_tf32 = cudnn


@pytest.mark.parametrize(("capability", "expected"), [((7, 0), torch.float16), ((8, 0), torch.bfloat16)])
def test_auto_precision_is_bf16_only_on_gpus_that_compute_in_it(fake_gpu, capability, expected):
    """ "auto" on a V100 (7.0, bfloat16 emulated: slower than float16) is float16; on an A100 (8.0) bfloat16. (Before,
    `torch.cuda.is_bf16_supported()`, which counts emulation, made it bfloat16 on both.)"""
    fake_gpu["capability"] = capability
    assert resolve_dtype("auto", torch.device("cuda")) is expected


def test_tf32_is_a_choice_applied_on_cuda_only(fake_gpu):
    """On CUDA, `tf32` true lets float32 matmuls ("high" precision) and cuDNN convolutions use TF32 and says whether
    the GPU has it (Ampere, 8.0, and newer); false keeps full float32. Elsewhere nothing changes."""
    assert set_tf32(True, "cuda") is True
    assert torch.get_float32_matmul_precision() == "high" and torch.backends.cudnn.allow_tf32
    assert set_tf32(False, "cuda:0") is False
    assert torch.get_float32_matmul_precision() == "highest" and not torch.backends.cudnn.allow_tf32
    fake_gpu["capability"] = (7, 0)
    assert set_tf32(True, "cuda") is False  # switched on, but a V100 has no TF32
    torch.set_float32_matmul_precision("highest")
    assert set_tf32(True, "cpu") is False and torch.get_float32_matmul_precision() == "highest"


def test_device_choice():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device().type == resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")


def test_rss_peak_sees_an_allocation():
    # Fresh pages from an anonymous mapping, written so that they are resident: memory the allocator had freed earlier
    # in the same process (numpy, torch and glibc keep freed blocks) would be reused without any growth of the RSS.
    size = 64 * 2**20
    with RssPeak() as rss:
        block = mmap.mmap(-1, size)
        np.frombuffer(block, dtype=np.uint8)[:] = 1
    growth = rss.growth_bytes
    block.close()
    # the sampler reads the RSS at entry, every 2 ms and at exit (the block still mapped); the bound leaves room for
    # pages the kernel has not counted yet (RSS counters are per-thread batched)
    assert growth > 48 * 2**20, growth


@pytest.fixture
def restore_determinism(monkeypatch):
    """Put torch's global deterministic flags back after the test (monkeypatch restores the environment)."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    flags = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic)
    benchmark = torch.backends.cudnn.benchmark
    yield
    torch.use_deterministic_algorithms(flags[0])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = flags[1], benchmark


def test_set_deterministic_sets_torch_cudnn_and_cublas(restore_determinism, monkeypatch):
    import os

    from imagenets_hf.runtime import set_deterministic

    torch.backends.cudnn.benchmark = True
    record = set_deterministic(True)
    assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
    assert not torch.backends.cudnn.benchmark and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert record == {
        "deterministic_algorithms": True,
        "cudnn_deterministic": True,
        "cudnn_benchmark": False,
        "cublas_workspace_config": ":4096:8",
    }
    record = set_deterministic(False)
    assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.deterministic
    assert not record["deterministic_algorithms"]
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # the other documented setting is kept
    assert set_deterministic(True)["cublas_workspace_config"] == ":16:8"


def test_one_thread_sets_one_intra_op_thread_and_restores_the_count():
    from imagenets_hf.runtime import one_thread

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(RuntimeError, match="inside"):
            with one_thread():
                assert torch.get_num_threads() == 1
                raise RuntimeError("inside")
        assert torch.get_num_threads() == 2  # restored, after an error too
    finally:
        torch.set_num_threads(before)
