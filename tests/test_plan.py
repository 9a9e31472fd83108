"""train/plan.py: seed rules by dataset size, the ImageNet-distance rule, image size, budget arithmetic."""

from __future__ import annotations

import json
import re

import pytest

from visiontune.train.plan import (
    FIXED_OVERHEAD_S,
    Candidate,
    Plan,
    candidates,
    choose_for_budget,
    make_plan,
    parse_duration,
    predict_seconds,
)
from visiontune.train.profile import DataProfile, SpeedProfile

CUTS = ["pooled", "blocks.6", "blocks.5", "blocks.4"]


def profile(n=500, gray=0.0, entropy=0.2, side=300, n_valid=100) -> DataProfile:
    return DataProfile(n, n_valid, 10, side, gray, entropy)


@pytest.mark.parametrize(
    "n,recipe,cut,finetune",
    [(500, "head", "pooled", 0), (9_999, "head", "pooled", 0), (10_000, "last-blocks", "blocks.5", 0),
     (25_000, "full", "pooled", 3)],
)
def test_recipe_follows_dataset_size(n, recipe, cut, finetune):
    plan = make_plan(profile(n), 224, CUTS)
    assert (plan.recipe, plan.cut, plan.finetune_epochs) == (recipe, cut, finetune)
    assert plan.why["recipe"]


@pytest.mark.parametrize("gray,entropy", [(1.0, 0.1), (0.0, 0.8)])
def test_data_far_from_imagenet_retrains_the_last_block(gray, entropy):
    plan = make_plan(profile(gray=gray, entropy=entropy), 224, CUTS)
    assert plan.recipe == "last-blocks" and plan.cut == "blocks.6" and "far from ImageNet" in plan.why["cut"]
    assert make_plan(profile(gray=gray, entropy=entropy), 224, ["pooled"]).cut == "pooled"  # no block cuts


def test_small_source_images_get_a_smaller_input():
    assert make_plan(profile(side=28), 224, CUTS).img_size == 112
    assert make_plan(profile(side=500), 224, CUTS).img_size == 224


def test_tiny_data_gets_smaller_batches():
    assert make_plan(profile(n=30), 224, CUTS).batch_size == 8
    assert make_plan(profile(n=2000), 224, CUTS).batch_size == 64


def test_overrides_win_and_are_marked(tmp_path):
    plan = make_plan(profile(), 224, CUTS, overrides={"epochs": 3, "img_size": 96, "finetune_epochs": 2, "lr": None})
    assert plan.epochs == 3 and plan.img_size == 96 and plan.why["img_size"] == "set by you"
    assert plan.finetune_epochs == 2 and plan.recipe == "full" and plan.unfreeze_groups == -1
    assert Plan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan  # what RunDir.write_plan stores
    with pytest.raises(ValueError, match="unknown plan setting"):
        make_plan(profile(), 224, CUTS, overrides={"nonsense": 1})
    with pytest.raises(ValueError, match="unknown cut"):
        make_plan(profile(), 224, CUTS, overrides={"cut": "blocks.99"})


