"""train/plan.py: the seed rules by dataset size, the image-size rule and overrides."""

from __future__ import annotations

import pytest

from visiontune.train.plan import Plan, make_plan


@pytest.mark.parametrize(
    "n,recipe,finetune,groups",
    [(500, "head", 0, 0), (9_999, "head", 0, 0), (10_000, "last-blocks", 2, 2), (25_000, "full", 3, -1)],
)
def test_recipe_follows_dataset_size(n, recipe, finetune, groups):
    plan = make_plan(n, 10, native_size=224)
    assert (plan.recipe, plan.finetune_epochs, plan.unfreeze_groups) == (recipe, finetune, groups)
    assert plan.why["recipe"]


def test_small_source_images_get_a_smaller_input():
    assert make_plan(100, 2, 224, median_side=28).img_size == 112
    assert make_plan(100, 2, 224, median_side=500).img_size == 224


def test_overrides_win_and_are_marked(tmp_path):
    plan = make_plan(100, 2, 224, overrides={"head_epochs": 3, "img_size": 96, "finetune_epochs": 2, "lr": None})
    assert plan.head_epochs == 3 and plan.img_size == 96 and plan.why["img_size"] == "set by you"
    assert plan.finetune_epochs == 2 and plan.recipe == "full" and plan.unfreeze_groups == -1
    plan.save(tmp_path / "plan.json")
    assert Plan.from_dict(__import__("json").loads((tmp_path / "plan.json").read_text())) == plan
    with pytest.raises(ValueError, match="unknown plan setting"):
        make_plan(100, 2, 224, overrides={"nonsense": 1})
