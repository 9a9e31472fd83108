"""`--folds K`: K runs on a stratified K-fold under one parent run folder, and their ensemble."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from visiontune.classifier import Classifier
from visiontune.pipeline.prepare import prepare
from visiontune.pipeline.run import train_run
from visiontune.progress import console
from visiontune.runs import RunConfig, RunDir


def fit_folds(config: RunConfig, out: str | Path | None, runs_root: Path) -> Classifier:
    """K models on a stratified K-fold; each fold is a run under the parent run folder."""
    from visiontune.ensemble import Ensemble

    folds = config.folds
    parent = RunDir.create(out, Path(config.data).resolve().name or "data", runs_root)
    parent.write_config(config)
    members = []
    for k in range(folds):
        console.rule(f"fold {k + 1}/{folds}")
        prep = prepare(config, fold=(k, folds))
        run = RunDir.create(parent.path / f"fold-{k + 1}", "fold", runs_root)
        members.append(train_run(prep, run, config))
    summary: dict = {"folds": folds}
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "log_loss"):
        values = [float(m.metrics[key]) for m in members if key in m.metrics]
        summary[key] = values
        summary[f"{key}_mean"], summary[f"{key}_std"] = float(np.mean(values)), float(np.std(values))
    parent.write_json("folds.json", summary)
    console.print(
        f"[bold]{folds}-fold validation accuracy {summary['accuracy_mean']:.4f} ± {summary['accuracy_std']:.4f}[/]"
    )
    ensemble = Ensemble.from_members(members, run_dir=parent.path)
    ensemble.metrics = summary
    return ensemble
