"""Import pre-trained ViT weights (MAE, DINO / iBOT / SERE, timm, mmsegmentation, transformers) into a ViT + FCN
segmentation model and save it as a Hugging Face folder (safetensors + image processor).

Example:
    python scripts/convert_checkpoint.py --checkpoint mae_pretrain_vit_base.pth --encoder vit_base_patch16_224 \
        --num-labels 920 --out checkpoints/mae-base-fcn
"""

from __future__ import annotations

import argparse
import json
import sys

from imagenets_hf.model.configuration_vit_fcn import PRESETS
from imagenets_hf.model.convert import convert_checkpoint


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="file (.pth/.pt/.bin/.safetensors), folder, URL or Hub id")
    parser.add_argument("--encoder", required=True, help="timm encoder name, e.g. vit_base_patch16_224")
    parser.add_argument("--num-labels", type=int, required=True, help="classes including 'other' (920 for 919)")
    parser.add_argument("--out", required=True, help="output folder for save_pretrained")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="fcn", help="decoder preset (default: fcn)")
    parser.add_argument("--key", default=None, help="sub-dict holding the weights, e.g. teacher or student")
    parser.add_argument(
        "--allow-partial", action="store_true", help="load what matches even if the encoder is not fully filled"
    )
    parser.add_argument("--labels", default=None, help="text file with one class name a line (id order)")
    parser.add_argument("--encoder-kwargs", default=None, help="JSON dict of timm VisionTransformer overrides")
    parser.add_argument("--drop-path-rate", type=float, default=None, help="encoder stochastic depth rate")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    config_kwargs = {}
    if args.encoder_kwargs:
        config_kwargs["encoder_kwargs"] = json.loads(args.encoder_kwargs)
    if args.drop_path_rate is not None:
        config_kwargs["drop_path_rate"] = args.drop_path_rate
    id2label = None
    if args.labels:
        with open(args.labels, encoding="utf-8") as handle:
            id2label = dict(enumerate(line.strip() for line in handle if line.strip()))
    try:
        convert_checkpoint(
            args.checkpoint,
            args.encoder,
            args.num_labels,
            args.out,
            allow_partial=args.allow_partial,
            id2label=id2label,
            key=args.key,
            preset=args.preset,
            **config_kwargs,
        )
    except (ValueError, KeyError, FileNotFoundError, TypeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"Saved the model and its image processor to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
