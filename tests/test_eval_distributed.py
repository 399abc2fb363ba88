"""Two CPU processes (gloo) with an uneven split give exactly the one-process numbers."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from imagenets_hf.evaluation import SegmentationEvaluator

NUM_IMAGES = 7  # odd: the two processes get 4 and 3 images
NUM_LABELS = 5

# Shared by the workers and the single-process reference: maps, rows and a tiny model, all from fixed seeds.
COMMON = textwrap.dedent(
    """
    import numpy as np
    import torch
    from PIL import Image

    NUM_IMAGES, NUM_LABELS = 7, 5

    def make_maps():
        rng = np.random.default_rng(0)
        maps = []
        for i in range(NUM_IMAGES):
            height, width = 20 + 3 * i, 30 - 2 * i
            target = np.kron(rng.integers(0, NUM_LABELS, (height // 4 + 1, width // 4 + 1)), np.ones((4, 4), int))
            target = target[:height, :width]
            target[rng.random((height, width)) < 0.1] = 1000
            prediction = np.where(rng.random((height, width)) < 0.7, target % 1000, rng.integers(0, NUM_LABELS))
            maps.append((prediction, target))
        return maps

    def make_rows():
        rng = np.random.default_rng(1)
        rows = []
        for i in range(NUM_IMAGES):
            height, width = (40, 56) if i % 3 else (48, 32)
            image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
            annotation = rng.integers(0, NUM_LABELS, (height, width)).astype(np.uint16)
            annotation[:3] = 1000
            rows.append({"image": image, "annotation": Image.fromarray(annotation), "image_id": f"n0/{i}"})
        return rows

    def make_model():
        from imagenets_hf.model import ViTFCNConfig, ViTFCNForSemanticSegmentation, ViTFCNImageProcessor

        torch.manual_seed(0)
        config = ViTFCNConfig.from_preset(
            "fcn", encoder_name="vit_small_patch16_224", num_labels=NUM_LABELS, drop_path_rate=0.0,
            encoder_kwargs={"embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 8, "img_size": 32},
        )
        model = ViTFCNForSemanticSegmentation(config).eval().double()
        # float64 (inputs cast on the way in): the workers (1 thread, their own batches) and the parent predict the
        # same argmax on any CPU. In float32 the logits of other batches and thread counts differ by ~1e-6 of their
        # scale, which can flip a near-tie somewhere (see test_eval_inference.in_float64).

        def cast_inputs(module, args, kwargs):
            return args, {k: v.double() if torch.is_tensor(v) else v for k, v in kwargs.items()}

        model.register_forward_pre_hook(cast_inputs, with_kwargs=True)
        # short side 32 keeps the forward cheap
        return model, ViTFCNImageProcessor(short_side=32, max_long_side=64)
    """
)

WORKER = textwrap.dedent(
    """
    import json, sys
    import torch
    from accelerate import Accelerator
    from common import make_maps, make_model, make_rows, NUM_LABELS
    from imagenets_hf.evaluation import SegmentationEvaluator
    from imagenets_hf.evaluation.inference import evaluate_model

    accelerator = Accelerator(cpu=True)  # under torchrun on CPU: gloo, MULTI_CPU
    rank, world = accelerator.process_index, accelerator.num_processes
    assert world == 2 and torch.distributed.is_initialized(), (world, accelerator.distributed_type)
    maps = make_maps()
    evaluator = SegmentationEvaluator(NUM_LABELS)
    for prediction, target in maps[rank::world]:
        evaluator.update(prediction, target)
    local_images = evaluator.num_images
    by_dist = evaluator.sync().compute()  # torch.distributed path
    by_accelerator = evaluator.sync(accelerator).compute()  # accelerate path (and sync is idempotent)
    model, processor = make_model()
    prepared = accelerator.prepare(model)  # a DDP-wrapped model: evaluate_model unwraps it
    by_loop = evaluate_model(prepared, processor, make_rows(), accelerator=accelerator, batch_size=2,
                             extended=True, progress=False, num_workers=0)
    with open(sys.argv[1] + f"/rank{rank}.json", "w") as f:
        json.dump({"local_images": local_images, "dist": by_dist, "accelerator": by_accelerator, "loop": by_loop}, f)
    accelerator.end_training()  # destroys the process group: one left alive can abort the process at its exit
    """
)


def assert_same_metrics(actual, expected):
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        # From equal integer counts; float64 sums of per-image values (F-measure) may be added in another order in
        # another process: measured 1.4e-14 on values ~100 (1e-16 relative). One image lost or counted twice
        # changes the metrics by > 1e-3.
        np.testing.assert_allclose(
            np.asarray(actual[key], dtype=float), np.asarray(value, dtype=float), rtol=1e-12, atol=0, err_msg=key
        )


@pytest.mark.slow
def test_two_processes_with_uneven_split_equal_one_process(tmp_path):
    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not on PATH")
    (tmp_path / "common.py").write_text(COMMON)
    (tmp_path / "worker.py").write_text(WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(tmp_path), CUDA_VISIBLE_DEVICES="")
    command = [torchrun, "--nproc_per_node", "2", "--master_port", "29533", str(tmp_path / "worker.py"), str(tmp_path)]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["local_images"] for r in ranks] == [4, 3]

    sys.path.insert(0, str(tmp_path))
    try:
        import common
    finally:
        sys.path.remove(str(tmp_path))
    single = SegmentationEvaluator(NUM_LABELS)
    for prediction, target in common.make_maps():
        single.update(prediction, target)
    expected = single.compute()
    assert expected["num_images"] == NUM_IMAGES
    from imagenets_hf.evaluation.inference import evaluate_model

    model, processor = common.make_model()
    expected_loop = evaluate_model(
        model, processor, common.make_rows(), batch_size=2, extended=True, progress=False, num_workers=0
    )
    assert expected_loop["num_images"] == NUM_IMAGES
    for result in ranks:
        # integer counts are exact; only the F-measure sum (float64) may differ in its last bits
        assert result["dist"]["per_class_iou"] == expected["per_class_iou"]
        assert_same_metrics(result["dist"], expected)
        assert_same_metrics(result["accelerator"], expected)
        assert result["loop"]["per_class_iou"] == expected_loop["per_class_iou"]
        assert_same_metrics(result["loop"], expected_loop)


def test_sync_without_distributed_is_a_no_op():
    evaluator = SegmentationEvaluator(3)
    evaluator.update(torch.tensor([[0, 1]]), torch.tensor([[0, 2]]))
    before = evaluator.compute()
    assert_same_metrics(evaluator.sync().compute(), before)
