"""Semi-supervised training (UniMatch V2) in the fine-tuning loop: the EMA teacher, pseudo-labels and their confidence
mask, CutMix, complementary feature dropout, the unsupervised loss's normalisation, and exact resume with both
streams."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from test_train_finetune import TINY_OVERRIDES, run_finetune
from test_train_setup_changes import launch_two_processes
from tiny_runs import TINY_RECIPE, cli_args

from imagenets_hf.model.modeling_vit_fcn import complementary_dropout_masks
from imagenets_hf.training.recipes import RecipeError, load_recipe
from imagenets_hf.training.semi import (
    PseudoLabels,
    cutmix,
    ema_ratio,
    make_teacher,
    pseudo_label,
    unsupervised_loss,
    update_teacher,
)


def test_teacher_is_the_exact_ema_of_the_student():
    """Parameters and BatchNorm statistics blend with ratio min(1 - 1/(t + 1), momentum) (hand-computed); the step
    count (an integer buffer) is copied; the teacher is in eval mode without gradients."""
    student = torch.nn.Sequential(torch.nn.Linear(1, 1), torch.nn.BatchNorm1d(1))
    teacher = make_teacher(student)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        student[0].weight.fill_(2.0)
        student[0].bias.fill_(-4.0)
        student[1].running_mean.fill_(8.0)
        student[1].num_batches_tracked.fill_(3)
    update_teacher(teacher, student, iteration=0, momentum=0.9)  # ratio 0: a copy
    assert teacher[0].weight.item() == 2.0 and teacher[0].bias.item() == -4.0
    assert teacher[1].running_mean.item() == 8.0 and teacher[1].num_batches_tracked.item() == 3
    with torch.no_grad():
        student[0].weight.fill_(4.0)
        student[1].running_mean.fill_(0.0)
        student[1].num_batches_tracked.fill_(5)
    update_teacher(teacher, student, iteration=1, momentum=0.9)  # ratio min(1 - 1/2, 0.9) = 0.5
    assert teacher[0].weight.item() == 0.5 * 2.0 + 0.5 * 4.0
    assert teacher[1].running_mean.item() == 4.0 and teacher[1].num_batches_tracked.item() == 5
    update_teacher(teacher, student, iteration=19, momentum=0.75)  # ratio min(1 - 1/20, 0.75) = 0.75
    assert teacher[0].weight.item() == 0.75 * 3.0 + 0.25 * 4.0
    assert teacher[1].running_mean.item() == 0.75 * 4.0
    assert [ema_ratio(t, 0.996) for t in (0, 1, 3)] == [0.0, 0.5, 0.75] and ema_ratio(10**6, 0.996) == 0.996


def test_cutmix_mixes_images_labels_confidences_and_padding_alike():
    """Inside image i's box, every tensor takes image B-1-i's values (UniMatch V2's batch flipped along dim 0)."""
    box = torch.tensor([[[1, 0], [0, 0]], [[0, 0], [1, 1]]], dtype=torch.uint8)
    labels = torch.tensor([[[0, 1], [2, 3]], [[4, 5], [6, 7]]])
    assert cutmix(labels, box).tolist() == [[[4, 1], [2, 3]], [[4, 5], [2, 3]]]
    images = torch.stack([labels, labels + 10], dim=1).float()  # (B=2, C=2, 2, 2): channel 1 = channel 0 + 10
    mixed = cutmix(images, box)
    assert mixed[:, 0].tolist() == [[[4, 1], [2, 3]], [[4, 5], [2, 3]]]
    assert mixed[:, 1].tolist() == [[[14, 11], [12, 13]], [[14, 15], [12, 13]]]
    targets = PseudoLabels(labels, labels.float() / 10, torch.tensor([[[0, 0], [0, 255]], [[255, 0], [0, 0]]]))
    mixed_targets = targets.mixed(box)
    assert mixed_targets.labels.tolist() == cutmix(labels, box).tolist()
    assert torch.equal(mixed_targets.confidence, torch.tensor([[[4, 1], [2, 3]], [[4, 5], [2, 3]]]) / 10)
    assert mixed_targets.padding.tolist() == [[[255, 0], [0, 255]], [[255, 0], [0, 255]]]


def test_confident_pixels_are_kept_and_padding_excluded():
    """Two classes, probabilities (0.96, 0.04), (0.9, 0.1), (0.02, 0.98), (0.99, 0.01) with the last on padding:
    at threshold 0.95 the first and third pixels are learnt (classes 0 and 1)."""
    probs = torch.tensor([[0.96, 0.9], [0.02, 0.99]])  # class 0's probability per pixel
    logits = torch.stack([probs.log(), (1 - probs).log()])[None]  # (1, 2, 2, 2)
    padding = torch.tensor([[[0, 0], [0, 255]]], dtype=torch.uint8)
    targets = pseudo_label(logits, padding)
    assert targets.labels.tolist() == [[[0, 0], [1, 0]]]
    assert torch.allclose(targets.confidence[0], torch.tensor([[0.96, 0.9], [0.98, 0.99]]))
    assert targets.confident(0.95).tolist() == [[[True, False], [True, False]]]


def test_image_class_pseudo_labels_take_objectness_from_the_teacher_and_the_class_from_the_folder():
    """Two pixels: logits (other, 1, 2, 3) = (0, 2, 1, log 3) (p_other = 1/14.107: an object, mostly class 1) and
    (log 9, 0, 0, 0) (p_other = 9/12: other), in three images whose folders give class 3, unknown (-1) and 2. Known
    classes: the object pixel takes the folder's class with confidence 1 - p_other, the other pixel "other" with
    p_other; unknown: the plain argmax and softmax maximum."""
    pixels = torch.tensor([[0.0, 2.0, 1.0, math.log(3.0)], [math.log(9.0), 0.0, 0.0, 0.0]])  # (2 pixels, 4 classes)
    logits = pixels.T[None, :, None, :].repeat(3, 1, 1, 1)  # (3, 4, 1, 2)
    padding = torch.zeros(3, 1, 2, dtype=torch.uint8)
    targets = pseudo_label(logits, padding, torch.tensor([3, -1, 2]))
    assert targets.labels[:, 0].tolist() == [[3, 0], [1, 0], [2, 0]]
    total = 1 + math.exp(2) + math.e + 3
    object_confidence, other_confidence = 1 - 1 / total, 9 / 12
    expected = [[object_confidence, other_confidence], [math.exp(2) / total, other_confidence]] + [
        [object_confidence, other_confidence]
    ]
    assert targets.confidence[:, 0].tolist() == [pytest.approx(row, rel=1e-6) for row in expected]
    unrestricted = pseudo_label(logits, padding)
    assert unrestricted.labels[:, 0].tolist() == [[1, 0]] * 3


def test_unsupervised_loss_sums_confident_pixels_over_non_padding_ones():
    """(CE of the two confident pixels) / 3 non-padding pixels, as unimatch_v2.py normalises."""
    model = SimpleNamespace(config=SimpleNamespace(ignore_index=1000), loss_labels=lambda labels: labels.long())
    targets = PseudoLabels(
        labels=torch.tensor([[[0, 1], [1, 0]]]),
        confidence=torch.tensor([[[0.99, 0.5], [0.97, 0.99]]]),
        padding=torch.tensor([[[0, 0], [0, 255]]], dtype=torch.uint8),
    )
    logits = torch.zeros(1, 2, 2, 2)
    logits[0, 0, 0, 0] = math.log(3.0)  # pixel (0, 0): p(class 0) = 3/4
    loss = unsupervised_loss(model, logits, targets, threshold=0.95)
    expected = (-math.log(3 / 4) - math.log(1 / 2)) / 3  # pixel (1, 0): uniform, class 1
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_complementary_dropout_masks_complement_each_other():
    torch.manual_seed(0)
    masks = complementary_dropout_masks(batch=16, channels=32, fraction=0.5)
    first, second = masks[:8], masks[8:]
    assert torch.equal(first + second, torch.full((8, 32), 2.0))
    assert set(masks.unique().tolist()) == {0.0, 1.0, 2.0}
    whole = (first == 1).all(dim=1)
    assert whole.sum().item() == 4  # int(8 x (1 - 0.5)) pairs left whole, the others dropped in halves
    assert ((first[~whole] == 0) | (first[~whole] == 2)).all()
    assert torch.equal(complementary_dropout_masks(4, 3, fraction=0.0), torch.ones(4, 3))
    with pytest.raises(ValueError, match="two halves"):
        complementary_dropout_masks(3, 2, 0.5)


def test_model_forward_with_complementary_dropout_feeds_the_head_masked_maps():
    """The forward option multiplies the maps the head reads by the masks (same draws), and is off by default."""
    from imagenets_hf.training.finetune import build_model

    recipe = load_recipe("demo", TINY_RECIPE)
    model = build_model(recipe, ["other", "a", "b"]).eval()
    pixels = torch.randn(4, 3, 32, 32)
    maps, _ = model.forward_feature_maps(pixels)
    torch.manual_seed(3)
    masks = complementary_dropout_masks(4, maps[-1].shape[1], 0.5)[:, :, None, None]
    expected = model.decode_head([m * masks for m in maps])
    torch.manual_seed(3)
    assert torch.allclose(model(pixel_values=pixels, complementary_dropout=0.5).logits, expected, atol=1e-6)
    assert torch.equal(model(pixel_values=pixels).logits, model.decode_head(maps))


def test_semi_recipe_fields_are_validated_in_one_line():
    with pytest.raises(RecipeError, match=r"augment_on_device \(True\) cannot go with semi_supervised"):
        load_recipe("demo", {"semi_supervised": "unimatch", "augment_on_device": True})
    with pytest.raises(RecipeError, match=r"ema_momentum \(1.0\) must lie in \[0, 1\)"):
        load_recipe("demo", {"ema_momentum": 1.0})
    with pytest.raises(RecipeError, match="semi_supervised .* must be one of none, unimatch"):
        load_recipe("demo", {"semi_supervised": "fixmatch"})
    with pytest.raises(RecipeError, match="unsupervised_loss_weight"):
        load_recipe("demo", {"unsupervised_loss_weight": -1})
    with pytest.raises(RecipeError, match="pseudo_label_classes .* must be one of all, image_class"):
        load_recipe("demo", {"pseudo_label_classes": "folder"})


# The tiny recipe, semi-supervised: global batches of 8 labelled (1 process x 4 x 2 accumulation, or 2 x 4) and 8
# unlabelled images (the mini dataset's 60 train/ images and the train-semi images beyond 2 a class), the teacher's
# pixels all learnt (threshold 0: the unlabelled loss moves the weights from the first iteration).
SEMI_TINY = {
    **TINY_OVERRIDES,
    "semi_supervised": "unimatch",
    "labels_per_class": 2,
    "unlabelled_global_batch_size": 8,
    "confidence_threshold": 0.0,
    "ema_momentum": 0.9,
    "num_workers": 0,
}


def assert_same_weights(expected_file, actual_file) -> None:
    expected, actual = load_file(expected_file), load_file(actual_file)
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), (actual_file, key)


