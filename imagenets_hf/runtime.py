"""Where the code runs, in which precision, and how much memory a step took: one home for each of these decisions.

- `resolve_device`: the device a run uses when none is named (a CUDA GPU when there is one, else the CPU);
  `accelerator_available` says whether any accelerator is there (multi-process runs without one need accelerate's
  CPU mode).
- `resolve_dtype` / `DTYPE_NAMES`: every precision name the command lines and recipes use ("fp32", "bf16", "fp16",
  the long torch names, accelerate's "no") and `"auto"` (bf16 only where the GPU computes in it natively:
  `cuda_bf16_native`); `autocast_dtype` turns accelerate's `mixed_precision` into the autocast dtype evaluation uses.
- `set_tf32`: whether float32 matmuls and convolutions on CUDA may use TF32 tensor cores (a training choice).
- `make_accelerator`: an `accelerate.Accelerator` with the settings asked for, not those of an earlier one in the
  same process.
- `describe_machine`: the words that name where a figure was measured (the GPU's name, or the CPU and its cores).
- `set_deterministic`: deterministic algorithms on or off (torch, cuDNN, cuBLAS's workspace), which CUDA training
  needs to repeat itself bit for bit (a resumed run then equals an uninterrupted one, as on the CPU).
- `worker_context` / `bounded_batches`: how DataLoader workers start (a fork server, never a fork of a
  multi-threaded process) and how long a batch from them may take.
- `one_thread`: torch's CPU ops on one thread inside a block, for many small ops (per-image metric statistics): with
  several threads each op spends more on waking and joining them than on its work, most of all when the other cores
  are busy (DataLoader workers, other jobs).
- `RssPeak`: the peak resident memory of the process while a block runs, sampled every 2 ms (CPU tensors have no
  allocator statistics; tracemalloc does not see torch's allocations).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import platform
import resource
import threading
from collections.abc import Iterable, Iterator
from typing import Any

import torch

# Imported once by the fork server, so that each DataLoader worker (a fork of it) starts with torch, OpenCV, datasets,
# the augmentation and the evaluation's decoding already loaded.
WORKER_PRELOAD = ["imagenets_hf.training.data", "imagenets_hf.evaluation.inference"]


def worker_context() -> multiprocessing.context.BaseContext:
    """The start method of every DataLoader's workers: `forkserver`. A worker forked from a training process inherits
    every lock another thread of it holds at that moment (the mask-decoding thread pool's, gloo's, TensorBoard's,
    tqdm's, a pin-memory thread's), held forever in the worker: seen as a worker stuck in its first `cv2.imdecode`,
    about one 2-process CPU run in three. The fork server is a fresh single-threaded process started once (fork +
    exec), so its forks inherit no held lock."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(WORKER_PRELOAD)  # no effect once the fork server runs (it has them then)
    return context


def bounded_batches(batches: Iterable[Any], timeout: float, what: str, hint: str) -> Iterator[Any]:
    """`batches` from a DataLoader with workers and `timeout`; a batch that did not come in time ends in one line
    (TimeoutError: "<what>: no batch from the DataLoader workers in N s ...; <hint>") instead of torch's
    "DataLoader timed out" RuntimeError."""
    iterator = iter(batches)
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except RuntimeError as err:
            if "DataLoader timed out" not in str(err):
                raise
            raise TimeoutError(
                f"{what}: no batch from the DataLoader workers in {timeout:g} s (a worker is stuck or far too slow); "
                f"{hint}"
            ) from None
        yield batch


# Precision names -> torch dtypes. "no" is accelerate's name for full precision.
DTYPE_NAMES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "no": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """`"auto"` (or None): CUDA when available, else the CPU; any other name or device as `torch.device` takes it."""
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def describe_machine(device: torch.device | None = None) -> str:
    """ "NVIDIA H100 80GB HBM3" on a CUDA device (the current one when `device` is None and CUDA is there), else
    "x86_64 CPU, 16 cores"."""
    if device is None and torch.cuda.is_available():
        device = torch.device("cuda")
    if device is not None and device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.machine() or 'unknown'} CPU, {os.cpu_count()} cores"


