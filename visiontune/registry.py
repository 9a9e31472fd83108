"""The run registry: every run under a folder as one row, and two runs side by side.

Runs stay plain folders (copy, archive, re-evaluate them anywhere); this module only reads them, through
:class:`~visiontune.runs.RunDir`, and never writes into them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from visiontune.runs import RunDir

HEADLINE_KEYS = ("accuracy", "balanced_accuracy", "macro_f1", "log_loss", "f2_samples", "accuracy_mean")


@dataclass
class RunRow:
    """One run as the registry lists it."""

    path: Path
    started: str
    data: str
    backbone: str
    recipe: str
    metric: str
    wall_s: float | None
    status: str


def find_runs(root: str | Path = "runs") -> list[RunDir]:
    """Run folders directly under `root` (and `root` itself if it is one), oldest first; folds of a
    `--folds` run stay inside their parent's row."""
    root = Path(root)
    candidates = [root] + sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    runs = [RunDir(p) for p in candidates if RunDir(p).is_run()]
    return sorted(runs, key=lambda run: run.started())


def _plan_dict(run: RunDir) -> dict:
    return run.read_plan().to_dict() if run.has_plan() else {}


def _metrics(run: RunDir) -> dict:
    if run.file("folds.json").exists():
        folds = run.read_json("folds.json", {})
        return {k: v for k, v in folds.items() if isinstance(v, (int, float))}
    if (run.classifier_dir / "classifier.json").exists():
        return {k: v for k, v in run.classifier_meta().get("metrics", {}).items() if isinstance(v, (int, float))}
    return {}


def run_row(run: RunDir) -> RunRow:
    config, plan, metrics = run.read_config_dict(), _plan_dict(run), _metrics(run)
    key = next((k for k in HEADLINE_KEYS if k in metrics), None)
    recipe = f"{plan.get('recipe', '?')} ({plan.get('cut', '?')}, {plan.get('epochs', '?')} ep" + (
        f", +{plan['finetune_epochs']} ft)" if plan.get("finetune_epochs") else ")") if plan else "-"
    return RunRow(
        path=run.path, started=time.strftime("%Y-%m-%d %H:%M", time.localtime(run.started())),
        data=Path(str(config.get("data", "?"))).name, backbone=str(config.get("arch", "?")), recipe=recipe,
        metric=f"{key} {metrics[key]:.4f}" if key else "-", wall_s=metrics.get("wall_seconds"), status=run.status(),
    )


def list_runs(root: str | Path = "runs") -> list[RunRow]:
    return [run_row(run) for run in find_runs(root)]


def _flat(prefix: str, data: dict) -> dict[str, object]:
    return {f"{prefix}.{k}": v for k, v in data.items() if k != "why" and not isinstance(v, (dict, list))}


def compare_runs(a: str | Path, b: str | Path) -> list[tuple[str, object, object]]:
    """(setting or metric, value in A, value in B) for everything that differs between two runs: config,
    plan and final metrics; the headline metrics always appear."""
    rows = []
    sides = []
    for path in (a, b):
        run = RunDir(Path(path))
        if not run.is_run():
            raise FileNotFoundError(f"{path}: not a run folder (no config.yaml); give a folder `train` created")
        config = {k: v for k, v in run.read_config_dict().items() if k not in ("overrides", "auto")}
        sides.append({**_flat("config", config), **_flat("config.overrides", run.read_config_dict().get("overrides") or {}),
                      **_flat("plan", _plan_dict(run)), **_flat("metrics", _metrics(run)), "status": run.status()})
    for key in sorted(set(sides[0]) | set(sides[1])):
        left, right = sides[0].get(key, "-"), sides[1].get(key, "-")
        headline = key.startswith("metrics.") and key.split(".", 1)[1] in HEADLINE_KEYS
        if left != right or headline:
            rows.append((key, left, right))
    return rows
