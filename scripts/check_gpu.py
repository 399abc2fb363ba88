#!/usr/bin/env python
"""The GPU acceptance check: the CUDA and multi-process paths the CPU tests cannot see, in one command (at most about
10 minutes on one modern GPU): the demo in fp16 and in bf16 (each must clear the demo's mIoU bar), the device path
against the worker path, stop + resume with deterministic algorithms (final weights equal), 2-process DDP resumed in
one process (with two GPUs), `--compile true`, then the recipe benchmark of the four published recipes (the README's
Mem and Inf time columns). A table, then one JSON line; exit status 1 when any step failed. The logic lives in
`imagenets_hf.benchmarks.check_gpu`.

    python scripts/check_gpu.py                 # on a CUDA machine
    python scripts/check_gpu.py --cpu-toy       # toy sizes on the CPU (automatic without CUDA), as CI runs it
"""

import argparse
import json
import os
import sys

# This folder holds a script named evaluate.py: keep it from shadowing the `evaluate` package.
sys.path[:] = [p for p in sys.path if os.path.realpath(p or ".") != os.path.dirname(os.path.realpath(__file__))]

from imagenets_hf import cli  # noqa: E402
from imagenets_hf.benchmarks.check_gpu import STEPS, format_check_table, run_checks  # noqa: E402


def step_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in STEPS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of {', '.join(STEPS)}, got {text!r}")
    return names


@cli.entry_point
def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", default="data/mini", help="the mini dataset (made when absent)")
    parser.add_argument("--work-dir", default=None, help="where the runs write (default: a temporary folder, removed)")
    parser.add_argument("--steps", type=step_list, default=list(STEPS), help="comma-separated steps (default: all)")
    parser.add_argument(
        "--cpu-toy", action="store_true", help="toy sizes on the CPU, even with CUDA (automatic without CUDA)"
    )
    args = parser.parse_args(argv)
    if args.cpu_toy:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch first looks for a GPU (children inherit it)
    cli.disable_progress_bars()

    summary = run_checks(
        args.data_dir, toy=True if args.cpu_toy else None, work_dir=args.work_dir, steps=args.steps, log=print
    )
    for line in format_check_table(summary):
        print(line)
    print(json.dumps(summary))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
