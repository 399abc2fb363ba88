"""`scripts/bench_eval_scale.py` at toy size (seconds): it runs, compares the two post-processings on the same logits
and reports the fields the docs quote."""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from script_runner import run_script

from imagenets_hf.benchmarks.eval_scale import post_process_with
from imagenets_hf.model import ViTFCNImageProcessor


def test_the_reference_is_the_former_full_resize():
    torch.manual_seed(0)
    logits = torch.randn(2, 30, 4, 5)
    processor = ViTFCNImageProcessor()
    sizes = [(20, 24), (1100, 1000)]  # the second above max_pixels: long side 1000, then nearest up
    maps = post_process_with(processor, logits, sizes)
    expected = F.interpolate(logits[:1], size=(20, 24), mode="bilinear", align_corners=False).argmax(1)[0]
    assert torch.equal(maps[0], expected)
    assert maps[1].shape == (1100, 1000)
    for former, today in zip(maps, processor.post_process_semantic_segmentation(logits, sizes)):
        assert torch.equal(former, today)


def test_toy_benchmark_runs_and_the_maps_agree(monkeypatch, capsys):
    code, lines = run_script(
        "bench_eval_scale",
        *("--images", 3, "--height", 40, "--width", 60, "--large-images", 1, "--large-size", 70, 50),
        *("--batch-size", 2, "--num-labels", 40),
        monkeypatch=monkeypatch,
        capsys=capsys,
    )
    assert code == 0, lines
    result = json.loads(lines[-1])
    assert result["benchmark"] == "eval_scale" and result["device"] == "cpu"
    assert (result["images"], result["size"], result["large_images"]) == (3, [40, 60], 1)
    assert result["maps_equal"] is True and result["pixels_differing"] == {"bounds": 0, "chunks": 0}
    for path in ("bounds", "chunks", "former"):
        assert result[path]["s_per_image"] > 0 and result[path]["peak_rss_gb"] > 0
    assert set(result["metric_ms_per_image"]) == {"plain", "extended"}
    assert lines[-2].startswith("class maps equal: True")
