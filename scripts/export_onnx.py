#!/usr/bin/env python
"""Export a saved model to ONNX (dynamic batch, height and width; padding and position-embedding resize inside the
graph) and compare onnxruntime's logits with PyTorch's on three input sizes. Needs the `onnx` extra.

python scripts/export_onnx.py --model outputs/demo --out demo.onnx [--no-check]
"""

from __future__ import annotations

import sys

from imagenets_hf import cli


@cli.entry_point
def main(argv: list[str] | None = None) -> None:
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--model", required=True, help="saved model folder (finetune.py's output), Hub id or checkpoint"
    )
    parser.add_argument("--out", required=True, help="the .onnx file to write (its folder must exist)")
    parser.add_argument("--no-check", action="store_true", help="skip the onnxruntime-against-PyTorch comparison")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (transformers')")
    args = parser.parse_args(argv)
    if args.no_progress:
        cli.disable_progress_bars()
    from imagenets_hf.deploy.onnx_export import export_model_folder  # here: --help answers without torch

    path, parity = export_model_folder(args.model, args.out, check=not args.no_check)
    print(f"wrote {path}: pixel_values (batch, 3, height, width) -> logits (batch, labels, height/p, width/p)")
    for result in parity:
        print(
            f"onnxruntime vs PyTorch at {'x'.join(map(str, result.shape))}: max abs difference "
            f"{result.max_abs_difference:.1e} (logits up to {result.max_abs_logit:.3g}), same class at "
            f"{100 * result.mask_agreement:.2f} % of positions"
        )


if __name__ == "__main__":
    sys.exit(main())