@pytest.mark.slow
def test_semi_stop_then_resume_gives_the_same_student_and_teacher(mini_dir, tmp_path):
    """6 semi-supervised iterations (the first one on labelled images alone) straight vs stopped after 3 and resumed
    from checkpoint 2: the saved model (the
    teacher) and the student's checkpointed weights are identical (both streams, the teacher, CutMix boxes, feature
    dropout draws restored); results hold both mIoUs, and the teacher is not the student."""
    from imagenets_hf.training.finetune import finetune

    def recipe(output_dir):
        # The unlabelled stream starts at iteration 1 (a burn-in of one): the resumed run must skip its first
        # (2 - 1) x 2 micro-batches, not 2 x 2.
        overrides = {**SEMI_TINY, "unsupervised_start_iter": 1}
        return load_recipe("demo", {**overrides, "data_dir": str(mini_dir), "output_dir": str(output_dir)})

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    result = finetune(recipe(straight), progress=False)
    assert result["saved_model"] == "teacher" and {"mIoU_teacher", "mIoU_student"} <= result.keys()
    assert result["mIoU_teacher"] == result["metrics"]["mIoU"]
    finetune(recipe(resumed), stop_after=3, progress=False)
    finetune(recipe(resumed), resume=str(resumed / "checkpoints" / "checkpoint_2"), progress=False)
    for name in ("model.safetensors", "checkpoints/checkpoint_6/model.safetensors"):
        assert_same_weights(straight / name, resumed / name)
    student = load_file(straight / "checkpoints/checkpoint_6/model.safetensors")
    teacher = load_file(straight / "model.safetensors")
    assert not torch.equal(student["decode_head.conv_seg.weight"], teacher["decode_head.conv_seg.weight"])