def accelerator_available() -> bool:
    """Whether torch sees an accelerator (CUDA, or another backend through `torch.accelerator` where it exists)."""
    if hasattr(torch, "accelerator"):
        return torch.accelerator.is_available()
    return torch.cuda.is_available()


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device | None = None) -> torch.dtype | None:
    """A torch dtype from a precision name (`DTYPE_NAMES`) or a dtype; None stays None (full precision, no
    autocast). `"auto"`: bfloat16 on a GPU that computes in it natively (`cuda_bf16_native`), float16 on other CUDA
    GPUs, float32 elsewhere (`device` default: `resolve_device()`)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        device = device if device is not None else resolve_device()
        if device.type == "cuda":
            return torch.bfloat16 if cuda_bf16_native(device) else torch.float16
        return torch.float32
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {dtype!r}; expected auto or one of {sorted(DTYPE_NAMES)}")
    return DTYPE_NAMES[dtype]


def cuda_bf16_native(device: torch.device | str | None = None) -> bool:
    """Whether the CUDA GPU `device` (default: the current one) has bfloat16 tensor cores: compute capability 8.0
    (Ampere) or newer. `torch.cuda.is_bf16_supported()` also says True on older GPUs that only emulate bfloat16
    (slower than float16 there), unless asked `including_emulation=False` (torch >= 2.3); the capability is asked
    directly so that older torch versions answer the same."""
    if not torch.cuda.is_available():
        return False
    if torch.version.hip:  # ROCm GPUs that run torch support bfloat16
        return True
    index = torch.cuda.current_device() if device is None else torch.device(device).index
    major, _ = torch.cuda.get_device_capability(index)
    return major >= 8


def set_tf32(enabled: bool, device: torch.device | str) -> bool:
    """On a CUDA `device`, let float32 matmuls and cuDNN convolutions use TF32 tensor cores (`enabled`) or keep them
    in full float32; return whether TF32 is in use (False on other devices and on GPUs older than Ampere, which have
    none). PyTorch turned TF32 matmuls off by default in 1.12 (convolutions stayed on); mmsegmentation 0.x ran on
    earlier versions, where both were on. Process-wide, as torch's flags are."""
    if torch.device(device).type != "cuda":
        return False
    # The legacy pair of switches, not `torch.backends.*.fp32_precision`: torch refuses to read the matmul precision
    # once both APIs were used, and torch.compile and other libraries read it through the legacy one.
    torch.set_float32_matmul_precision("high" if enabled else "highest")
    torch.backends.cudnn.allow_tf32 = enabled
    return enabled and torch.cuda.get_device_capability(torch.device(device).index)[0] >= 8


def autocast_dtype(mixed_precision: str | None) -> torch.dtype | None:
    """The autocast dtype of accelerate's `mixed_precision` ("fp16", "bf16"); None for "no" / full precision."""
    dtype = resolve_dtype(None if mixed_precision is None else str(mixed_precision))
    return None if dtype == torch.float32 else dtype


# cuBLAS's documented setting for reproducible results (a fixed workspace per stream); ":16:8" also qualifies.
CUBLAS_WORKSPACE_CONFIG = ":4096:8"


def set_deterministic(on: bool) -> dict[str, object]:
    """Deterministic algorithms on or off for this process: `torch.use_deterministic_algorithms(on)` (an op with no
    deterministic kernel then raises, naming itself), cuDNN deterministic and not benchmarking, and with `on`
    `CUBLAS_WORKSPACE_CONFIG=:4096:8` unless the environment already holds one. torch sizes cuBLAS's workspace
    from that variable once per process, at its first cuBLAS call (`getChosenWorkspaceSize` caches it), and refuses
    cuBLAS calls in deterministic mode without it: call this before anything runs on the GPU (`finetune` does,
    first thing). Off, the flags go back to torch's defaults (the variable stays). Returns the settings, for the run's record."""
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE_CONFIG)
    torch.use_deterministic_algorithms(on)
    torch.backends.cudnn.deterministic = on
    torch.backends.cudnn.benchmark = False
    return {
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    }


def make_accelerator(**kwargs):
    """`accelerate.Accelerator(**kwargs)` with exactly these settings. accelerate keeps one `AcceleratorState` per
    process and gives every later Accelerator the first one's torch.compile backend (and refuses another mixed
    precision), so a second run in the same process (a notebook, the tests) would train with the first run's
    settings. That state is dropped first; the process group and device (`PartialState`) stay."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    return Accelerator(**kwargs)


@contextlib.contextmanager
def one_thread():
    """torch's intra-op threads at 1 inside the block, restored after (a process-wide setting: torch ops of other
    Python threads run on one thread meanwhile too)."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def rss_bytes() -> int:
    """The process's resident set size now (Linux `/proc/self/statm`; elsewhere the peak so far, `ru_maxrss`)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class RssPeak:
    """Context manager: the peak resident memory while its block runs, sampled every `interval_s` seconds in a
    thread. `start_bytes`, `peak_bytes` and `growth_bytes` (peak - start) are set on exit."""

    def __init__(self, interval_s: float = 0.002):
        self.interval_s = interval_s
        self.start_bytes = self.peak_bytes = 0

    @property
    def growth_bytes(self) -> int:
        return self.peak_bytes - self.start_bytes

    def __enter__(self) -> RssPeak:
        self.start_bytes = self.peak_bytes = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak_bytes = max(self.peak_bytes, rss_bytes())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, rss_bytes())
