"""The web demo: upload an image (or pick an example), see the predicted classes over it with a legend of the classes
found and their areas, and download the class-id mask in the ImageNet-S encoding (RGB PNG, id = R + 256 * G).

A Gradio app served on this machine (`scripts/app.py --model FOLDER_OR_HUB_ID`). The prediction is the official
protocol's (`predict_segmentation` with the model's image processor); the colours and names are those of the
overlays `predict.py --overlay` writes (`imagenets_hf.evaluation.overlays`). The app makes no call outside this
machine: Gradio's telemetry, version check and share link are off, its fonts are served locally, and the
huggingface_hub telemetry is off (a Hub id still downloads the model, once, into the Hub cache).

The model and prediction parts (`Segmenter`, `class_areas`, `legend_html`, `find_examples`) do not import Gradio;
`build_app` and `launch_app` do (the `demo` extra: `pip install -e ".[demo]"`).
"""

from __future__ import annotations

import atexit
import html
import inspect
import os
import shutil
import socket
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

# The project's modules are imported where they are used: they bring torch and datasets in, and a mistake in the
# arguments (a busy port, a missing examples folder) should be reported before that cost.

# Environment that keeps Gradio (and huggingface_hub) from calling out: set before gradio is imported.
OFFLINE_ENV = {
    "GRADIO_ANALYTICS_ENABLED": "False",  # telemetry and the version check against api.gradio.app
    "HF_HUB_DISABLE_TELEMETRY": "1",
}
DEFAULT_EXAMPLES = 6  # example images offered below the upload box
DISPLAY_MAX_SIDE = 1600  # the overlay shown in the page is brought to this long side at most (the mask is not)
MAX_LEGEND_ROWS = 30  # the legend lists the largest classes; the rest are summed on one line
TITLE = "ImageNet-S semantic segmentation"


@dataclass(frozen=True)
class ClassArea:
    """One class of a prediction: its id, name, pixel count, share of the image (%) and overlay colour."""

    class_id: int
    name: str
    pixels: int
    percent: float
    color: tuple[int, int, int]

    @property
    def hex_color(self) -> str:
        return "#{:02x}{:02x}{:02x}".format(*self.color)


def class_areas(prediction: np.ndarray, id2label: Mapping[Any, str] | None = None) -> list[ClassArea]:
    """The classes of an id map, largest first (ties by id), with their names (`id2label`, int or str keys), pixel
    counts, percentages of the image and the overlay colours."""
    from imagenets_hf.evaluation.overlays import label_name, label_palette

    values, counts = np.unique(np.asarray(prediction, dtype=np.int64), return_counts=True)
    total = int(counts.sum()) or 1
    palette = label_palette(id2label=id2label)
    areas = [
        ClassArea(
            class_id=int(value),
            name=label_name(int(value), id2label),
            pixels=int(count),
            percent=100.0 * int(count) / total,
            color=tuple(int(c) for c in palette[int(value) % len(palette)]),
        )
        for value, count in zip(values.tolist(), counts.tolist())
    ]
    return sorted(areas, key=lambda area: (-area.pixels, area.class_id))


def legend_html(areas: Sequence[ClassArea], max_rows: int = MAX_LEGEND_ROWS) -> str:
    """An HTML table of the classes found: colour swatch, name, id and % of the image (largest first; beyond
    `max_rows` the rest are summed on a last line)."""
    shown, rest = list(areas[:max_rows]), list(areas[max_rows:])
    rows = []
    for area in shown:
        rows.append(
            '<tr class="legend-row">'
            f'<td><span class="swatch" style="background:{area.hex_color}"></span></td>'
            f'<td class="legend-name">{html.escape(area.name)}</td>'
            f'<td class="legend-id">{area.class_id}</td>'
            f'<td class="legend-area">{area.percent:.1f}%</td>'
            "</tr>"
        )
    if rest:
        percent = sum(area.percent for area in rest)
        rows.append(f'<tr><td></td><td colspan="2">+{len(rest)} more classes</td><td>{percent:.1f}%</td></tr>')
    return (
        '<div id="legend-table">'
        "<style>"
        "#legend-table table{border-collapse:collapse;width:100%}"
        "#legend-table td,#legend-table th{padding:2px 8px;text-align:left}"
        "#legend-table .legend-id,#legend-table .legend-area{text-align:right;font-variant-numeric:tabular-nums}"
        "#legend-table .swatch{display:inline-block;width:14px;height:14px;border:1px solid #888;"
        "vertical-align:middle}"
        "</style>"
        f"<p>{len(areas)} class{'es' if len(areas) != 1 else ''} found</p>"
        "<table><thead><tr><th></th><th>class</th><th>id</th><th>% of the image</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table></div>"
    )


