"""Recipes as deltas: the published defaults live once (the Recipe dataclass), each recipe file states only what
differs; the unpublished DINOv2 recipes are marked as such and give every parameter of their real encoders the layer
id its depth calls for."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import yaml

from imagenets_hf.model.configuration_vit_fcn import DROP_PATH_BRANCHES as MODEL_DROP_PATH_BRANCHES
from imagenets_hf.model.configuration_vit_fcn import PRESETS
from imagenets_hf.training.finetune import build_model
from imagenets_hf.training.optim import layer_decay_param_groups
from imagenets_hf.training.recipes import (
    DROP_PATH_BRANCHES,
    HEADS,
    Recipe,
    available_recipes,
    load_recipe,
    recipe_path,
    unpublished_recipes,
)

# What a published recipe's own row of the table is (IMAGENETS.md: encoder, weights, lr, layer decay) plus its name,
# description and output folder.
PUBLISHED_ROW = {"name", "description", "encoder_name", "pretrained", "lr", "layer_decay", "output_dir"}
UNPUBLISHED = {"dinov2-small-linear", "dinov2-base-fcn"}
# Variants (`base: <recipe>`): the semi-supervised ones state their name, description, output folder and method.
VARIANTS = {
    "mae-base-pretrained-semi": "mae-base-pretrained",
    "sere-small-pretrained-semi": "sere-small-pretrained",
    "dinov2-base-fcn-semi": "dinov2-base-fcn",
    "demo-semi": "demo",
}
PUBLISHED = set(available_recipes()) - {"demo"} - set(VARIANTS)
# What the unpublished recipes state beyond that: the two published choices that only mmsegmentation's code made
# (stochastic depth on the MLP branch alone, weight decay on the tokens), which DINOv2's blocks and tokens do not take.
UNPUBLISHED_EXTRA = {"head": None, "drop_path_branches": "both", "no_weight_decay_tokens": True}


def stated_fields(name: str) -> dict:
    return yaml.safe_load(recipe_path(name).read_text())


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_recipe_files_state_only_their_row(name):
    stated = stated_fields(name)
    assert set(stated) == PUBLISHED_ROW
    defaults = Recipe()
    recipe = load_recipe(name)
    for field in dataclasses.fields(Recipe):
        if field.name not in stated:
            assert getattr(recipe, field.name) == getattr(defaults, field.name), field.name


def test_unpublished_recipes_are_marked_and_kept_apart():
    assert set(unpublished_recipes()) == UNPUBLISHED | {"dinov2-base-fcn-semi"}
    assert not set(unpublished_recipes()) & set(available_recipes())
    assert set(VARIANTS) <= set(available_recipes()) | set(unpublished_recipes())
    for name in set(unpublished_recipes()) | set(VARIANTS) - {"demo-semi"}:
        text = recipe_path(name).read_text()
        assert text.startswith(("# NOT PUBLISHED FOR IMAGENET-S", "# NO RESULT REPORTED")), name
        assert "Reported mIoU" not in text  # the model card reads a reported figure from that line
    for name in UNPUBLISHED:
        text = recipe_path(name).read_text()
        assert text.startswith("# NOT PUBLISHED FOR IMAGENET-S")
        assert "Reported mIoU" not in text  # the model card reads a reported figure from that line
        recipe = load_recipe(name)
        assert recipe.name == name and recipe.description.startswith("Not published for ImageNet-S")
        stated = stated_fields(name)
        assert set(stated) <= PUBLISHED_ROW | set(UNPUBLISHED_EXTRA)
        assert all(stated[key] == value for key, value in UNPUBLISHED_EXTRA.items() if value is not None)
        assert (recipe.max_iters, recipe.global_batch_size, recipe.subset) == (3600, 256, "919")  # the defaults


def test_recipe_heads_are_the_model_presets():
    assert set(HEADS) == set(PRESETS)
    assert DROP_PATH_BRANCHES == MODEL_DROP_PATH_BRANCHES


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_recipes_train_as_the_mmseg_runs(name):
    """The real encoders (meta device). Stochastic depth: mmseg's ViT layer drops only its FFN branch, block i at
    0.1 * i / 11. Weight decay: mmseg's LearningRateDecayOptimizerConstructor (num_layers = 12 + 2) puts
    backbone.cls_token and backbone.pos_embed (3-D, names not equal to the bare 'cls_token' / 'pos_embed') in group
    layer_0_decay with the patch projection's weight: weight decay 0.05, lr scale decay_rate ** (14 - 0 - 1)."""
    recipe = load_recipe(name)
    with torch.device("meta"):
        model = build_model(recipe, ["other", "goldfish", "shark"])
    blocks = model.encoder.blocks
    assert len(blocks) == 12
    assert all(isinstance(block.drop_path1, torch.nn.Identity) for block in blocks)
    assert [getattr(block.drop_path2, "drop_prob", 0.0) for block in blocks] == torch.linspace(0, 0.1, 12).tolist()
    groups = layer_decay_param_groups(
        model, recipe.lr, recipe.weight_decay, recipe.layer_decay, recipe.no_weight_decay_tokens
    )
    by_param = {n: g for g in groups for n in g["param_names"]}
    tokens = by_param["encoder.cls_token"]
    assert by_param["encoder.pos_embed"] is tokens and by_param["encoder.patch_embed.proj.weight"] is tokens
    assert tokens["weight_decay"] == 0.05
    # float64 powers against the hand-written exponent (default rel 1e-6); an id off by one is 1 / decay apart
    assert tokens["lr_scale"] == pytest.approx(recipe.layer_decay**13)
    assert tokens["lr"] == pytest.approx(recipe.lr * recipe.layer_decay**13)


