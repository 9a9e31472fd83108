"""Ensembles of classifiers: the mean of their probabilities (cross-validation folds, several runs).

An :class:`Ensemble` is a :class:`~visiontune.classifier.Classifier` whose model averages its members'
softmax outputs, so predict/evaluate/streaming work unchanged. Members must share class names and
preprocessing (true of the K models of `--folds`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from visiontune.classifier import ArtifactError, Classifier
from visiontune.files import write_text_whole


METHODS = ("mean", "vote", "weighted")


class MeanProbabilities(nn.Module):
    """Log of the members' combined probability (a softmax on top gives it back): the (weighted) mean
    of their probabilities, or for `vote` the share of members voting for each class (ties broken by
    the mean probability)."""

    def __init__(self, models: list[nn.Module], weights: list[float] | None = None, method: str = "mean"):
        super().__init__()
        self.members = nn.ModuleList(models)
        self.method = method
        w = torch.tensor(weights if weights is not None else [1.0] * len(models), dtype=torch.float32)
        self.register_buffer("weights", w / w.sum())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        probs = torch.stack([m(images).float().softmax(-1) for m in self.members])
        mean = (probs * self.weights.view(-1, 1, 1)).sum(0)
        if self.method == "vote":
            votes = torch.nn.functional.one_hot(probs.argmax(-1), probs.shape[-1]).float().mean(0)
            mean = (votes + 1e-3 * mean) / (1 + 1e-3)
        return mean.clamp_min(1e-12).log()


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
        ensemble = cls(
            MeanProbabilities([m.model for m in members], weights, method).eval(), first.arch, first.classes,
            first.preprocessing, run_dir=run_dir,
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
