"""Two training-like processes (gloo) for tests/test_train_no_hang.py: it launches both itself.

`--check workers`: each process does what a training run does before its DataLoader workers start (a gloo process
group and its threads, a tqdm bar and its monitor thread, then `build_train_dataloader`, which decodes the masks with
a thread pool), then takes the first batch (a worker decodes JPEGs with OpenCV), `--rounds` times. A worker forked
from this multi-threaded process could inherit a lock held by another thread and wait on it forever; each first batch
waits at most `--wait` seconds. Prints `rank R: N of N first batches, K timed out` per process.

`--check prepare`: `finetune.prepare_data` with the main process's data loading slowed by `--slow` seconds, under a
collective timeout of `--collective-timeout` seconds and a `prepare_timeout` of `--prepare-timeout`; then one
collective. Prints `rank R: prepared N rows` per process. Then, with `--then-slow`, again with that slowdown and
`--then-prepare-timeout`: a wait past prepare_timeout ends in the CLI's one line.

    python tests/two_process_start.py --check workers --data-dir DIR --rounds 50
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time


def launch(args: argparse.Namespace, argv: list[str]) -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    processes = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
        processes.append(subprocess.Popen([sys.executable, __file__, *argv], env=env))
    deadline = time.monotonic() + args.limit
    codes = []
    for process in processes:
        try:
            codes.append(process.wait(timeout=max(1.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            process.kill()
            codes.append(process.wait())
    return max(codes)


def check_workers(args: argparse.Namespace) -> int:
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    from imagenets_hf.data.augment import AugmentConfig
    from imagenets_hf.data.imagenets import load_imagenets
    from imagenets_hf.training.data import build_train_dataloader

    accelerator = Accelerator(cpu=True)  # the gloo process group of a 2-process CPU run
    rank, world = accelerator.process_index, accelerator.num_processes
    rows = load_imagenets(args.data_dir, "train_semi").select(range(16))  # a quick mask packing, still threaded
    config = AugmentConfig(crop_size=32, resize_scale=(128, 32))
    with open(os.devnull, "w") as sink:
        bar = tqdm(total=args.rounds, mininterval=0.01, file=sink)
        batches = timed_out = 0
        for _ in range(args.rounds):
            loader = build_train_dataloader(rows, config, 2, seed=0, rank=rank, world_size=world, num_workers=1)
            loader.timeout = args.wait  # a first batch that does not come in time counts as a hang
            try:
                next(iter(loader))
                batches += 1
            except RuntimeError as err:
                if "timed out" not in str(err):
                    raise
                timed_out += 1
            bar.update(1)
    print(f"rank {rank}: {batches} of {args.rounds} first batches, {timed_out} timed out", flush=True)
    accelerator.wait_for_everyone()
    return 0 if timed_out == 0 else 1


def check_prepare(args: argparse.Namespace) -> int:
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    import imagenets_hf.data.imagenets as imagenets
    from imagenets_hf import cli
    from imagenets_hf.training import finetune
    from imagenets_hf.training.recipes import load_recipe

    timeout = InitProcessGroupKwargs(timeout=timedelta(seconds=args.collective_timeout))
    accelerator = Accelerator(cpu=True, kwargs_handlers=[timeout])
    load = imagenets.load_imagenets
    slow = args.slow

    def slow_load(*load_args, **kwargs):
        if accelerator.is_main_process:
            time.sleep(slow)  # a slow Arrow cache build
        return load(*load_args, **kwargs)

    imagenets.load_imagenets = slow_load

    @cli.entry_point
    def run(argv=None) -> None:
        nonlocal slow
        recipe = load_recipe("demo", {"data_dir": args.data_dir, "prepare_timeout": args.prepare_timeout})
        train_rows, _, _ = finetune.prepare_data(recipe, accelerator)
        accelerator.wait_for_everyone()  # the default group still works after the long wait
        print(f"rank {accelerator.process_index}: prepared {len(train_rows)} rows", flush=True)
        if args.then_slow is not None:
            slow = args.then_slow
            recipe = load_recipe("demo", {"data_dir": args.data_dir, "prepare_timeout": args.then_prepare_timeout})
            finetune.prepare_data(recipe, accelerator)

    return run([]) or 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", choices=("workers", "prepare"), required=True)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--wait", type=float, default=30.0, help="seconds a first batch may take")
    parser.add_argument("--slow", type=float, default=0.0)
    parser.add_argument("--collective-timeout", type=float, default=1800.0)
    parser.add_argument("--prepare-timeout", type=float, default=7200.0)
    parser.add_argument("--then-slow", type=float)
    parser.add_argument("--then-prepare-timeout", type=float, default=7200.0)
    parser.add_argument("--limit", type=float, default=600.0, help="seconds both processes may take in all")
    argv = sys.argv[1:]
    args = parser.parse_args(argv)
    if "RANK" not in os.environ:
        return launch(args, argv)
    return check_workers(args) if args.check == "workers" else check_prepare(args)


if __name__ == "__main__":
    sys.exit(main())
