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


class MeanProbabilities(nn.Module):
    """Log of the members' mean probability: a softmax on top gives the mean back."""

    def __init__(self, models: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(models)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        probs = torch.stack([m(images).softmax(-1) for m in self.members]).mean(0)
        return probs.clamp_min(1e-12).log()


class Ensemble(Classifier):
    """Mean-probability ensemble of classifiers with the same classes and preprocessing."""

    members: list[Classifier]

    @classmethod
    def from_members(cls, members: list[Classifier], run_dir: Path | None = None) -> Ensemble:
        first = members[0]
        for other in members[1:]:
            if other.classes != first.classes or other.preprocessing != first.preprocessing:
                raise ArtifactError("ensemble members must share class names and preprocessing")
        ensemble = cls(
            MeanProbabilities([m.model for m in members]).eval(), first.arch, first.classes, first.preprocessing,
            run_dir=run_dir,
        )
        ensemble.members = members
        return ensemble

    @classmethod
    def load_folds(cls, run_dir: str | Path) -> Ensemble:
        """The ensemble of a `--folds` run: its fold-*/ runs' classifiers."""
        run_dir = Path(run_dir)
        folds = sorted(run_dir.glob("fold-*/classifier"), key=lambda p: int(p.parent.name.split("-")[1]))
        if not folds:
            raise ArtifactError(f"{run_dir}: no fold-*/classifier folders")
        ensemble = cls.from_members([Classifier.load(p) for p in folds], run_dir=run_dir)
        import json

        summary = run_dir / "folds.json"
        ensemble.metrics = json.loads(summary.read_text()) if summary.exists() else {}
        return ensemble
