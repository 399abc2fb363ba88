"""The model benchmark behind `scripts/bench_model.py`: ViT + FCN vs the bare timm VisionTransformer with the same
head written plainly, on the same weights.

Per encoder: forward throughput (eval, no grad), training-step throughput (forward + loss + backward + AdamW step), peak
memory, and the fraction of the machine's matmul peak (measured here with a large matmul) that each reaches (model
FLOPs counted with torch.utils.flop_counter). On CUDA it runs under fp16/bf16 autocast.

The measuring tools (matmul peak, FLOP counter, peak memory) are shared with `recipe.py`.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import time
from collections.abc import Callable
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from imagenets_hf.model import ViTFCNConfig, ViTFCNForSemanticSegmentation
from imagenets_hf.runtime import RssPeak, describe_machine, resolve_device, resolve_dtype

DEFAULT_MODELS = ("vit_small_patch16_224", "vit_base_patch16_224")


class PlainViTFCN(nn.Module):
    """The peer: timm's VisionTransformer.forward_features, then the published FCN head written plainly."""

    def __init__(self, encoder_name: str, num_labels: int, image_size: int = 224):
        super().__init__()
        self.encoder = timm.create_model(
            encoder_name, pretrained=False, num_classes=0, drop_path_rate=0.1, img_size=image_size
        )
        width = self.encoder.embed_dim
        self.fuse = nn.Sequential(
            nn.Conv2d(2 * width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.classifier = nn.Conv2d(width, num_labels, 1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        tokens = self.encoder.forward_features(pixel_values)[:, self.encoder.num_prefix_tokens :]
        grid = self.encoder.patch_embed.grid_size
        x = tokens.transpose(1, 2).reshape(tokens.shape[0], -1, *grid)
        return self.classifier(self.fuse(torch.cat([x, x], dim=1)))

    def load_from(self, model: ViTFCNForSemanticSegmentation) -> None:
        self.encoder.load_state_dict(model.encoder.state_dict())
        head = model.decode_head
        self.fuse[0].load_state_dict(head.conv_cat.conv.state_dict())
        self.fuse[1].load_state_dict(head.conv_cat.bn.state_dict())
        self.classifier.load_state_dict(head.conv_seg.state_dict())


def plain_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The recipe's loss: labels nearest to 1/8, logits bilinear to it, cross entropy averaged over all pixels."""
    size = (labels.shape[-2] // 8, labels.shape[-1] // 8)
    small = F.interpolate(labels[:, None].float(), size=size, mode="nearest")[:, 0].long()
    up = F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)
    return F.cross_entropy(up, small, ignore_index=1000, reduction="sum") / small.numel()


class PeakMemory:
    """Peak memory of the steps run inside it. CUDA: `max_memory_allocated` of `device` (everything the process
    holds there). CPU (no allocator statistics for CPU tensors): `resident_bytes` (weights, optimiser state) plus the
    rise of the process RSS (`imagenets_hf.runtime.RssPeak`, sampled every 2 ms), with glibc told to mmap large blocks
    so freed tensors leave the RSS."""

    def __init__(self, device: torch.device, resident_bytes: int = 0):
        self.device = device
        self.resident_bytes = resident_bytes
        self.peak_bytes = 0
        self._rss = RssPeak()

    def __enter__(self):
        if self.device.type == "cuda":
            # the benchmarked device (`cuda:1`), not the current one: every torch.cuda call here takes it
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            set_mmap_threshold(128 * 1024)
            release_free_heap()  # memory freed by earlier steps would otherwise be reused unseen by the RSS
            self._rss.__enter__()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            self._rss.__exit__(*exc)
            self.peak_bytes = self.resident_bytes + self._rss.growth_bytes
            # back to a large threshold (glibc's dynamic one climbs to 32 MiB) so timings are not slowed by mmap
            set_mmap_threshold(32 * 2**20)


def set_mmap_threshold(num_bytes: int) -> bool:
    """glibc's M_MMAP_THRESHOLD: blocks above it are mmapped and returned to the OS when freed. False without glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_mmap_threshold = -3
    return bool(libc.mallopt(m_mmap_threshold, num_bytes))


def release_free_heap() -> None:
    """glibc's malloc_trim(0): give free heap memory back to the OS."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def tensor_bytes(tensors) -> int:
    """Bytes held by the tensors among `tensors`."""
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def synchronize(device: torch.device) -> None:
    """Wait for `device`'s queued CUDA work so wall-clock timings are complete; no-op on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_matmul_peak(device: torch.device, dtype: torch.dtype, size: int, repeats: int = 5) -> float:
    """Best FLOP/s of a (size x size) @ (size x size) matmul in `dtype` on `device`."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def run_model(forward_loss, forward, parameters, inputs, labels, iters, warmup, autocast, device):
    """Throughput (images/s) and peak memory (MiB) of inference and of a training step."""
    params = [p for p in parameters if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05)
    batch = inputs.shape[0]
    results = {}

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss = forward_loss(inputs, labels)
        loss.backward()
        optimizer.step()

    def infer_step():
        with torch.no_grad(), autocast():
            forward(inputs)

    for name, step in (("forward", infer_step), ("train", train_step)):
        for _ in range(warmup):
            step()
        synchronize(device)
        start = time.perf_counter()
        for _ in range(iters):
            step()
        synchronize(device)
        elapsed = time.perf_counter() - start
        results[f"{name}_images_per_s"] = round(batch * iters / elapsed, 3)
        # memory in one more step, apart from the timing (the CPU measurement slows allocation down)
        resident = tensor_bytes(params)
        if name == "train":
            resident += tensor_bytes(v for state in optimizer.state.values() for v in state.values())
        with PeakMemory(device, resident_bytes=resident) as memory:
            step()
        results[f"{name}_peak_mem_mib"] = round(memory.peak_bytes / 2**20, 1)
    return results


def count_flops(step, device) -> int:
    """FLOPs of one call of `step`, counted by torch.utils.flop_counter."""
    with FlopCounterMode(display=False) as counter:
        step()
    synchronize(device)
    return counter.get_total_flops()


def bench_encoder(
    encoder_name: str,
    *,
    batch_size: int,
    iters: int,
    warmup: int,
    image_size: int,
    num_labels: int,
    device: torch.device,
    dtype: torch.dtype,
    peak_flops: float,
) -> dict:
    """One encoder: ours vs the timm peer on the same weights; logits agreement, FLOPs, throughput, peak memory."""
    torch.manual_seed(0)
    config = ViTFCNConfig.from_preset(
        "fcn", encoder_name=encoder_name, num_labels=num_labels, encoder_kwargs={"img_size": image_size}
    )
    ours = ViTFCNForSemanticSegmentation(config).to(device)
    patch = ours.encoder.patch_embed.patch_size[0]
    if image_size % patch:
        raise ValueError(f"--image-size {image_size} is not a multiple of {encoder_name}'s patch size {patch}")
    peer = PlainViTFCN(encoder_name, num_labels, image_size).to(device)
    peer.load_from(ours)
    size = image_size
    inputs = torch.randn(batch_size, 3, size, size, device=device)
    labels = torch.randint(0, num_labels, (batch_size, size, size), device=device)
    labels[:, : size // 4] = 1000

    use_autocast = dtype != torch.float32

    def autocast():
        if not use_autocast:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=dtype)

    ours.eval()
    peer.eval()
    with torch.no_grad(), autocast():
        ours_logits, peer_logits = ours(inputs).logits.float(), peer(inputs).float()
    max_abs_diff = (ours_logits - peer_logits).abs().max().item()
    logits_scale = peer_logits.abs().max().item()

    ours.train()
    peer.train()
    row = {"encoder": encoder_name, "params_m": round(sum(p.numel() for p in ours.parameters()) / 1e6, 2)}
    # same weights: the two implementations must agree (logits are small: the classifier starts at std 2e-5)
    row["logits_max_abs_diff_eval"] = max_abs_diff
    row["logits_max_abs_eval"] = logits_scale

    one_in, one_label = inputs[:1], labels[:1]
    forward_flops = count_flops(lambda: ours.eval()(one_in), device)
    ours.train()
    train_flops = count_flops(lambda: ours(one_in, labels=one_label).loss.backward(), device)
    ours.zero_grad(set_to_none=True)
    row["gflops_per_image_forward"] = round(forward_flops / 1e9, 2)
    row["gflops_per_image_train"] = round(train_flops / 1e9, 2)

    runs = {
        "ours": run_model(
            lambda x, y: ours(x, labels=y).loss,
            lambda x: ours(x).logits,
            ours.parameters(),
            inputs,
            labels,
            iters,
            warmup,
            autocast,
            device,
        ),
        "timm_plain": run_model(
            lambda x, y: plain_loss(peer(x), y),
            peer,
            peer.parameters(),
            inputs,
            labels,
            iters,
            warmup,
            autocast,
            device,
        ),
    }
    for name, result in runs.items():
        result["forward_fraction_of_matmul_peak"] = round(
            result["forward_images_per_s"] * forward_flops / peak_flops, 4
        )
        result["train_fraction_of_matmul_peak"] = round(result["train_images_per_s"] * train_flops / peak_flops, 4)
        row[name] = result
    row["train_speed_ratio_ours_over_timm"] = round(
        runs["ours"]["train_images_per_s"] / runs["timm_plain"]["train_images_per_s"], 3
    )
    row["forward_speed_ratio_ours_over_timm"] = round(
        runs["ours"]["forward_images_per_s"] / runs["timm_plain"]["forward_images_per_s"], 3
    )
    return row


def format_encoder_rows(row: dict[str, Any]) -> list[str]:
    """The table lines (ours, timm_plain) of one encoder's result."""
    lines = []
    for name in ("ours", "timm_plain"):
        r = row[name]
        lines.append(
            f"{row['encoder']:24s} {name:10s} forward {r['forward_images_per_s']:8.2f} img/s "
            f"train {r['train_images_per_s']:8.2f} img/s  peak mem fwd {r['forward_peak_mem_mib']:8.1f} MiB "
            f"train {r['train_peak_mem_mib']:8.1f} MiB  train {100 * r['train_fraction_of_matmul_peak']:.1f}% "
            "of matmul peak"
        )
    return lines


def run_model_benchmark(
    models: str | list[str] | tuple[str, ...] = DEFAULT_MODELS,
    batch_size: int = 4,
    iters: int = 3,
    warmup: int = 1,
    image_size: int = 224,
    num_labels: int = 920,
    device: str = "auto",
    dtype: str = "auto",
    matmul_size: int = 0,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Benchmark each timm encoder in `models` (a list or a comma-separated string); returns the summary dict (the script's JSON line).

    `matmul_size` 0 means 8192 on CUDA, 2048 on CPU. `log`, when given, receives progress lines (device, matmul peak,
    each encoder's table lines) as they are measured.
    """
    if isinstance(models, str):
        models = models.split(",")
    models = [name.strip() for name in models if name.strip()]
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    log = log or (lambda line: None)
    matmul_size = matmul_size or (8192 if torch_device.type == "cuda" else 2048)
    peak_flops = measure_matmul_peak(torch_device, torch_dtype, matmul_size)
    machine = describe_machine(torch_device)
    log(f"device {torch_device} ({machine}), {torch.get_num_threads()} threads, dtype {torch_dtype}")
    log(f"matmul peak ({matmul_size}^2, {torch_dtype}): {peak_flops / 1e9:.1f} GFLOP/s")

    rows = []
    for encoder_name in models:
        # the machine may be shared: re-measure the peak next to each encoder and keep the best seen
        peak_flops = max(peak_flops, measure_matmul_peak(torch_device, torch_dtype, matmul_size))
        row = bench_encoder(
            encoder_name,
            batch_size=batch_size,
            iters=iters,
            warmup=warmup,
            image_size=image_size,
            num_labels=num_labels,
            device=torch_device,
            dtype=torch_dtype,
            peak_flops=peak_flops,
        )
        row["matmul_peak_gflops_used"] = round(peak_flops / 1e9, 1)
        rows.append(row)
        for line in format_encoder_rows(row):
            log(line)
    final_peak = max(peak_flops, measure_matmul_peak(torch_device, torch_dtype, matmul_size))
    return {
        "benchmark": "bench_model",
        "device": str(torch_device),
        "machine": machine,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "dtype": str(torch_dtype).removeprefix("torch."),
        "autocast": torch_dtype != torch.float32,
        "batch_size": batch_size,
        "iters": iters,
        "image_size": image_size,
        "matmul_peak_gflops": round(final_peak / 1e9, 1),
        "memory": "cuda max_memory_allocated"
        if torch_device.type == "cuda"
        else "weights + optimiser state + sampled RSS rise in one step",
        "torch": torch.__version__,
        "timm": timm.__version__,
        "results": rows,
    }
