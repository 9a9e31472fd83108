"""Run directories: one folder per training run, and :class:`RunDir`, the only reader and writer of it.

``runs/<name>/``: ``config.yaml`` (the arguments: :class:`RunConfig`), ``plan.json`` (the final
:class:`~visiontune.train.plan.Plan`, written once), ``profile.json``, ``timings.json`` (caching's seconds
and processes), ``metrics.jsonl`` (one line per epoch/phase), ``split.json`` (the files and labels of each part: :class:`Split`), ``skipped.txt``
(files left out, with reasons), ``predictions.npz`` (validation probabilities), ``checkpoints/``,
``classifier/``, ``report.html``, ``tb/``.
A run never overwrites an existing non-empty folder: a user's earlier run is never lost silently. In a
distributed run rank 0 owns the folder; the other ranks hold a :meth:`RunDir.follower`, which writes nothing.
"""

from __future__ import annotations

import functools
import json
import platform
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import yaml

from visiontune.files import fault_point, make_folder, remove_stale_partials, write_error, write_text_whole, written_whole
from visiontune.backbones.registry import DEFAULT_ARCH
from visiontune.classifier import read_classifier_meta
from visiontune.data.catalog import Skipped
from visiontune.train.plan import Plan
from visiontune.version import __version__
from visiontune.errors import RunExistsError  # noqa: F401  (raised here; defined light for the CLI)


def _what_is_there(path: Path) -> str:
    """What an occupied --out holds, and the command that fits it."""
    if (path / "classifier" / "classifier.json").exists() or (path / "folds.json").exists():
        return (f"holds a finished run. Choose another --out (or leave it out: runs/<data>-<time>), or use this "
                f"one: visiontune show {path}")
    if (path / "config.yaml").exists():
        return f"holds an interrupted run. Continue it exactly with: visiontune train --resume {path}"
    return "holds other files, not a run. Choose another --out, or leave it out (runs/<data>-<time>)"


@dataclass
class RunConfig:
    """The arguments of a run (config.yaml): everything needed to rerun or resume it."""

    data: str
    labels: str | None = None
    arch: str = DEFAULT_ARCH
    weights: str = "default"
    seed: int = 0
    budget: str | float | None = None
    overrides: dict = field(default_factory=dict)  # plan settings given by the user (None-free)
    auto: list[str] = field(default_factory=list)  # settings given as "auto" (lr, batch_size)
    cache_dir: str | None = None
    workers: int = 1
    report: bool = True
    folds: int = 0
    unlabeled: str | None = None  # a folder of unlabelled images (semi-supervised learning)
    target: str | None = None  # a folder of target-domain images without labels (domain adaptation)
    target_labels: str | None = None  # labelled target images (class folders): read only to evaluate

    def to_yaml_dict(self) -> dict:
        config = asdict(self)
        config["data"] = str(Path(self.data).resolve())
        config["labels"] = str(self.labels) if self.labels else None
        config["cache_dir"] = str(self.cache_dir) if self.cache_dir else None
        return {**config, "visiontune": __version__, "torch": str(torch.__version__), "python": platform.python_version()}

    @classmethod
    def from_yaml_dict(cls, data: dict) -> RunConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class Split:
    """The exact files of each part, with their labels (and every tag of each image, multi-label)."""

    train: list[str]
    valid: list[str]
    classes: list[str]
    train_labels: list[int] = field(default_factory=list)
    valid_labels: list[int] = field(default_factory=list)
    train_tags: list[list[int]] | None = None
    valid_tags: list[list[int]] | None = None

    def targets(self, part: str) -> np.ndarray:
        """Class indices of `part`, or its multi-hot matrix when the split has tags."""
        tags = getattr(self, f"{part}_tags")
        if tags is None:
            return np.asarray(getattr(self, f"{part}_labels"), dtype=np.int64)
        matrix = np.zeros((len(tags), len(self.classes)), dtype=np.int64)
        for row, found in enumerate(tags):
            matrix[row, found] = 1
        return matrix