def overlay_image(
    image: Image.Image,
    prediction: np.ndarray,
    max_side: int = DISPLAY_MAX_SIDE,
    id2label: Mapping[Any, str] | None = None,
) -> Image.Image:
    """The class colours over the image (the overlays' blend and colours), brought to long side `max_side` at most for
    display."""
    from imagenets_hf.evaluation.overlays import blend, label_palette

    rgb = np.asarray(image.convert("RGB"))
    overlay = Image.fromarray(blend(rgb, prediction, palette=label_palette(id2label=id2label)).round().astype(np.uint8))
    scale = max_side / max(overlay.size)
    if scale < 1:
        overlay = overlay.resize(
            (max(1, round(overlay.width * scale)), max(1, round(overlay.height * scale))), Image.Resampling.BILINEAR
        )
    return overlay


def find_examples(
    examples_dir: str | os.PathLike | None = None,
    count: int = DEFAULT_EXAMPLES,
    default_dirs: Sequence[str | os.PathLike] = (),
) -> list[str]:
    """Up to `count` example images spread over the sorted files of `examples_dir` (any depth), or, without it, of
    the first of `default_dirs` that exists (e.g. the mini dataset's validation folder); [] when there is none.
    An `examples_dir` that does not exist or holds no image is an error."""
    if examples_dir is not None:
        root = Path(examples_dir)
        if not root.is_dir():
            raise FileNotFoundError(f"no such image folder: {root}")
    else:
        root = next((Path(d) for d in default_dirs if Path(d).is_dir()), None)
        if root is None:
            return []
    from imagenets_hf.evaluation.folders import list_images
    from imagenets_hf.evaluation.overlays import spread_indices

    relative = list_images(root)  # FileNotFoundError naming the folder when it holds no image
    return [str((root / relative[i]).resolve()) for i in spread_indices(len(relative), count)]


class UnreadableImageError(ValueError):
    """A file that is not an image PIL can read; the message names the file by its own name only (an upload lies in
    a temporary folder whose path means nothing to the user)."""

    def __init__(self, path: str | os.PathLike, error: BaseException, name: str | None = None) -> None:
        name = name or Path(path).name
        detail = str(error).replace(os.fspath(path), name)  # PIL's message holds the path it was given
        super().__init__(f"{name}: cannot read this file as an image ({type(error).__name__}: {detail})")


@dataclass
class DemoResult:
    """What the app shows for one image."""

    prediction: np.ndarray  # HxW int class ids at the image's size
    overlay: Image.Image
    areas: list[ClassArea]
    legend: str  # HTML
    mask_path: Path  # the ids as an ImageNet-S RGB PNG


class Segmenter:
    """A saved model (folder or Hub id) and its image processor, predicting one image at a time by the official
    protocol; `segment` also writes the downloadable mask under `work_dir` (a temporary folder by default, removed at
    exit)."""

    def __init__(
        self,
        model_name_or_path: str | os.PathLike,
        device: str | None = None,
        work_dir: str | os.PathLike | None = None,
    ) -> None:
        import torch

        from imagenets_hf.evaluation.loading import load_model_and_processor

        if device in (None, "auto"):
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model_name = os.fspath(model_name_or_path)
        self.device = device
        self.model, self.processor = load_model_and_processor(self.model_name, device)
        self.id2label = dict(self.model.config.id2label or {})
        if work_dir is None:
            work_dir = tempfile.mkdtemp(prefix="imagenets_demo_")
            atexit.register(shutil.rmtree, work_dir, ignore_errors=True)
        self.work_dir = Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)

    @property
    def num_labels(self) -> int:
        return int(self.model.config.num_labels)

    def predict(self, image: Image.Image) -> np.ndarray:
        """HxW class ids (int32) of an image at its own size."""
        from imagenets_hf.evaluation.inference import predict_segmentation

        return predict_segmentation(self.model, self.processor, [image.convert("RGB")], device=self.device)[0]

    def segment(self, image: Image.Image | str | os.PathLike, name: str | None = None) -> DemoResult:
        """Predict an image (PIL image or file) and make what the page shows; the mask is written as
        `<work_dir>/<unique>/<name>_ids.png` (`name` defaults to the file's stem, else "image")."""
        if not isinstance(image, Image.Image):
            path = Path(image)
            name = name or path.stem
            try:
                with Image.open(path) as opened:
                    image = opened.convert("RGB")
            except Exception as err:  # PIL raises several types for files it cannot read
                raise UnreadableImageError(path, err) from err
        from imagenets_hf.data.masks import encode_mask

        image = image.convert("RGB")
        prediction = self.predict(image)
        areas = class_areas(prediction, self.id2label)
        out_dir = Path(tempfile.mkdtemp(dir=self.work_dir))
        mask_path = out_dir / f"{name or 'image'}_ids.png"
        encode_mask(prediction).save(mask_path)
        overlay = overlay_image(image, prediction, id2label=self.id2label)
        return DemoResult(prediction, overlay, areas, legend_html(areas), mask_path)


