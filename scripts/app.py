#!/usr/bin/env python
"""Serve the web demo: upload an image, see the predicted classes over it with a legend (class, % of the image),
download the class-id mask in the ImageNet-S encoding (RGB PNG, id = R + 256 * G).

python scripts/app.py --model outputs/demo [--host 127.0.0.1] [--port 7860] [--examples DIR] [--device auto]

Needs the demo extra (pip install -e ".[demo]"). Examples: a few images of --examples DIR, else of the mini dataset's
validation folder (data/mini/validation) when it is there. Nothing is fetched from the network except the model when
--model is a Hub id.
"""

import importlib.util
import sys
from pathlib import Path

from imagenets_hf import cli

REPO_ROOT = Path(__file__).resolve().parents[1]


@cli.entry_point
def main(argv: list[str] | None = None) -> None:
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True, help="saved model folder (finetune.py's output) or Hub id")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=7860, help="port to serve on")
    parser.add_argument("--examples", help="folder of example images (default: data/mini/validation when present)")
    parser.add_argument("--device", default="auto", help="auto (first GPU, else CPU), cpu, cuda, cuda:1, ...")
    args = parser.parse_args(argv)
    if not 0 < args.port < 65536:
        parser.error(f"--port must be in 1..65535, got {args.port}")
    if importlib.util.find_spec("gradio") is None:  # found, not imported: the app sets Gradio's offline switches first
        raise ImportError('the web demo needs Gradio: pip install -e ".[demo]"')

    from imagenets_hf.demo import launch_app

    launch_app(
        args.model,
        host=args.host,
        port=args.port,
        examples_dir=args.examples,
        default_example_dirs=[Path("data/mini/validation"), REPO_ROOT / "data" / "mini" / "validation"],
        device=args.device,
    )


if __name__ == "__main__":
    sys.exit(main())
