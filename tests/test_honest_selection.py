"""Issue I §1: no automatic choice is made on the validation images a run reports on.

The check a skeptic would run: poison the validation labels and train again. Every automatic option
(early stopping, the batch-size search, multi-label thresholds) must give bit-identical trained weights
and decisions, because each is chosen on images carved from the training data.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import visiontune as vt
from conftest import write_class_folders
from visiontune.task.kinds import MultiLabel


def split_folders(root):
    write_class_folders(root / "train", per_class=14, seed=0)
    write_class_folders(root / "valid", per_class=6, seed=1)
    return root


def poison(valid):
    """Rotate the validation class folders' names: every validation label becomes wrong."""
    names = sorted(p.name for p in valid.iterdir())
    for name in names:
        (valid / name).rename(valid / f"tmp-{name}")
    for old, new in zip(names, names[1:] + names[:1]):
        (valid / f"tmp-{old}").rename(valid / new)


@pytest.mark.parametrize("options", [{"early_stop": 2, "epochs": 8}, {"batch_size": "auto", "epochs": 3}],
                         ids=["early-stopping", "batch-size-auto"])
def test_poisoned_validation_labels_change_no_trained_weight(tmp_path, options):
    data = split_folders(tmp_path / "data")
    clean = vt.fit(data, out=tmp_path / "clean", img_size=64, report=False, seed=0, **options)
    poison(data / "valid")
    poisoned = vt.fit(data, out=tmp_path / "poisoned", img_size=64, report=False, seed=0, **options)

    assert poisoned.metrics["accuracy"] < clean.metrics["accuracy"]  # the poison reached the reported numbers
    a, b = clean.model.state_dict(), poisoned.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # ...and nothing that was trained
    plan = json.loads((tmp_path / "clean" / "plan.json").read_text())
    assert "carved from the training images" in plan["why"]["selection"]
    again = json.loads((tmp_path / "poisoned" / "plan.json").read_text())
    assert plan.pop("predicted_s") > 0 and again.pop("predicted_s") > 0  # a timing, not a choice
    assert plan == again


def test_multilabel_thresholds_are_tuned_on_the_selection_images_not_the_validation_ones():
    rng = np.random.default_rng(0)
    tune_targets = (rng.random((60, 3)) < 0.5).astype(np.float32)
    tune_probs = np.clip(tune_targets * 0.6 + rng.random((60, 3)) * 0.4, 0, 1)
    valid_targets = (rng.random((40, 3)) < 0.5).astype(np.float32)
    valid_probs = rng.random((40, 3))
    settings = vt.Plan(**{"recipe": "head", "cut": "pooled", "views": 0, "img_size": 64, "batch_size": 8, "epochs": 1,
                          "lr": 0.01, "head_dropout": 0.0, "weight_decay": 0.0, "finetune_epochs": 0,
                          "finetune_lr": 0.001, "unfreeze_groups": 0, "bn_freeze": True, "lr_mult": 10.0,
                          "engine": "torch", "valid_fraction": 0.2, "seed": 0})
    task = MultiLabel()
    _, decided = task.finish(valid_targets, valid_probs, ["a", "b", "c"], settings, (tune_targets, tune_probs))
    _, poisoned = task.finish(1 - valid_targets, valid_probs, ["a", "b", "c"], settings, (tune_targets, tune_probs))
    assert decided == poisoned
