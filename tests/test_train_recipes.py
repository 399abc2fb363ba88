"""Recipes: the shipped YAML files hold the values of IMAGENETS.md; overriding from code, YAML and the command line."""

from __future__ import annotations

import argparse

import pytest

from imagenets_hf.training.recipes import (
    Recipe,
    add_recipe_arguments,
    available_recipes,
    load_recipe,
    overrides_from_args,
)

# From IMAGENETS.md ("The reference recipe"): encoder, pre-trained weights, lr, layer decay.
PUBLISHED = {
    "mae-base-pretrained": ("vit_base_patch16_224", "mae_pretrain_vit_base.pth", 5e-4, 0.60),
    "mae-base-finetuned": ("vit_base_patch16_224", "mae_finetuned_vit_base.pth", 1e-4, 0.40),
    "sere-small-pretrained": ("vit_small_patch16_224", "sere_pretrained_vit_small_ep100.pth", 5e-4, 0.50),
    "sere-small-finetuned": ("vit_small_patch16_224", "sere_finetuned_vit_small_ep100.pth", 5e-4, 0.50),
}


def test_shipped_recipes():
    semi = {"mae-base-pretrained-semi", "sere-small-pretrained-semi", "demo-semi"}  # variants, no published figure
    assert set(available_recipes()) == {*PUBLISHED, "demo", *semi}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_recipe_values(name):
    recipe = load_recipe(name)
    encoder, weights, lr, layer_decay = PUBLISHED[name]
    assert recipe.name == name
    assert (recipe.encoder_name, recipe.pretrained, recipe.lr, recipe.layer_decay) == (
        encoder,
        weights,
        lr,
        layer_decay,
    )
    # schedule: 3600 iterations, global batch 256 = 32 per GPU x 8 GPUs, warmup 180 from 1e-6 x lr, cosine to 1e-6
    assert (recipe.max_iters, recipe.global_batch_size, recipe.per_device_batch_size) == (3600, 256, 32)
    assert recipe.gradient_accumulation_steps(8) == 1
    assert (recipe.warmup_iters, recipe.warmup_ratio, recipe.min_lr) == (180, 1e-6, 1e-6)
    assert recipe.val_interval == 360
    # optimiser: AdamW betas (0.9, 0.999), weight decay 0.05
    assert recipe.betas == [0.9, 0.999] and recipe.weight_decay == 0.05
    assert recipe.no_weight_decay_tokens is False  # mmseg decayed cls_token and pos_embed (optim.py)
    # model: drop path 0.1 on the MLP branch only (mmseg's ViT), the FCN head (mmseg), ImageNet-S919 (920 labels), fp16
    assert recipe.drop_path_rate == 0.1 and recipe.drop_path_branches == "mlp" and recipe.head == "fcn"
    assert recipe.subset == "919" and recipe.num_labels == 920
    assert recipe.mixed_precision == "fp16"
    # pipeline: scale (1024, 256) x [0.5, 2], 224 crops, cat_max_ratio 0.75, flip 0.5, photometric distortion
    assert recipe.pipeline == "mmseg"
    assert recipe.resize_scale == [1024, 256] and recipe.ratio_range == [0.5, 2.0]
    assert (recipe.crop_size, recipe.cat_max_ratio, recipe.flip_prob) == (224, 0.75, 0.5)
    assert recipe.photometric_distortion is True
    # evaluation: short side 256, long side at most 1024
    assert (recipe.eval_short_side, recipe.eval_max_long_side) == (256, 1024)


@pytest.mark.parametrize(("subset", "labels"), [("919", 920), ("300", 301), ("50", 51)])
def test_subset_sets_num_labels(subset, labels):
    assert load_recipe("sere-small-pretrained", {"subset": subset}).num_labels == labels
    assert load_recipe("sere-small-pretrained", {"subset": int(subset)}).subset == subset


def test_gradient_accumulation_keeps_the_global_batch():
    recipe = load_recipe("mae-base-pretrained")
    assert [recipe.gradient_accumulation_steps(n) for n in (1, 2, 4, 8)] == [8, 4, 2, 1]
    with pytest.raises(ValueError, match="not a multiple"):
        recipe.gradient_accumulation_steps(3)
    with pytest.raises(ValueError, match="not a multiple"):
        load_recipe("mae-base-pretrained", {"per_device_batch_size": 64}).gradient_accumulation_steps(8)


def test_overrides_are_typed_and_validated():
    recipe = load_recipe("demo", {"lr": "1e-4", "max_iters": "50", "photometric_distortion": "false"})
    assert recipe.lr == 1e-4 and recipe.max_iters == 50 and recipe.photometric_distortion is False
    with pytest.raises(ValueError, match="unknown recipe field 'learning_rate'"):
        load_recipe("demo", {"learning_rate": 1e-4})
    with pytest.raises(ValueError, match="'max_iters' expects"):
        load_recipe("demo", {"max_iters": "many"})
    with pytest.raises(ValueError, match="pipeline .*must be one of mmseg, imagenetsegmodel"):
        load_recipe("demo", {"pipeline": "mine"})
    with pytest.raises(ValueError, match="unknown recipe 'nope'"):
        load_recipe("nope")


def test_yaml_file_round_trip_and_errors(tmp_path):
    recipe = load_recipe("sere-small-finetuned", {"lr": 2e-4, "encoder_kwargs": {"depth": 2}})
    path = recipe.save(tmp_path / "recipe.yaml")
    assert load_recipe(path) == recipe
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: 1e-3\nwarmup: 10\n")
    with pytest.raises(ValueError, match=r"bad\.yaml: unknown recipe field 'warmup'"):
        load_recipe(bad)
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        load_recipe(tmp_path / "missing.yaml")


def test_command_line_precedence(tmp_path):
    config = tmp_path / "overrides.yaml"
    config.write_text("lr: 3.0e-4\nmax_iters: 100\nlayer_decay: 0.7\n")
    parser = argparse.ArgumentParser()
    add_recipe_arguments(parser)
    args = parser.parse_args(
        [
            "--recipe", "mae-base-pretrained",
            "--config", str(config),
            "--lr", "1e-4",
            "--data-dir", "ImageNetS300",
            "--subset", "300",
            "--pretrained", "weights.pth",
            "--set", "max_iters=200",
            "--set", "betas=[0.9, 0.95]",
            "--encoder-kwargs", "{depth: 2}",
        ]
    )  # fmt: skip
    recipe = load_recipe(args.recipe, overrides_from_args(args))
    assert recipe.lr == 1e-4  # flag beats --config
    assert recipe.max_iters == 200  # --set beats --config
    assert recipe.layer_decay == 0.7  # from --config
    assert (recipe.data_dir, recipe.subset, recipe.num_labels) == ("ImageNetS300", "300", 301)
    assert recipe.pretrained == "weights.pth"
    assert recipe.betas == [0.9, 0.95] and recipe.encoder_kwargs == {"depth": 2}
    assert load_recipe("demo", {"pretrained": "null"}).pretrained is None


def test_demo_recipe_is_small_and_from_scratch():
    recipe = load_recipe("demo")
    assert isinstance(recipe, Recipe)
    assert recipe.pretrained is None and recipe.subset == "mini" and recipe.num_labels is None
    assert recipe.data_dir == "data/mini" and recipe.output_dir == "outputs/demo"
    assert recipe.mixed_precision == "no"
    assert recipe.gradient_accumulation_steps(1) * recipe.per_device_batch_size == recipe.global_batch_size
    assert recipe.gradient_accumulation_steps(2) == 1  # also runs on two processes