@pytest.mark.parametrize("text,seconds", [("90s", 90), ("5m", 300), ("1.5h", 5400), ("120", 120), (45, 45)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds
    with pytest.raises(ValueError):
        parse_duration("soon")


SPEED = SpeedProfile(
    decode=0.001,
    trunk={"pooled": 0.004, "blocks.6": 0.0038, "blocks.5": 0.0035, "blocks.4": 0.003},
    tail_train={"pooled": 0.00001, "blocks.6": 0.0006, "blocks.5": 0.002, "blocks.4": 0.003},
    tail_eval={"pooled": 0.000005, "blocks.6": 0.0002, "blocks.5": 0.0007, "blocks.4": 0.001},
)


def test_predicted_seconds_is_trunk_over_views_plus_tail_epochs():
    data = profile(n=2000, n_valid=2000)
    c = Candidate("blocks.6", 2, 12)
    expected = FIXED_OVERHEAD_S + (2000 * 3 + 2000) * (0.001 + 0.0038) + 12 * (2000 * 0.0006 + 2000 * 0.0002)
    assert predict_seconds(c, data, SPEED) == pytest.approx(expected)


def test_budget_picks_the_most_thorough_recipe_that_fits():
    data = profile(n=2000, n_valid=2000)
    options = candidates(CUTS)
    costs = [predict_seconds(c, data, SPEED) for c in options]
    assert costs[0] == min(costs)
    for cost in costs:
        chosen, seconds, _ = choose_for_budget(cost + 0.01, data, SPEED, CUTS)
        most_thorough = max(i for i, c in enumerate(costs) if c <= cost + 0.01)  # list is ordered by accuracy
        assert chosen == options[most_thorough] and seconds == pytest.approx(costs[most_thorough])
    chosen, seconds, why = choose_for_budget(costs[0] - 0.5, data, SPEED, CUTS)
    assert chosen.cut == "pooled" and chosen.epochs < 30 and "below the cheapest full recipe" in why
    plan = make_plan(data, 224, CUTS, budget_s=costs[1] + 1, speed=SPEED)
    assert (plan.cut, plan.views) == ("blocks.6", 0) and plan.predicted_s == pytest.approx(costs[1], abs=0.1)


def test_an_impossible_budget_is_refused_before_training_with_the_smallest_feasible_one():
    data = profile(n=2000, n_valid=2000)
    with pytest.raises(ValueError) as err:
        make_plan(data, 224, CUTS, budget_s=10, speed=SPEED, spent_s=12.0)
    text = str(err.value)
    assert "cannot be met" in text and "Smallest feasible: --budget" in text and not re.search(r"-\d", text)
    feasible = int(text.split("Smallest feasible: --budget ")[1].split("s")[0])
    plan = make_plan(data, 224, CUTS, budget_s=feasible, speed=SPEED, spent_s=12.0)  # the advice works
    assert plan.epochs >= 1 and plan.predicted_s <= feasible


def test_caching_overlaps_decoding_with_the_trunk_for_the_plain_view():
    data = profile(n=1000, n_valid=0)
    slow_decode = SpeedProfile(0.01, {"pooled": 0.004}, {"pooled": 0.0}, {"pooled": 0.0})
    assert predict_seconds(Candidate("pooled", 0, 0), data, slow_decode) == pytest.approx(FIXED_OVERHEAD_S + 1000 * 0.01)
    assert predict_seconds(Candidate("pooled", 0, 0), data, slow_decode, lambda c: 10) == pytest.approx(FIXED_OVERHEAD_S + 0.1)


def test_on_a_gpu_a_budget_with_room_fine_tunes_the_whole_network():
    """The same budget on a fast device: once the most thorough cached recipe fits, the rest buys
    whole-network fine-tuning epochs (timed on the device), at most the size rule's three; none on a CPU."""
    data = profile(n=2000, n_valid=2000)
    fast = SpeedProfile(0.0001, {c: 0.0001 for c in CUTS}, {c: 0.00001 for c in CUTS}, {c: 0.00001 for c in CUTS},
                        full_forward_torch=0.0002)
    most = max(predict_seconds(c, data, fast) for c in candidates(CUTS))
    one_epoch = 2000 * (0.0001 + 3 * 0.0002) + 2000 * (0.0001 + 0.0002)
    plan = make_plan(data, 224, CUTS, budget_s=most + 2.5 * one_epoch, speed=fast, finetune_in_budget=True)
    assert (plan.recipe, plan.finetune_epochs, plan.unfreeze_groups) == ("full", 2, -1)
    assert "2 whole-network fine-tuning epochs" in plan.why["finetune_epochs"]
    assert plan.predicted_s == pytest.approx(most + 2 * one_epoch, abs=0.1)
    roomy = make_plan(data, 224, CUTS, budget_s=most + 100 * one_epoch, speed=fast, finetune_in_budget=True)
    assert roomy.finetune_epochs == 3
    assert make_plan(data, 224, CUTS, budget_s=most + 100 * one_epoch, speed=fast).finetune_epochs == 0  # CPU
    assert make_plan(data, 224, CUTS, budget_s=most + 0.5 * one_epoch, speed=fast, finetune_in_budget=True).finetune_epochs == 0
