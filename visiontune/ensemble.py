"""Ensembles of classifiers: the mean of their probabilities (cross-validation folds, several runs).

An :class:`Ensemble` is a :class:`~visiontune.classifier.Classifier` whose model combines its members'
probabilities (each through the members' task activation: softmax, or one sigmoid per class) with
:func:`combine` and hands them on as the logits the task's activation turns back into them, so
predict/evaluate/streaming/serve work unchanged. :func:`combine` is the one combine rule: `api.ensemble_runs`
scores an ensemble with it too. Members must share class names, task and preprocessing (true of the K
models of `--folds`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from visiontune.classifier import ArtifactError, Classifier
from visiontune.errors import UsageError
from visiontune.files import write_text_whole
from visiontune.task.kinds import SingleLabel, Task


METHODS = ("mean", "vote", "weighted")


def combine(probs: torch.Tensor, weights: torch.Tensor, method: str = "mean") -> torch.Tensor:
    """The members' probabilities [members, images, classes] -> the ensemble's [images, classes]: their
    weighted mean, or for `vote` the share of members voting for each class (ties broken by the mean)."""
    mean = (probs * weights.view(-1, 1, 1)).sum(0)
    if method == "vote":
        votes = torch.nn.functional.one_hot(probs.argmax(-1), probs.shape[-1]).float().mean(0)
        mean = (votes + 1e-3 * mean) / (1 + 1e-3)
    return mean


class MeanProbabilities(nn.Module):
    """The members' combined probability (:func:`combine`) as logits: the task's activation on top gives it back."""

    def __init__(self, models: list[nn.Module], weights: list[float] | None = None, method: str = "mean",
                 task: Task | None = None):
        super().__init__()
        self.members = nn.ModuleList(models)
        self.method = method
        self.task = task or SingleLabel()
        if method == "vote" and not self.task.exclusive:
            raise UsageError("--method vote counts one class per member; a multi-label ensemble combines by mean or weighted")
        w = torch.tensor(weights if weights is not None else [1.0] * len(models), dtype=torch.float32)
        self.register_buffer("weights", w / w.sum())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        probs = torch.stack([self.task.activation(m(images)) for m in self.members])
        return self.task.logits_of(combine(probs, self.weights, self.method))


class Ensemble(Classifier):
    """Mean-probability ensemble of classifiers with the same classes and preprocessing."""

    members: list[Classifier]

    def engine_forward(self, engine: str = "torch"):
        """Always PyTorch: the members' combination (voting especially) is not worth an ONNX export."""
        return super().engine_forward("torch")

    @classmethod
    def from_members(
        cls, members: list[Classifier], run_dir: Path | None = None, method: str = "mean", weights: list[float] | None = None
    ) -> Ensemble:
        first = members[0]
        for other in members[1:]:
            if other.classes != first.classes or other.preprocessing != first.preprocessing:
                raise ArtifactError("ensemble members must share class names and preprocessing (input size, mean/std)")
            if type(other.task) is not type(first.task):
                raise ArtifactError(f"ensemble members must share their task ({first.task.name} and {other.task.name} given)")
        ensemble = cls(
            MeanProbabilities([m.model for m in members], weights, method, first.task).eval(), first.arch, first.classes,
            first.preprocessing, run_dir=run_dir, extra=ensemble_decisions(members),
        )
        ensemble.members = members
        ensemble.method = method
        return ensemble

    def save_ensemble(self, directory: Path) -> Path:
        """ensemble.json naming the members' classifier folders (not copied), method, weights, metrics."""
        import json

        directory.mkdir(parents=True, exist_ok=True)
        if (directory / "ensemble.json").exists():
            raise ArtifactError(f"{directory}: already holds an ensemble; nothing was overwritten")
        members = [str(m.directory.resolve()) for m in self.members]
        write_text_whole(directory / "ensemble.json", json.dumps({
            "method": self.method, "weights": self.model.weights.tolist(), "members": members,
            "classes": self.classes, "metrics": self.metrics,
        }, indent=2))
        return directory

    @classmethod
    def load_ensemble(cls, directory: Path) -> Ensemble:
        import json

        meta = json.loads((directory / "ensemble.json").read_text())
        members = [Classifier.load(p) for p in meta["members"]]
        ensemble = cls.from_members(members, directory, meta["method"], meta["weights"])
        ensemble.metrics = meta.get("metrics", {})
        return ensemble

    @classmethod
    def load_folds(cls, run_dir: str | Path) -> Ensemble:
        """The ensemble of a `--folds` run: its fold-*/ runs' classifiers."""
        run_dir = Path(run_dir)
        folds = sorted(run_dir.glob("fold-*/classifier"), key=lambda p: int(p.parent.name.split("-")[1]))
        if not folds:
            raise ArtifactError(f"{run_dir}: no fold-*/classifier folders")
        ensemble = cls.from_members([Classifier.load(p) for p in folds], run_dir=run_dir)
        from visiontune.runs import RunDir

        ensemble.metrics = RunDir(run_dir).read_json("folds.json", default={})
        return ensemble


def ensemble_decisions(members: list[Classifier]) -> dict:
    """What the ensemble decides with: the members' task, and for a task that tunes thresholds, each
    class's mean threshold over the members (each member tuned its own on its own training images)."""
    task = members[0].task
    extra: dict = {"task": task.name}
    if task.tunes_decisions:
        decided = [task.exported_decisions(m.extra, len(m.classes)) for m in members]
        extra.update(decided[0])
        extra["thresholds"] = np.mean([d["thresholds"] for d in decided], axis=0).round(6).tolist()
    return extra
