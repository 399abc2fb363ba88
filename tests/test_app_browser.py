"""The web demo in a real browser: `scripts/app.py` serves a tiny model on localhost; headless Chromium (driven by
Playwright, with the system's /usr/bin/chromium) uploads an image, waits for the overlay and the legend, downloads
the class-id mask and keeps a screenshot under the test's tmp folder. The page must not reach outside this machine
(every other request is aborted and recorded); an upload that is not an image shows one line, no Gradio error and no
traceback in the server's log. The server is stopped at the end, whatever happens. Quick tests of
the legend, the example picking and the script's one-line errors come first.

Chromium comes from the Debian packages `chromium` and `chromium-driver`: installed here with apt-get when missing
and apt is usable (.ci/run does the same before the tests); the test is skipped, saying why, only where no browser
can be installed. Never `playwright install` (it downloads a browser).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from imagenets_hf.demo import class_areas, find_examples, legend_html
from imagenets_hf.evaluation.overlays import label_palette
from imagenets_hf.model import ViTFCNConfig, ViTFCNForSemanticSegmentation, ViTFCNImageProcessor

REPO_ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
CLASS_NAMES = ["other", "red disc", "blue square", "green triangle", "yellow star"]
TINY_ENCODER = {"embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 8, "img_size": 32}
SERVER_START_S = 300  # model + Gradio import on a busy 2-core machine
RESULT_S = 180  # upload -> overlay and legend


def _apt_install_chromium() -> str:
    """Install chromium and chromium-driver with apt-get (root or password-less sudo); returns what went wrong."""
    if shutil.which("apt-get") is None:
        return "apt-get is not available"
    prefix = [] if os.geteuid() == 0 else ["sudo", "-n"]
    if prefix and shutil.which("sudo") is None:
        return "not root and no sudo"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = [*prefix, "apt-get", "install", "-y", "-q", "chromium", "chromium-driver"]
    result = None
    for command in (install, [*prefix, "apt-get", "update", "-q"], install):  # update only when the install fails
        try:
            result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as err:
            return f"{' '.join(command)}: {err}"
        if result.returncode == 0 and command is install and os.path.exists(CHROMIUM):
            return ""
    tail = (result.stderr or result.stdout).strip().splitlines()[-1:] if result is not None else []
    return f"apt-get install chromium chromium-driver failed ({' '.join(tail)})"


@pytest.fixture(scope="session")
def chromium() -> str:
    if not os.path.exists(CHROMIUM):
        problem = _apt_install_chromium()
        if not os.path.exists(CHROMIUM):
            pytest.skip(
                f"no browser for the web demo test: {CHROMIUM} is missing and could not be installed ({problem})"
            )
    return CHROMIUM


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    """A tiny random model (a classifier far from zero, so that it predicts several classes) and its processor."""
    folder = tmp_path_factory.mktemp("app_model")
    torch.manual_seed(0)
    config = ViTFCNConfig.from_preset(
        "fcn",
        encoder_name="vit_small_patch16_224",
        encoder_kwargs=TINY_ENCODER,
        drop_path_rate=0.0,
        classifier_init_std=1.0,
        id2label=dict(enumerate(CLASS_NAMES)),
    )
    ViTFCNForSemanticSegmentation(config).eval().save_pretrained(folder)
    ViTFCNImageProcessor().save_pretrained(folder)
    return folder


def example_images(folder: Path) -> list[Path]:
    """Two small pictures with shapes on a gradient, as JPEG files."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, size in enumerate([(160, 120), (120, 200)]):  # (width, height)
        ramp = np.linspace(40, 200, size[0], dtype=np.float32)
        rgb = np.stack(
            [np.tile(ramp, (size[1], 1)), np.full((size[1], size[0]), 90.0), np.tile(ramp[::-1], (size[1], 1))], -1
        )
        image = Image.fromarray(rgb.astype(np.uint8))
        draw = ImageDraw.Draw(image)
        draw.ellipse([20, 20, 20 + size[0] // 2, 20 + size[1] // 2], fill=(220, 30, 30))
        draw.rectangle([size[0] // 2, size[1] // 2, size[0] - 10, size[1] - 10], fill=(30, 60, 220))
        path = folder / f"example_{index}.jpg"
        image.save(path, quality=92)
        paths.append(path)
    return paths


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_server(url: str, process: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the app exited with status {process.returncode} before serving:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1)
    pytest.fail(f"the app did not answer at {url} within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def stop(process: subprocess.Popen) -> None:
    """Stop the server and anything it started (its own process group)."""
    if process.poll() is not None:
        return
    for sig, wait in ((signal.SIGINT, 20), (signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture
def app_server(model_folder, tmp_path):
    """scripts/app.py serving the tiny model on a free localhost port, with two example images; stopped at the end."""
    pytest.importorskip("gradio", reason='the web demo needs Gradio (pip install -e ".[demo]" or ".[dev]")')
    examples = example_images(tmp_path / "examples")
    port = free_port()
    log = tmp_path / "app.log"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(
        PYTHONPATH=str(REPO_ROOT),  # this checkout's package, whichever one is installed
        HF_HUB_OFFLINE="1",
        GRADIO_TEMP_DIR=str(tmp_path / "gradio"),
        HF_MODULES_CACHE=str(tmp_path / "modules"),
        PYTHONUNBUFFERED="1",
    )
    command = [sys.executable, str(REPO_ROOT / "scripts" / "app.py"), "--model", str(model_folder)]
    command += ["--port", str(port), "--examples", str(tmp_path / "examples"), "--device", "cpu"]
    with open(log, "w") as log_file:
        process = subprocess.Popen(
            command,
            cwd=tmp_path,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            # SIGINT at its default (a test run started in the background may pass it on ignored): stop() sends it
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
    try:
        url = f"http://127.0.0.1:{port}/"
        wait_for_server(url, process, log, SERVER_START_S)
        yield {"url": url, "examples": examples, "log": log, "process": process}
    finally:
        stop(process)
    assert process.poll() is not None, "the app is still running"


@pytest.mark.slow
def test_upload_shows_overlay_legend_and_mask_download(chromium, app_server, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test drives Chromium with Playwright")
    url, image_path = app_server["url"], app_server["examples"][0]
    external: list[str] = []

    def only_this_server(route):
        request_url = route.request.url
        if request_url.startswith((url, "data:", "blob:")):
            route.continue_()
        else:  # the app must work offline: nothing outside this machine
            external.append(request_url)
            route.abort()

    screenshot = tmp_path / "app.png"
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.route("**/*", only_this_server)
            page.goto(url, timeout=120_000)
            page.wait_for_selector("#input-image input[type=file]", state="attached", timeout=120_000)
            # the --examples images are offered as thumbnails (they were file-name buttons)
            page.wait_for_function(
                "() => [...document.querySelectorAll('.gallery img')].filter(img => img.naturalWidth > 0).length == 2",
                timeout=120_000,
            )
            thumbnails = page.eval_on_selector_all(".gallery img", "imgs => imgs.map(img => img.naturalWidth)")
            assert len(thumbnails) == 2 and all(width > 0 for width in thumbnails), thumbnails
            assert page.locator("text=example_1.jpg").count() == 0

            page.set_input_files("#input-image input[type=file]", str(image_path))
            page.wait_for_selector("#overlay img", timeout=RESULT_S * 1000)
            page.wait_for_selector("#legend .legend-row", timeout=RESULT_S * 1000)
            link = page.wait_for_selector("#mask-file a[download]", timeout=RESULT_S * 1000)
            page.screenshot(path=str(screenshot), full_page=True)

            # the overlay is an image of the uploaded picture's shape
            overlay_size = page.eval_on_selector("#overlay img", "img => [img.naturalWidth, img.naturalHeight]")
            legend_rows = page.eval_on_selector_all(
                "#legend .legend-row",
                "rows => rows.map(r => [...r.querySelectorAll('td')].slice(1).map(td => td.innerText.trim()))",
            )
            mask_bytes = page.request.get(link.get_attribute("href")).body()
            file_name = link.get_attribute("download")

            # an upload that is not an image: one line (a warning toast, kept in the legend's place), no Gradio error
            broken = tmp_path / "broken.jpg"
            broken.write_bytes(b"this is not a JPEG")
            page.set_input_files("#input-image input[type=file]", str(broken))
            page.wait_for_selector("#legend .demo-error", timeout=RESULT_S * 1000)
            page.wait_for_selector(".toast-body", timeout=RESULT_S * 1000)
            page.screenshot(path=str(tmp_path / "app_bad_upload.png"), full_page=True)
            error_line = page.inner_text("#legend .demo-error")
            toasts = page.eval_on_selector_all(".toast-body", "toasts => toasts.map(t => t.innerText)")
            page_text = page.inner_text("body")
            error_badges = page.get_by_text("Error", exact=True).count()
            overlay_after = page.locator("#overlay img").count()
        finally:
            browser.close()

    line = "broken.jpg: cannot read this file as an image (UnidentifiedImageError: cannot identify image file 'broken.jpg')"
    assert error_line == line
    assert len(toasts) == 1 and line in toasts[0] and "Warning" in toasts[0], toasts
    assert "ComponentProcessingError" not in page_text and str(tmp_path) not in page_text
    assert error_badges == 0 and overlay_after == 0  # no red "Error" badges; the previous overlay is cleared

    with Image.open(image_path) as uploaded:
        size = uploaded.size
    assert overlay_size == list(size)

    # legend: known class names with their ids, percentages of the image adding up to 100
    names = [row[0] for row in legend_rows]
    ids = [int(row[1]) for row in legend_rows]
    percents = [float(row[2].rstrip("%")) for row in legend_rows]
    assert len(legend_rows) >= 1 and set(names) <= set(CLASS_NAMES)
    assert all(CLASS_NAMES[i] == name for i, name in zip(ids, names))
    assert percents == sorted(percents, reverse=True)
    assert abs(sum(percents) - 100) <= 0.05 * len(percents) + 1e-6  # each rounded to 0.1

    # the downloaded mask: an RGB PNG at the image's size in the ImageNet-S encoding, holding the legend's classes
    assert file_name == f"{image_path.stem}_ids.png"
    mask_path = tmp_path / file_name
    mask_path.write_bytes(mask_bytes)
    with Image.open(mask_path) as mask:
        assert (mask.format, mask.mode, mask.size) == ("PNG", "RGB", size)
        rgb = np.asarray(mask).astype(np.int64)
    assert (rgb[..., 2] == 0).all()
    mask_ids = rgb[..., 0] + 256 * rgb[..., 1]
    assert set(np.unique(mask_ids).tolist()) == set(ids)
    for class_id, percent in zip(ids, percents):
        assert abs(100 * (mask_ids == class_id).mean() - percent) <= 0.05 + 1e-6

    assert external == [], f"the page tried to reach outside this machine: {external}"
    assert screenshot.stat().st_size > 10_000
    log = app_server["log"].read_text()
    assert "Serving the demo of" in log and "Traceback" not in log, log[-3000:]
    print(json.dumps({"screenshot": str(screenshot)}))


# -- quick checks of the parts the page is made of ---------------------------------------------------------------


def test_class_areas_and_legend_list_the_classes_found_largest_first():
    prediction = np.zeros((10, 20), dtype=np.int32)
    prediction[:, :5] = 3  # 25%
    prediction[0, 5:7] = 1000  # 1%: the ignore id has a name of its own
    areas = class_areas(prediction, {0: "other", 3: "hen <b>"})
    assert [(a.class_id, a.name, a.pixels) for a in areas] == [
        (0, "other", 148),
        (3, "hen <b>", 50),
        (1000, "ignore (not scored)", 2),
    ]
    assert [round(a.percent, 6) for a in areas] == [74.0, 25.0, 1.0]
    assert areas[1].color == tuple(int(c) for c in label_palette()[3])  # the overlays' colours
    html_text = legend_html(areas)
    assert html_text.count('class="legend-row"') == 3
    assert "hen &lt;b&gt;" in html_text and "<b>" not in html_text  # names are escaped
    assert "74.0%" in html_text and "3 classes found" in html_text
    assert "+1 more classes" in legend_html(areas, max_rows=2) and "1.0%</td></tr>" in legend_html(areas, max_rows=2)


def test_find_examples_spreads_over_the_folder_and_refuses_a_wrong_one(tmp_path):
    for name in ("a", "b", "c"):
        (tmp_path / "images" / name).mkdir(parents=True)
        for index in range(4):
            Image.new("RGB", (8, 8)).save(tmp_path / "images" / name / f"{index}.jpg")
    found = find_examples(tmp_path / "images", count=3)
    assert [Path(p).relative_to(tmp_path / "images").as_posix() for p in found] == ["a/0.jpg", "b/2.jpg", "c/3.jpg"]
    assert find_examples(None, default_dirs=[tmp_path / "missing", tmp_path / "images"], count=1) == [
        str((tmp_path / "images" / "a" / "0.jpg").resolve())
    ]
    assert find_examples(None, default_dirs=[tmp_path / "missing"]) == []
    with pytest.raises(FileNotFoundError, match="no such image folder"):
        find_examples(tmp_path / "missing")


def test_app_script_errors_are_one_line(tmp_path):
    """Mistakes end before the model or Gradio loads, in one line (imagenets_hf.cli's rules)."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        cases = [
            (["--port", "0"], 2, "app.py: error: --port must be in 1..65535, got 0 (see --help)"),
            (
                ["--examples", str(tmp_path / "none"), "--port", str(free_port())],
                1,
                f"app.py: error: no such image folder: {tmp_path / 'none'}",
            ),
            (
                ["--port", str(busy.getsockname()[1])],
                1,
                f"app.py: error: cannot serve on 127.0.0.1:{busy.getsockname()[1]}",
            ),
        ]
        for args, status, line in cases:
            result = subprocess.run(
                [sys.executable, str(REPO_ROOT / "scripts" / "app.py"), "--model", str(tmp_path), *args],
                cwd=tmp_path,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert result.returncode == status, result.stderr
            assert result.stdout == "" and len(result.stderr.splitlines()) == 1, result.stderr
            assert result.stderr.startswith(line), result.stderr
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "app.py"), "--model", str(tmp_path / "no_model")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (result.returncode, result.stderr.strip()) == (
        1,
        f"app.py: error: no such model folder: {tmp_path / 'no_model'}",
    )
