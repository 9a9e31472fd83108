"""What is being learned, chosen once from the data: the one place that knows single- from multi-label.

A :class:`Task` owns everything that differs between kinds of target — the training targets of a
catalog, the loss, the output activation, the numbers validated each epoch, the final metrics and the
decisions saved with the classifier (multi-label thresholds), and which report a run gets. The rest of
visiontune asks the task instead of branching, so a new kind of run (later: semi-supervised or
domain-adaptive tasks that add unlabelled inputs) is one new class here, not edits in nine files.
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from visiontune.data.catalog import Catalog, DataError
from visiontune.errors import UsageError
from visiontune.evaluation.metrics import classification_metrics, multilabel_metrics, tune_thresholds
from visiontune.task.losses import Loss, class_weights, make_loss


class LossSettings(Protocol):
    """The plan's loss settings a task reads (the plan itself lives a layer up, in train/)."""

    loss: str
    label_smoothing: float
    focal_gamma: float
    class_weights: str
    sampler: str
    fbeta: float
    head: str
    balance: str


class Task:
    """Base class: one kind of prediction target. Subclasses register in :data:`TASKS` by `name`."""

    name: ClassVar[str]
    report: ClassVar[str]  # which report the run gets (report/html.py keys its section builders by this)
    tags: ClassVar[bool] = False  # predictions carry the list of classes decided for each image
    #: One class per image: the classes exclude each other (one softmax), so a class prior exists and can be
    #: shifted (logit adjustment, --prior), the probe head can compete, and unlabelled/target methods apply.
    exclusive: ClassVar[bool] = True
    #: Decisions (thresholds) are tuned after training, on images carved from the training data.
    tunes_decisions: ClassVar[bool] = False
    why: ClassVar[str]  # the plan's reason for this task
    output: ClassVar[str]  # what an exported graph outputs, in words (its metadata)

    def targets(self, catalog: Catalog) -> np.ndarray:
        """Per-image training targets, in catalog order."""
        raise NotImplementedError

    def activation(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits -> probabilities."""
        raise NotImplementedError

    def logits_of(self, probs: torch.Tensor) -> torch.Tensor:
        """Probabilities -> logits that :meth:`activation` turns back into them (an ensemble's combined
        probabilities travel through the classifier's one inference path as logits)."""
        raise NotImplementedError

    def exported_decisions(self, saved: dict, n_classes: int) -> dict:
        """The decisions saved with a classifier that an exported file must carry beside its graph."""
        return {}

    def criterion(self, settings: LossSettings, labels: np.ndarray, n_classes: int) -> Loss:
        """The training loss (targets may also be soft rows, from mixup/cutmix)."""
        raise NotImplementedError

    def validate(self, logits: torch.Tensor, targets: torch.Tensor) -> dict:
        """The numbers logged every epoch: at least `valid_loss` and `valid_accuracy`."""
        raise NotImplementedError

    def finish(self, targets: np.ndarray, probs: np.ndarray, classes: list[str], settings: LossSettings,
               tuning: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[dict, dict]:
        """(final metrics, decisions saved with the classifier) from validation probabilities; decisions
        (thresholds) are tuned on `tuning` = (targets, probabilities) of images carved from the training
        data, never on the validation images they are then scored on."""
        raise NotImplementedError

    def evaluate(self, targets: np.ndarray, probs: np.ndarray, classes: list[str], saved: dict) -> dict:
        """Metrics on new labelled data, with the decisions the classifier saved."""
        raise NotImplementedError

    def decide(self, probs: np.ndarray, classes: list[str], saved: dict) -> list[list[str]] | None:
        """The tags each row is given (multi-label); None where the top class is the answer."""
        return None

    def check(self, settings: LossSettings) -> None:
        """Refuse settings that make no sense for this task, with a message saying what to use."""

    def check_data(self, catalog: Catalog, where: str) -> None:
        """Refuse labelled data this task cannot be evaluated on, saying what to give instead."""

    def headline(self, metrics: dict) -> tuple[str, float]:
        """(name, value) of the one number a run is judged by."""
        return "accuracy", float(metrics["accuracy"])


class SingleLabel(Task):
    """One class per image: softmax + cross-entropy (or focal), accuracy and the full metrics table."""

    name = "single-label"
    report = "single-label"
    why = "one class per image"
    output = "class probabilities (softmax): the top class is the answer"

    def targets(self, catalog: Catalog) -> np.ndarray:
        return np.asarray(catalog.labels, dtype=np.int64)

    def activation(self, logits: torch.Tensor) -> torch.Tensor:
        return as_float32(logits).softmax(-1)

    def logits_of(self, probs: torch.Tensor) -> torch.Tensor:
        return probs.clamp_min(1e-12).log()

    def criterion(self, settings: LossSettings, labels: np.ndarray, n_classes: int) -> Loss:
        weight = class_weights(np.asarray(labels), n_classes, settings.class_weights)
        return make_loss(settings.loss, settings.label_smoothing, settings.focal_gamma, weight)

    def validate(self, logits: torch.Tensor, targets: torch.Tensor) -> dict:
        return {
            "valid_loss": float(F.cross_entropy(logits.float(), targets)),
            "valid_accuracy": float((logits.argmax(1) == targets).float().mean()),
        }

    def finish(self, targets, probs, classes, settings, tuning=None) -> tuple[dict, dict]:
        return classification_metrics(targets, probs, classes), {}

    def evaluate(self, targets, probs, classes, saved) -> dict:
        return classification_metrics(targets, probs, classes)


class MultiLabel(Task):
    """Several tags per image (labels CSV "a b c"): one sigmoid per class + BCE, per-class thresholds
    tuned for F-beta (the Planet competition's trick), its own report."""

    name = "multi-label"
    report = "multi-label"
    tags = True
    exclusive = False
    tunes_decisions = True
    why = "labels CSV has several space-separated tags per image: sigmoid + BCE, thresholds for F-beta"
    output = ("per-class probabilities (sigmoid, independent): a class is a tag of the image when its probability "
              "is at least its threshold (metadata 'thresholds')")

    def targets(self, catalog: Catalog) -> np.ndarray:
        return catalog.targets()

    def activation(self, logits: torch.Tensor) -> torch.Tensor:
        return as_float32(logits).sigmoid()

    def logits_of(self, probs: torch.Tensor) -> torch.Tensor:
        probs = probs.clamp(1e-7, 1 - 1e-7)
        return (probs / (1 - probs)).log()

    def exported_decisions(self, saved: dict, n_classes: int) -> dict:
        return {"thresholds": thresholds(saved, n_classes).tolist(), "fbeta": saved.get("fbeta", 2.0)}

    def criterion(self, settings: LossSettings, labels: np.ndarray, n_classes: int) -> Loss:
        return make_loss("bce", settings.label_smoothing)

    def validate(self, logits: torch.Tensor, targets: torch.Tensor) -> dict:
        """BCE, exact-match accuracy and sample-averaged F2 at threshold 0.5 (thresholds are tuned at the end)."""
        predicted = (logits > 0).float()
        tp = (predicted * targets).sum(1)
        precision = tp / predicted.sum(1).clamp_min(1)
        recall = tp / targets.sum(1).clamp_min(1)
        f2 = 5 * precision * recall / (4 * precision + recall).clamp_min(1e-12)
        return {
            "valid_loss": float(F.binary_cross_entropy_with_logits(logits.float(), targets)),
            "valid_accuracy": float((predicted == targets).all(1).float().mean()),
            "valid_f2": float(f2.mean()),
        }

    def finish(self, targets, probs, classes, settings, tuning=None) -> tuple[dict, dict]:
        tune_targets, tune_probs = tuning if tuning is not None else (targets, probs)
        thresholds = tune_thresholds(tune_targets, tune_probs, settings.fbeta)
        metrics = multilabel_metrics(targets, probs, thresholds, classes, settings.fbeta)
        at_half = multilabel_metrics(targets, probs, np.full(len(thresholds), 0.5), classes, settings.fbeta)
        key = f"f{settings.fbeta:g}_samples"
        metrics[f"{key}_at_0.5"] = at_half[key]
        return metrics, {"thresholds": [float(t) for t in thresholds], "fbeta": settings.fbeta}

    def evaluate(self, targets, probs, classes, saved) -> dict:
        return multilabel_metrics(targets, probs, thresholds(saved, len(classes)), classes, saved.get("fbeta", 2.0))

    def decide(self, probs: np.ndarray, classes: list[str], saved: dict) -> list[list[str]]:
        cut = thresholds(saved, len(classes))
        return [[c for c, p, t in zip(classes, row, cut) if p >= t] for row in probs]

    def check(self, settings: LossSettings) -> None:
        if settings.loss != "ce" or settings.class_weights != "none" or settings.sampler != "random":
            raise UsageError("multi-label data trains with binary cross-entropy: --loss focal, --class-weights and "
                             "--sampler balanced are for single-label data")
        if settings.balance != "none":
            raise UsageError("--balance shifts one softmax towards balanced accuracy; multi-label data tunes a threshold per class instead")
        if settings.head in ("logreg", "svm", "auto"):
            raise UsageError(f"--head {settings.head} fits one class per image; multi-label data trains --head linear or mlp")

    def check_data(self, catalog: Catalog, where: str) -> None:
        if not catalog.multi_label:
            raise DataError(f"{where}: a multi-label classifier needs a tags CSV (--labels) to evaluate on")

    def headline(self, metrics: dict) -> tuple[str, float]:
        key = next(k for k in metrics if k.startswith("f") and k.endswith("_samples"))
        return key, float(metrics[key])


def as_float32(logits: torch.Tensor) -> torch.Tensor:
    """float32 logits, cast only when they are not (bf16 autocast): a traced graph of float32 logits gets no
    Cast node, so an exported classifier's graph (and its int8 quantization) stays the plain model + activation."""
    return logits if logits.dtype == torch.float32 else logits.float()


def thresholds(saved: dict, n_classes: int) -> np.ndarray:
    """Each class's decision threshold saved with a classifier (tuned when trained; else 0.5)."""
    return np.asarray(saved.get("thresholds", [0.5] * n_classes), dtype=np.float64)


TASKS: dict[str, type[Task]] = {cls.name: cls for cls in (SingleLabel, MultiLabel)}


def task_for(catalog: Catalog) -> Task:
    """The task the data asks for: tags in the labels CSV make it multi-label."""
    return MultiLabel() if catalog.multi_label else SingleLabel()


def task_named(name: str | None, saved: dict[str, Any] | None = None) -> Task:
    """The task recorded with a run or classifier (older classifiers said `multi_label: true`)."""
    if name is None:
        name = MultiLabel.name if (saved or {}).get("multi_label") else SingleLabel.name
    if name not in TASKS:
        raise UsageError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    return TASKS[name]()
