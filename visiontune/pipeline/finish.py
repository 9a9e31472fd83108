"""After training: the logit adjustment folded into the classifier, the prior its probabilities assume, and
the target-domain evaluation of an adaptation run."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from visiontune import beyond
from visiontune.backbones.cuts import Tail
from visiontune.backbones.heads import output_layer
from visiontune.data.catalog import Catalog, labelled_like
from visiontune.pipeline.inputs import CachedInputs
from visiontune.pipeline.prepare import Prepared
from visiontune.pipeline.selection import Selection
from visiontune.progress import console
from visiontune.runs import RunConfig, RunDir
from visiontune.train.balance import class_prior, shift_bias
from visiontune.train.extra_methods import Candidate
from visiontune.train.plan import Plan


def apply_balance(model: torch.nn.Module, plan: Plan, y_train: np.ndarray, n_classes: int) -> None:
    """Fold the logit adjustment of imbalanced data into the trained classifier's biases (train/balance.py)."""
    if plan.balance == "logit-adjust" and plan.balance_tau:
        shift_bias(output_layer(model.get_classifier()), class_prior(y_train, n_classes), plan.balance_tau)


def effective_prior(plan: Plan, y_train: np.ndarray, n_classes: int) -> np.ndarray:
    """The class proportions the saved model's probabilities assume: the training prior, flattened by the
    logit adjustment to prior^(1 - tau) (tau = 1: uniform)."""
    prior = class_prior(y_train, n_classes)
    if plan.balance == "logit-adjust":
        prior = prior ** (1.0 - plan.balance_tau)
    return prior / prior.sum()


def extra_images(config: RunConfig) -> str | None:
    """The run's unlabelled (--unlabeled) or target-domain (--target) folder, if any."""
    return config.unlabeled or config.target


@dataclass
class Trained:
    """What training leaves for evaluation and saving: the inputs and targets the model trained on (without the
    selection images when a choice keeps them out), the selection images still needed (multi-label thresholds),
    the files that failed, the run's logger, and what an unlabelled/target-domain run adds: its chosen candidate, the domain
    picture before training and the source-only yardstick."""

    inputs: CachedInputs
    y_train: np.ndarray
    y_valid: np.ndarray
    fit_catalog: Catalog
    select: Selection | None
    skipped: list
    chosen: Candidate | None = None
    before: dict | None = None
    yardstick: beyond.SourceOnlyYardstick | None = None
    head_fit: dict = field(default_factory=dict)
    logger: Callable[[dict], None] | None = None  # the run's metrics.jsonl/TensorBoard logger (RunDir.logger)


def finish_beyond(prep: Prepared, config: RunConfig, run: RunDir, tail: Tail, trained: Trained, extra) -> dict:
    """After training: the target evaluation (the only read of target labels) and the domain picture in the
    features the classifier reads, the source as the method trained on it (:meth:`~visiontune.train.extra_methods.Candidate.features_seen`).
    The source-only yardstick (taken before training) scores the same run without adaptation on the labelled
    target images, with a warning when the method is more than a point below."""
    plan, summary = prep.plan, {"method": plan_method(prep.plan), "extra_images": len(extra.catalog)}
    if extra.key == "xt":
        source_rows, before = trained.inputs.train_views[0], trained.before
        after = beyond.domain_picture(*trained.chosen.features_seen(tail, source_rows, extra.views[0]), plan.seed)
        report = {"before": before, "after": after}
        if config.target_labels:
            catalog = labelled_like(config.target_labels, list(prep.source.classes))
            evaluate = functools.partial(beyond.evaluate_target, tail, catalog, prep.backbone, plan, list(prep.source.classes),
                                         config.cache_dir, config.workers)
            metrics = evaluate()
            report["target"] = {k: v for k, v in metrics.items() if k != "confusion_matrix_normalized"}
            summary["target_accuracy"] = metrics["accuracy"]
            console.print(f"[bold]target accuracy {metrics['accuracy']:.4f}[/] on {metrics['n']} labelled target images")
            if trained.yardstick is not None:
                base = trained.yardstick.score(tail, plan, trained.inputs.train_views, trained.y_train, trained.inputs.valid,
                                               trained.y_valid, prep.task, evaluate)["accuracy"]
                worse = metrics["accuracy"] < base - beyond.WORSE_THAN_SOURCE_ONLY
                report["source_only"] = {"accuracy": base, "method_minus_source_only": metrics["accuracy"] - base,
                                         "worse_than_not_adapting": worse}
                summary["source_only_target_accuracy"] = base
                console.print(f"source-only (this run's data and plan, no adaptation): target accuracy {base:.4f}")
                if worse:
                    console.print(f"[yellow]warning: --adapt {plan.adapt} is {100 * (base - metrics['accuracy']):.1f} points "
                                  f"below source-only on the labelled target images: try --adapt none, coral-cut or auto[/]")
        run.write_json("adaptation.json", report)
        summary["proxy_a_distance_before"], summary["proxy_a_distance_after"] = before["proxy_a_distance"], after["proxy_a_distance"]
    return {"beyond": summary, **({"target_accuracy": summary["target_accuracy"]} if "target_accuracy" in summary else {})}


def plan_method(plan: Plan) -> str:
    return plan.ssl or plan.adapt or "supervised"