def owner_only(method):
    """A RunDir write that a follower (another rank of a distributed run) skips: the folder has one owner."""
    @functools.wraps(method)
    def write(self, *args, **kwargs):
        return method(self, *args, **kwargs) if self.writes else None

    return write


@dataclass
class RunDir:
    path: Path
    writes: bool = True  # False on the other ranks of a distributed run: rank 0 owns the folder

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
                raise RunExistsError(f"{path}: {_what_is_there(path)}; nothing was overwritten.")
        make_folder(path / "checkpoints")  # the first write: an unwritable --out stops here, with what to do
        return cls(path)

    @classmethod
    def follower(cls, path: str | Path) -> RunDir:
        """Rank 0's run folder as another rank of a distributed run sees it: read, never written."""
        return cls(Path(path), writes=False)

    @classmethod
    def open(cls, path: str | Path) -> RunDir:
        """An existing run folder (for --resume, report, show, export, ...)."""
        path = Path(path)
        if not (path / "config.yaml").exists():
            raise FileNotFoundError(f"{path}: not a run folder (no config.yaml); give the folder `train` created")
        (path / "checkpoints").mkdir(exist_ok=True)
        remove_stale_partials(path, recursive=True)  # what a killed process was writing when it died
        return cls(path)

    # --- paths of the parts other modules write whole (weights, figures, the report) -----------------
    @property
    def classifier_dir(self) -> Path:
        return self.path / "classifier"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def checkpoints_to_write(self) -> Path | None:
        """Where training saves checkpoints: the owner's checkpoints/, nowhere for a follower."""
        return self.checkpoints if self.writes else None

    @property
    def report_path(self) -> Path:
        return self.path / "report.html"

    @owner_only
    def write_report(self, page: str) -> Path:
        fault_point("report")
        return write_text_whole(self.report_path, page)

    @property
    def serve_token(self) -> Path:
        """Where `serve` keeps the bearer token it generated for this run (serve/auth.py; mode 600)."""
        return self.path / "serve.token"

    @classmethod
    def holding(cls, classifier: str | Path) -> RunDir:
        """The folder a classifier lives in: its run for `RUN` or `RUN/classifier`, else the classifier folder."""
        path = Path(classifier)
        if path.name == "classifier" and (path.parent / "config.yaml").exists():
            path = path.parent
        return cls(path)

    def file(self, name: str) -> Path:
        """The path of a run file written by another module (a figure, an export)."""
        return self.path / name

    # --- config.yaml, plan.json, profile.json ------------------------------------------------------
    @owner_only
    def write_config(self, config: RunConfig, **more) -> None:
        write_text_whole(self.path / "config.yaml", yaml.safe_dump({**config.to_yaml_dict(), **more}, sort_keys=False))

    def read_config(self) -> RunConfig:
        return RunConfig.from_yaml_dict(yaml.safe_load((self.path / "config.yaml").read_text()))

    def has_plan(self) -> bool:
        return (self.path / "plan.json").exists()

    @owner_only
    def write_plan(self, plan: Plan) -> None:
        write_text_whole(self.path / "plan.json", json.dumps(plan.to_dict(), indent=2))

    def read_plan(self) -> Plan:
        return Plan.from_dict(self.read_json("plan.json"))

    @owner_only
    def write_json(self, name: str, data) -> Path:
        """A JSON side file of the run (profile.json, lr_find.json, folds.json, interpretation.json)."""
        return write_text_whole(self.path / name, json.dumps(data, indent=2))

    def read_json(self, name: str, default=None):
        path = self.path / name
        if not path.exists():
            if default is not None:
                return default
            raise FileNotFoundError(f"{self.path}: no {name} (not a finished visiontune run?)")
        return json.loads(path.read_text())

    # --- metrics.jsonl ------------------------------------------------------------------------------
    def metrics_lines(self) -> int:
        path = self.path / "metrics.jsonl"
        return len(path.read_text().splitlines()) if path.exists() else 0

    @owner_only
    def truncate_metrics(self, lines: int) -> None:
        """Keep the first `lines` records: what the checkpoint being resumed had seen."""
        path = self.path / "metrics.jsonl"
        if path.exists():
            kept = path.read_text().splitlines()[:lines]
            write_text_whole(path, "".join(line + "\n" for line in kept))

    @owner_only
    def log_metrics(self, record: dict) -> None:
        """Append one JSON line to metrics.jsonl (flushed at once, so a killed run keeps its history)."""
        path = self.path / "metrics.jsonl"
        try:
            with path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
        except OSError as exc:
            raise (write_error(path, exc) or exc) from None

    def read_metrics(self) -> list[dict]:
        path = self.path / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []

    def logger(self) -> MetricsLogger:
        return MetricsLogger(self)  # a follower's logs nothing (log_metrics is the owner's; no TensorBoard)

    # --- skipped.txt, split.json, predictions.npz, classifier.json -----------------------------------
    @owner_only
    def write_skipped(self, skipped: list[Skipped]) -> None:
        lines = [f"{s.path}\t{s.reason}" for s in skipped]
        write_text_whole(self.path / "skipped.txt", "\n".join(lines) + ("\n" if lines else ""))

    @owner_only
    def write_split(self, split: Split) -> None:
        """The exact files (and labels, tags) of each part, so evaluation and reports reuse the same split."""
        data = {k: v for k, v in asdict(split).items() if v is not None}
        data["train"], data["valid"] = [str(p) for p in split.train], [str(p) for p in split.valid]
        write_text_whole(self.path / "split.json", json.dumps(data))

    def read_split(self) -> Split | None:
        """The run's split, or None for a run that stopped before it was written."""
        if not (self.path / "split.json").exists():
            return None
        data = self.read_json("split.json")
        names = {f.name for f in fields(Split)}
        return Split(**{"classes": [], **{k: v for k, v in data.items() if k in names}})

    @owner_only
    def save_predictions(self, positions: np.ndarray, probs: np.ndarray, labels: np.ndarray) -> None:
        """Validation probabilities by position in split.json's valid list (numbers only); `labels` are
        class indices, or a multi-hot [images, classes] matrix for multi-label runs."""
        with written_whole(self.path / "predictions.npz") as tmp:
            np.savez_compressed(tmp, positions=np.asarray(positions, dtype=np.int64),
                                probs=np.asarray(probs, dtype=np.float32), labels=np.asarray(labels, dtype=np.int64))

    def read_predictions(self) -> dict[str, np.ndarray] | None:
        path = self.path / "predictions.npz"
        if not path.exists():
            return None
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in ("positions", "probs", "labels")}

    def classifier_meta(self) -> dict:
        """classifier.json of the run's classifier, without loading its weights."""
        return read_classifier_meta(self.classifier_dir)

    # --- what a run registry reads (read-only: listing runs never writes into them) -----------------
    def is_run(self) -> bool:
        return (self.path / "config.yaml").is_file()

    def status(self) -> str:
        """finished (a classifier or a --folds summary was saved), interrupted (a checkpoint to resume
        from), or incomplete (stopped or failed before its first checkpoint)."""
        if (self.classifier_dir / "classifier.json").exists() or (self.path / "folds.json").exists():
            return "finished"
        if (self.checkpoints / "last.json").exists():
            return "interrupted"
        return "incomplete"

    def started(self) -> float:
        """When the run started (config.yaml is written first)."""
        return (self.path / "config.yaml").stat().st_mtime

    def read_config_dict(self) -> dict:
        """config.yaml as written, with the versions and weights hash the typed RunConfig leaves out."""
        return yaml.safe_load((self.path / "config.yaml").read_text()) or {}


class MetricsLogger:
    """Callable log of training records: metrics.jsonl, and TensorBoard scalars under ``tb/``.

    TensorBoard tags are ``<phase>/<metric>`` over the phase's optimizer step, so per-step evaluations
    (``--eval-every``) and per-epoch records share one axis.
    """

    def __init__(self, run: RunDir):
        self.run = run
        self.writer = None
        if not run.writes:
            return
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