@pytest.mark.parametrize("name", sorted(UNPUBLISHED))
def test_unpublished_recipes_layer_ids_fit_their_real_encoder(name):
    """The real encoders (built on the meta device: names and shapes without the arithmetic): 12 blocks, register
    tokens and layer scales in the layer-decay groups with the right ids and scales."""
    recipe = load_recipe(name)
    with torch.device("meta"):
        model = build_model(recipe, ["other", "goldfish", "shark"])
    assert model.num_layers == 12 and model.config.encoder_forward == "timm"
    # timm's / DINOv2's stochastic depth: both branches of block i at 0.1 * i / 11
    rates = torch.linspace(0, recipe.drop_path_rate, 12).tolist()
    for branch in ("drop_path1", "drop_path2"):
        assert [getattr(getattr(b, branch), "drop_prob", 0.0) for b in model.encoder.blocks] == rates
    assert model.config.head == recipe.head
    ids = {name: model.get_layer_id(name) for name, _ in model.named_parameters()}
    assert ids["encoder.reg_token"] == ids["encoder.cls_token"] == ids["encoder.pos_embed"] == 0
    assert ids["encoder.blocks.0.ls1.gamma"] == 1 and ids["encoder.blocks.11.ls2.gamma"] == 12
    assert ids["encoder.norm.weight"] == 13 and ids["decode_head.conv_seg.weight"] == 13
    groups = layer_decay_param_groups(
        model, recipe.lr, recipe.weight_decay, recipe.layer_decay, recipe.no_weight_decay_tokens
    )
    assert sum(len(g["params"]) for g in groups) == len(ids)
    assert sorted({g["layer_id"] for g in groups}) == list(range(14))
    by_param = {n: g for g in groups for n in g["param_names"]}
    # float64 powers (default rel 1e-6); an id off by one changes the scale by 1 / layer_decay (>= 1.67x)
    assert by_param["encoder.reg_token"]["lr_scale"] == pytest.approx(recipe.layer_decay**13)
    assert by_param["encoder.reg_token"]["weight_decay"] == 0.0  # a token, as cls_token and pos_embed
    assert by_param["encoder.blocks.5.ls1.gamma"]["lr_scale"] == pytest.approx(recipe.layer_decay ** (13 - 6))


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variants_state_only_their_differences_from_their_base(name):
    """A variant file names its base and states only its name, description, output folder and what it changes (the
    semi-supervised method and its pseudo-labels' classes and, for the CPU demo, its data and budget); every other field is the base recipe's."""
    stated = stated_fields(name)
    assert stated.pop("base") == VARIANTS[name]
    recipe, base = load_recipe(name), load_recipe(VARIANTS[name])
    assert recipe.semi_supervised == "unimatch" and base.semi_supervised == "none"
    assert recipe.name == name and recipe.output_dir == f"outputs/{name}"
    for field in dataclasses.fields(Recipe):
        if field.name not in stated:
            assert getattr(recipe, field.name) == getattr(base, field.name), field.name
    if name != "demo-semi":
        assert set(stated) == {"name", "description", "semi_supervised", "pseudo_label_classes", "output_dir"}
        assert (recipe.max_iters, recipe.unlabelled_global_batch_size) == (3600, 256)


def test_a_recipe_file_base_must_be_another_shipped_recipe(tmp_path):
    from imagenets_hf.training.recipes import RecipeError

    own = tmp_path / "mine.yaml"
    own.write_text("base: demo\nmax_iters: 50\n")
    recipe = load_recipe(own)
    assert (recipe.max_iters, recipe.crop_size, recipe.data_dir) == (50, 96, "data/mini")  # the rest: demo's
    own.write_text("base: nonesuch\n")
    with pytest.raises(RecipeError, match=f"{own}: base 'nonesuch' is not another shipped recipe"):
        load_recipe(own)
