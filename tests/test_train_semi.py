"""Semi-supervised training (UniMatch V2) in the fine-tuning loop: the EMA teacher, pseudo-labels and their confidence
mask, CutMix, complementary feature dropout, the unsupervised loss's normalisation, and exact resume with both
streams."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from tiny_runs import TINY_RECIPE

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


def fake_unlabelled_batches(recipe, accelerator, skip, train_rows=None):
    """A stand-in for the unlabelled stream (the interface's dict), micro-batch i drawn from seed (rank, i)."""
    size, crop = recipe.per_device_batch_size, recipe.crop_size
    index = skip
    while True:
        generator = torch.Generator().manual_seed(1000 * accelerator.process_index + index)
        images = torch.randn(3, size, 3, crop, crop, generator=generator)
        ignore = torch.zeros(size, crop, crop, dtype=torch.uint8)
        ignore[:, :, crop - 4 :] = 255
        boxes = torch.zeros(2, size, crop, crop, dtype=torch.uint8)
        boxes[:, :, 4:20, 8:24] = 1
        yield {
            "image_weak": images[0],
            "image_strong1": images[1],
            "image_strong2": images[2],
            "ignore_mask": ignore,
            "cutmix_box1": boxes[0],
            "cutmix_box2": boxes[1],
        }
        index += 1


def test_semi_stop_then_resume_gives_the_same_student_and_teacher(mini_dir, tmp_path, monkeypatch):
    """6 semi-supervised iterations straight vs stopped after 3 and resumed from checkpoint 2: the saved model (the
    teacher) and the student's checkpointed weights are identical; results hold both mIoUs."""
    from imagenets_hf.training import finetune as finetune_module

    monkeypatch.setattr(finetune_module, "build_unlabelled", fake_unlabelled_batches)
    overrides = {
        **TINY_RECIPE,
        "data_dir": str(mini_dir),
        "num_workers": 0,
        "semi_supervised": "unimatch",
        "confidence_threshold": 0.0,  # every pixel learnt: the unlabelled loss moves the weights from the start
        "ema_momentum": 0.9,
    }
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    result = finetune_module.finetune(load_recipe("demo", {**overrides, "output_dir": str(straight)}), progress=False)
    assert result["saved_model"] == "teacher" and {"mIoU_teacher", "mIoU_student"} <= result.keys()
    finetune_module.finetune(
        load_recipe("demo", {**overrides, "output_dir": str(resumed)}), stop_after=3, progress=False
    )
    checkpoint_2 = str(resumed / "checkpoints" / "checkpoint_2")
    recipe = load_recipe("demo", {**overrides, "output_dir": str(resumed)})
    finetune_module.finetune(recipe, resume=checkpoint_2, progress=False)
    for name in ("model.safetensors", "checkpoints/checkpoint_6/model.safetensors"):
        expected, actual = load_file(straight / name), load_file(resumed / name)
        assert expected.keys() == actual.keys()
        for key in expected:
            assert torch.equal(expected[key], actual[key]), (name, key)
    student = load_file(straight / "checkpoints/checkpoint_6/model.safetensors")
    teacher = load_file(straight / "model.safetensors")
    assert not torch.equal(student["decode_head.conv_seg.weight"], teacher["decode_head.conv_seg.weight"])
