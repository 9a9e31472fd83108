"""Adding a training method is one file outside visiontune/: an Objective registered by name here trains
through `visiontune.fit` and the CLI, with the loop, checkpoints, logging and evaluation unchanged."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import visiontune as vt
from visiontune import cli
from visiontune.errors import UsageError
from visiontune.train.objectives import OBJECTIVES

FAST = {"img_size": 64, "epochs": 4, "report": False}


@vt.register_objective("test-smoothed-ce")
class SmoothedCrossEntropy(vt.Objective):
    """A label-smoothing variant of cross-entropy that counts its calls and logs how peaked its outputs are."""

    calls = 0

    def loss(self, module, batch):
        SmoothedCrossEntropy.calls += 1
        logits = module(batch["x"])
        peak = float(logits.detach().softmax(-1).max(-1).values.mean())
        return F.cross_entropy(logits, batch["y"], label_smoothing=0.3), {"peak": peak}


def _weights(run) -> dict[str, torch.Tensor]:
    return load_file(str(run / "classifier" / "model.safetensors"))


def test_a_registered_objective_trains_through_fit_and_the_cli(class_folders, tmp_path):
    SmoothedCrossEntropy.calls = 0
    clf = vt.fit(class_folders, out=tmp_path / "fit", objective="test-smoothed-ce", **FAST)
    calls_fit = SmoothedCrossEntropy.calls
    assert calls_fit > 0 and clf.metrics["accuracy"] >= 0.9
    plan = json.loads((tmp_path / "fit" / "plan.json").read_text())
    assert plan["objective"] == "test-smoothed-ce"
    records = [json.loads(line) for line in (tmp_path / "fit" / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["phase"].startswith("cached:") and r.get("kind") is None]
    assert len(epochs) == 4 and all(0 < r["train_peak"] <= 1 for r in epochs)  # the method's own logs

    code = cli.main(["train", str(class_folders), "--out", str(tmp_path / "cli"), "--objective", "test-smoothed-ce",
                     "--img-size", "64", "--epochs", "4", "--no-report"])
    assert code == 0 and SmoothedCrossEntropy.calls == 2 * calls_fit
    fit_weights, cli_weights = _weights(tmp_path / "fit"), _weights(tmp_path / "cli")
    assert all(torch.equal(fit_weights[k], cli_weights[k]) for k in fit_weights)  # same seed, same method

    vt.fit(class_folders, out=tmp_path / "default", **FAST)
    default = _weights(tmp_path / "default")
    assert not torch.equal(default["classifier.weight"], fit_weights["classifier.weight"])  # the method mattered


def test_an_unknown_objective_is_refused_with_the_registered_names(class_folders, tmp_path):
    with pytest.raises(UsageError, match="supervised"):
        vt.fit(class_folders, out=tmp_path / "run", objective="no-such-method", **FAST)
    assert "test-smoothed-ce" in OBJECTIVES and "supervised" in OBJECTIVES