def _description(segmenter: Segmenter, examples: Sequence[str]) -> str:
    lines = [
        f"# {TITLE}",
        f"Model `{segmenter.model_name}` ({segmenter.num_labels} classes, {segmenter.device}). Upload an image"
        + (" or pick an example below it" if examples else "")
        + ": the predicted classes are laid over it, the legend lists them with their share of the image, and the "
        "class-id mask downloads as an RGB PNG in the ImageNet-S encoding (id = R + 256 * G, as the official "
        "evaluator reads).",
    ]
    return "\n\n".join(lines)


def build_app(segmenter: Segmenter, examples: Sequence[str] = ()):
    """The Gradio `Blocks` of the demo (not launched). Element ids for scripts and tests: `input-image`,
    `overlay`, `legend`, `mask-file`."""
    for key, value in OFFLINE_ENV.items():
        os.environ[key] = value
    import gradio as gr

    def run(image: str | UnreadableImageError | None):
        if not image:
            return None, "", None
        try:
            if isinstance(image, UnreadableImageError):
                raise image
            result = segmenter.segment(image)
        except UnreadableImageError as err:
            gr.Warning(str(err))  # one line, in a toast; the legend keeps it
            return None, f'<p class="demo-error">{html.escape(str(err))}</p>', None
        return result.overlay, result.legend, str(result.mask_path)

    with gr.Blocks(title=TITLE, analytics_enabled=False, delete_cache=(3600, 3600)) as app:
        gr.Markdown(_description(segmenter, examples))
        with gr.Row():
            with gr.Column():
                image = gr.Image(
                    type="filepath",
                    label="Image",
                    sources=["upload", "clipboard"],
                    elem_id="input-image",
                )
                _pass_unreadable_uploads_on(image)
                if examples:  # shown as thumbnails (no example_labels, which turn them into file-name buttons)
                    gr.Examples(examples=[[path] for path in examples], inputs=[image], label="Examples")
            with gr.Column():
                overlay = gr.Image(
                    type="pil",
                    format="png",
                    label="Predicted classes",
                    interactive=False,
                    buttons=["download", "fullscreen"],  # no "share" (it posts to the Hugging Face community)
                    elem_id="overlay",
                )
                legend = gr.HTML(label="Classes found", elem_id="legend")
                mask_file = gr.File(label="Class-id mask (ImageNet-S encoding)", interactive=False, elem_id="mask-file")
        image.change(run, inputs=[image], outputs=[overlay, legend, mask_file], concurrency_limit=1)
    return app


def _pass_unreadable_uploads_on(component) -> None:
    """Make an image input hand an upload it cannot decode to the event handler as an `UnreadableImageError`: left to
    Gradio, it ends in Gradio's internal error toast (with temporary paths), red "Error" badges on the outputs and a
    traceback in the server's log. (The instance's method is wrapped: a subclass of a Gradio component makes Gradio
    write a .pyi file beside this module.)"""
    decode = component.preprocess

    def preprocess(payload):
        try:
            return decode(payload)
        except Exception as err:  # PIL raises several types for files it cannot read
            return UnreadableImageError(payload.path or "upload", err, name=payload.orig_name)

    component.preprocess = preprocess


def check_port(host: str, port: int) -> None:
    """Refuse an address this process cannot serve on (a port in use, an unknown host), naming it."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does
            sock.bind(address)
    except OSError as err:
        raise OSError(f"cannot serve on {host}:{port} ({err.strerror or err}); pick another --port or --host") from None


def launch_app(
    model_name_or_path: str | os.PathLike,
    host: str = "127.0.0.1",
    port: int = 7860,
    examples_dir: str | os.PathLike | None = None,
    default_example_dirs: Sequence[str | os.PathLike] = (),
    device: str | None = None,
) -> None:
    """Load the model, build the app and serve it at http://host:port until interrupted (Ctrl-C)."""
    check_port(host, port)  # mistakes first, before the model loads
    examples = find_examples(examples_dir, default_dirs=default_example_dirs)
    segmenter = Segmenter(model_name_or_path, device=device)
    app = build_app(segmenter, examples)
    options = {
        "server_name": host,
        "server_port": port,
        "share": False,
        "inbrowser": False,
        "quiet": True,
        "show_error": True,
        "ssr_mode": False,  # no Node server
        "mcp_server": False,
        "pwa": False,
        "run_history": False,
        "footer_links": ["gradio"],
    }
    accepted = inspect.signature(app.launch).parameters  # the options this Gradio version has
    options = {key: value for key, value in options.items() if key in accepted}
    app.queue(default_concurrency_limit=1).launch(prevent_thread_lock=True, **options)
    url = getattr(app, "local_url", None) or f"http://{host}:{port}/"
    print(f"Serving the demo of {segmenter.model_name} at {url} (Ctrl-C to stop)", flush=True)
    app.block_thread()  # until Ctrl-C, which closes the server
