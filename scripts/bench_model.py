#!/usr/bin/env python
"""Benchmark the ViT + FCN model against the bare timm VisionTransformer with the same head written plainly.

For each encoder (ViT-S/16 and ViT-B/16 at 224 by default) it measures, in the same run and on the same weights:
forward throughput (eval, no grad), training-step throughput (forward + loss + backward + AdamW step), peak memory,
and the fraction of the machine's matmul peak (measured here with a large matmul) that the training step reaches
(model FLOPs counted with torch.utils.flop_counter). On CUDA it runs under fp16/bf16 autocast. The last line printed
is one JSON object. The logic lives in `imagenets_hf.benchmarks.model`.

    python scripts/bench_model.py                          # CPU-friendly defaults: batch 4, 3 iterations
    python scripts/bench_model.py --device cuda --batch-size 32 --iters 20 --dtype bfloat16
"""

import json
import os
import sys

# This folder holds a script named evaluate.py: keep it from shadowing the `evaluate` package.
sys.path[:] = [p for p in sys.path if os.path.realpath(p or ".") != os.path.dirname(os.path.realpath(__file__))]

from imagenets_hf import cli  # noqa: E402
from imagenets_hf.benchmarks.model import DEFAULT_MODELS, run_model_benchmark  # noqa: E402
from imagenets_hf.runtime import DTYPE_NAMES  # noqa: E402


@cli.entry_point
def main(argv: list[str] | None = None) -> None:
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated timm encoder names")
    parser.add_argument("--batch-size", type=cli.positive_int, default=4)
    parser.add_argument("--iters", type=cli.positive_int, default=3, help="timed iterations per measurement")
    parser.add_argument(
        "--warmup", type=cli.non_negative_int, default=1, help="untimed iterations before each measurement"
    )
    parser.add_argument("--image-size", type=cli.positive_int, default=224)
    parser.add_argument("--num-labels", type=cli.positive_int, default=920)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", *DTYPE_NAMES],
        help="autocast dtype; auto: bfloat16 on GPUs of compute capability 8.0+, float16 on older ones, float32 on CPU",
    )
    parser.add_argument(
        "--matmul-size", type=cli.non_negative_int, default=0, help="side of the peak matmul (0: 8192 CUDA, 2048 CPU)"
    )
    args = parser.parse_args(argv)
    summary = run_model_benchmark(
        models=args.models.split(","),
        batch_size=args.batch_size,
        iters=args.iters,
        warmup=args.warmup,
        image_size=args.image_size,
        num_labels=args.num_labels,
        device=args.device,
        dtype=args.dtype,
        matmul_size=args.matmul_size,
        log=print,
    )
    print(json.dumps(summary))


if __name__ == "__main__":
    sys.exit(main())
