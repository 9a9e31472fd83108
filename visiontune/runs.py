"""Run directories: one folder per training run with everything needed to understand and rerun it.

``runs/<name>/``: ``config.yaml`` (the arguments), ``plan.json``, ``metrics.jsonl`` (one line per
epoch/phase), ``split.json`` (the files of each part), ``skipped.txt`` (files left out, with reasons),
``checkpoints/``, ``classifier/``.
A run never overwrites an existing non-empty folder: a user's earlier run is never lost silently.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from visiontune.data.catalog import Skipped


class RunExistsError(Exception):
    """The chosen run folder already holds a run."""


@dataclass
class RunDir:
    path: Path

    @classmethod
    def create(cls, out: str | Path | None, data_name: str, base: Path = Path("runs")) -> RunDir:
        """A new run folder: `out` if given (must be new or empty), else runs/<data>-<timestamp>."""
        if out is None:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            path = base / f"{data_name}-{stamp}"
            n = 1
            while path.exists():
                n += 1
                path = base / f"{data_name}-{stamp}-{n}"
        else:
            path = Path(out)
            if path.exists() and any(path.iterdir()):
                raise RunExistsError(
                    f"{path}: already holds a run; nothing was overwritten. Choose another --out "
                    "or delete the folder yourself."
                )
        (path / "checkpoints").mkdir(parents=True, exist_ok=True)
        return cls(path)

    @classmethod
    def open(cls, path: str | Path) -> RunDir:
        """An existing run folder (for --resume)."""
        path = Path(path)
        if not (path / "config.yaml").exists() or not (path / "plan.json").exists():
            raise FileNotFoundError(f"{path}: not a run folder (no config.yaml/plan.json); give the folder `train` created")
        (path / "checkpoints").mkdir(exist_ok=True)
        return cls(path)

    def read_config(self) -> dict:
        return yaml.safe_load((self.path / "config.yaml").read_text())

    def metrics_lines(self) -> int:
        path = self.path / "metrics.jsonl"
        return len(path.read_text().splitlines()) if path.exists() else 0

    def truncate_metrics(self, lines: int) -> None:
        """Keep the first `lines` records: what the checkpoint being resumed had seen."""
        path = self.path / "metrics.jsonl"
        if path.exists():
            kept = path.read_text().splitlines()[:lines]
            path.write_text("".join(line + "\n" for line in kept))

    def logger(self) -> MetricsLogger:
        return MetricsLogger(self)

    @property
    def classifier_dir(self) -> Path:
        return self.path / "classifier"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def write_config(self, config: dict) -> None:
        (self.path / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))

    def log_metrics(self, record: dict) -> None:
        """Append one JSON line to metrics.jsonl (flushed at once, so a killed run keeps its history)."""
        with (self.path / "metrics.jsonl").open("a") as handle:
            handle.write(json.dumps(record) + "\n")

    def write_skipped(self, skipped: list[Skipped]) -> None:
        lines = [f"{s.path}\t{s.reason}" for s in skipped]
        (self.path / "skipped.txt").write_text("\n".join(lines) + ("\n" if lines else ""))

    def write_split(
        self, parts: dict[str, list], labels: dict[str, list[int]] | None = None, classes: list[str] | None = None,
        tags: dict[str, list[list[int]]] | None = None,
    ) -> None:
        """The exact files (and labels; every tag of each image for multi-label data) of each part, so
        evaluation and reports reuse the same split."""
        data: dict = {k: [str(p) for p in v] for k, v in parts.items()}
        for part, values in (labels or {}).items():
            data[f"{part}_labels"] = [int(v) for v in values]
        for part, rows in (tags or {}).items():
            data[f"{part}_tags"] = [[int(t) for t in row] for row in rows]
        if classes is not None:
            data["classes"] = list(classes)
        (self.path / "split.json").write_text(json.dumps(data))


class MetricsLogger:
    """Callable log of training records: metrics.jsonl, and TensorBoard scalars under ``tb/``.

    TensorBoard tags are ``<phase>/<metric>`` over the phase's optimizer step, so per-step evaluations
    (``--eval-every``) and per-epoch records share one axis.
    """

    def __init__(self, run: RunDir):
        self.run = run
        self.writer = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run.path / "tb"))
        except ImportError:  # tensorboard is a dependency; a trimmed install still trains
            self.writer = None

    def __call__(self, record: dict) -> None:
        self.run.log_metrics(record)
        if self.writer is None or "step" not in record:
            return
        for key, value in record.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("step", "epoch"):
                self.writer.add_scalar(f"{record['phase']}/{key}", value, record["step"])
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def save_predictions(run_dir: Path, positions: np.ndarray, probs: np.ndarray, labels: np.ndarray) -> None:
    """Validation probabilities by position in split.json's valid list (predictions.npz: numbers only);
    `labels` are class indices, or a multi-hot [images, classes] matrix for multi-label runs."""
    np.savez_compressed(run_dir / "predictions.npz", positions=np.asarray(positions, dtype=np.int64),
                        probs=np.asarray(probs, dtype=np.float32), labels=np.asarray(labels, dtype=np.int64))