@pytest.mark.slow
def test_semi_on_two_processes_resumes_exactly_and_from_one_process(mini_dir, tmp_path):
    """2 CPU processes (gloo): 4 iterations straight vs stopped after 2 and resumed: identical student and teacher
    (each process's teacher holds the main process's BatchNorm statistics, as the checkpoint does). A 1-process
    checkpoint resumes on 2 processes (the teacher and both streams' positions carry over); that run is not compared
    with a 1-process one: CutMix pairs images within a process's micro-batch and the unlabelled loss is normalised
    per micro-batch, as UniMatch V2 does per GPU, so another process count is another (valid) run."""
    from imagenets_hf.training.finetune import finetune

    args = ["--data-dir", str(mini_dir), *cli_args({**SEMI_TINY, "max_iters": 4, "checkpoint_interval": 2})]
    straight, resumed, moved = tmp_path / "straight", tmp_path / "resumed", tmp_path / "moved"
    completed = run_finetune([*args, "--output-dir", str(straight)], launcher=launch_two_processes())
    assert "2 process(es) x 4 per device x 1 accumulation = global batch 8" in completed.stdout
    assert "4 a process and micro-batch" in completed.stdout
    run_finetune([*args, "--output-dir", str(resumed), "--stop-after", "2"], launcher=launch_two_processes())
    run_finetune([*args, "--output-dir", str(resumed), "--resume"], launcher=launch_two_processes())
    for name in ("model.safetensors", "checkpoints/checkpoint_4/model.safetensors"):
        assert_same_weights(straight / name, resumed / name)

    recipe = load_recipe("demo", {**SEMI_TINY, "max_iters": 4, "checkpoint_interval": 2, "data_dir": str(mini_dir)})
    finetune(load_recipe("demo", {**recipe.to_dict(), "output_dir": str(moved)}), stop_after=2, progress=False)
    completed = run_finetune([*args, "--output-dir", str(moved), "--resume"], launcher=launch_two_processes())
    assert "Resumed from" in completed.stdout and "at iteration 2" in completed.stdout
    assert json.loads((moved / "results.json").read_text())["num_processes"] == 2


def test_model_card_says_what_a_run_learnt_from():
    from imagenets_hf.training.finetune import describe_training_data

    assert describe_training_data(load_recipe("demo")) == "train-semi"
    semi = describe_training_data(load_recipe("demo-semi", {"labels_seed": 4, "pseudo_label_classes": "all"}))
    assert semi == (
        "train-semi (1 labelled image(s) a class, labels_seed 4) and the unlabelled images of `data/mini-semi/train` "
        "(semi-supervised, unimatch: pseudo-labels the teacher's argmax, confidence >= 0.9; the teacher is saved)"
    )
