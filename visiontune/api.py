"""The Python API used by notebooks and the CLI: `fit`, `load`, `predict`, `evaluate`.

`fit` is the whole playbook read top to bottom: catalog -> split -> backbone -> plan -> cached features ->
head -> (fine-tune) -> evaluate -> save. Each step lives in its own module; this one only wires them.
"""

from __future__ import annotations

import platform
import random
import time
from collections.abc import Sequence
from pathlib import Path
from statistics import median

import numpy as np
import torch

from visiontune.backbones.cuts import POOLED, Tail
from visiontune.backbones.registry import DEFAULT_ARCH, create_backbone, resolve_arch
from visiontune.cache.features import cached_activations
from visiontune.cache.store import default_cache_root
from visiontune.classifier import Classifier, Prediction
from visiontune.data.catalog import Catalog, DataError, Skipped, catalog_from_csv, catalog_from_folders, discover
from visiontune.data.images import probe
from visiontune.data.split import split_catalog
from visiontune.evaluate.metrics import classification_metrics
from visiontune.progress import console
from visiontune.runs import RunDir
from visiontune.train.loop import finetune, predict_cached, train_cached
from visiontune.train.plan import Plan, make_plan


def seed_everything(seed: int) -> None:
    """Same seed, same numbers on CPU: python, numpy and torch generators, deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def _median_side(catalog: Catalog, sample: int = 64) -> int | None:
    """Median shorter side of a few images (from headers only), for the plan's image-size rule."""
    sides = []
    for path in catalog.paths[:: max(1, len(catalog) // sample)][:sample]:
        try:
            sides.append(min(probe(path)))
        except Exception:
            continue
    return int(median(sides)) if sides else None


def _drop(catalog: Catalog, kept: np.ndarray) -> Catalog:
    return catalog.subset([int(i) for i in kept])


def fit(
    data: str | Path,
    arch: str = DEFAULT_ARCH,
    weights: str = "default",
    out: str | Path | None = None,
    labels: str | Path | None = None,
    epochs: int | None = None,
    unfreeze: int | None = None,
    img_size: int | None = None,
    valid_fraction: float | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    workers: int = 1,
    runs_root: str | Path = "runs",
) -> Classifier:
    """Train a classifier on a folder of labelled images and save it as a run; returns the classifier.

    `epochs` is the number of head epochs (on cached features), `unfreeze` the number of fine-tuning
    epochs on images afterwards; None lets the plan decide from the data.
    """
    started = time.perf_counter()
    seed_everything(seed)
    arch = resolve_arch(arch)  # a typo in the name fails before any folder is scanned
    source = discover(data, labels=labels)
    if source.valid is None:
        fraction = 0.2 if valid_fraction is None else valid_fraction
        train_cat, valid_cat = split_catalog(source.train, fraction, seed)
        if len(valid_cat) == 0:
            raise DataError(f"{data}: too few images to hold any out for validation; add images per class.")
    else:
        train_cat, valid_cat = source.train, source.valid
    classes = source.classes

    overrides = {
        "head_epochs": epochs,
        "finetune_epochs": unfreeze,
        "img_size": img_size,
        "valid_fraction": valid_fraction,
        "batch_size": batch_size,
        "head_lr": lr,
        "seed": seed,
    }
    backbone = create_backbone(arch, weights, num_classes=len(classes), img_size=None)
    plan = make_plan(
        len(train_cat), len(classes), backbone.preprocessing.input_size, _median_side(train_cat), overrides
    )
    backbone.preprocessing = backbone.preprocessing.with_size(plan.img_size)

    run = RunDir.create(out, Path(data).resolve().name or "data", Path(runs_root))
    run.write_config(
        {
            "data": str(Path(data).resolve()),
            "labels": str(labels) if labels else None,
            "arch": backbone.arch,
            "weights": backbone.weights,
            "weights_id": backbone.weights_id,
            "seed": seed,
            "overrides": {k: v for k, v in overrides.items() if v is not None},
            "cache_dir": str(cache_dir) if cache_dir else None,
            "visiontune": __import__("visiontune").__version__,
            "torch": str(torch.__version__),
            "python": platform.python_version(),
        }
    )
    plan.save(run.path / "plan.json")
    console.print(
        f"[bold]{source.layout}[/] layout: {len(train_cat)} train / {len(valid_cat)} valid images, "
        f"{len(classes)} classes; backbone {backbone.arch} ({backbone.weights})"
    )
    console.print(plan.table())

    cache_root = Path(cache_dir) if cache_dir else default_cache_root()
    skipped: list[Skipped] = list(source.skipped)
    kept_tr, x_tr, bad = cached_activations(backbone, train_cat.paths, cache_root, batch_size=plan.batch_size, workers=workers, description="train")
    skipped += bad
    kept_va, x_va, bad = cached_activations(backbone, valid_cat.paths, cache_root, batch_size=plan.batch_size, workers=workers, description="valid")
    skipped += bad
    train_cat, valid_cat = _drop(train_cat, kept_tr), _drop(valid_cat, kept_va)
    run.write_skipped(skipped)
    run.write_split({"train": train_cat.paths, "valid": valid_cat.paths})
    if skipped:
        console.print(f"[yellow]skipped {len(skipped)} unusable files[/] (listed in {run.path / 'skipped.txt'})")

    model = backbone.model
    head = Tail(model, POOLED, dropout=plan.head_dropout)
    train_cached(head, [x_tr], np.array(train_cat.labels), x_va, np.array(valid_cat.labels), plan, run.log_metrics)
    if plan.finetune_epochs > 0:
        finetune(
            model, train_cat, valid_cat, backbone.preprocessing, plan, run.log_metrics, run.checkpoints, skipped,
            workers,
        )
        run.write_skipped(skipped)
    classifier = Classifier(model.eval(), backbone.arch, classes, backbone.preprocessing, run_dir=run.path)
    if plan.finetune_epochs > 0:
        kept, probs = classifier.probabilities(valid_cat.paths, plan.batch_size)
        y_valid = np.array(valid_cat.labels)[kept]
    else:
        probs = predict_cached(head, x_va).softmax(-1).numpy()
        y_valid = np.array(valid_cat.labels)
    metrics = classification_metrics(y_valid, probs, classes)
    metrics["seconds"] = round(time.perf_counter() - started, 1)
    run.log_metrics({"phase": "final", **{k: v for k, v in metrics.items() if not isinstance(v, (dict, list))}})
    classifier.metrics = {k: v for k, v in metrics.items() if k != "confusion_matrix"}
    classifier.extra = {"weights": backbone.weights, "trained_on": str(Path(data).resolve())}
    classifier.save(run.classifier_dir)
    return classifier


def load(path: str | Path) -> Classifier:
    """Load a classifier from a run folder or a classifier folder."""
    return Classifier.load(path)


def predict(classifier: Classifier | str | Path, images: str | Path | Sequence[str | Path], topk: int = 5):
    """Top-k predictions; `classifier` may be a loaded Classifier or a run/classifier folder."""
    clf = classifier if isinstance(classifier, Classifier) else load(classifier)
    return clf.predict(images, topk=topk)


def evaluation_catalog(data: str | Path, classes: list[str], labels: str | Path | None = None) -> Catalog:
    """The labelled images to evaluate on: the `valid/` part of a split folder, else the whole folder."""
    if labels:
        catalog = catalog_from_csv(Path(data), Path(labels))
    else:
        root = Path(data)
        valid_dir = next((root / n for n in ("valid", "val", "validation") if (root / n).is_dir()), None)
        catalog = catalog_from_folders(valid_dir or root, classes=classes)
    if catalog.classes != classes:
        unknown = sorted(set(catalog.classes) - set(classes))
        if unknown:
            raise DataError(f"{data}: classes the classifier does not know: {', '.join(unknown)}")
        index = {name: i for i, name in enumerate(classes)}
        catalog = Catalog(catalog.paths, [index[catalog.classes[y]] for y in catalog.labels], classes, catalog.skipped)
    if len(catalog) == 0:
        raise DataError(f"{data}: no usable labelled images to evaluate on.")
    return catalog


def evaluate(
    classifier: Classifier | str | Path, data: str | Path, labels: str | Path | None = None, batch_size: int = 64
) -> dict:
    """Metrics of a classifier on labelled images (class folders, split folders or a labels CSV)."""
    clf = classifier if isinstance(classifier, Classifier) else load(classifier)
    catalog = evaluation_catalog(data, clf.classes, labels)
    skipped: list[Skipped] = list(catalog.skipped)
    kept, probs = clf.probabilities(catalog.paths, batch_size, skipped=skipped)
    metrics = classification_metrics(np.array(catalog.labels)[kept], probs, clf.classes)
    metrics["skipped"] = [{"path": s.path, "reason": s.reason} for s in skipped]
    return metrics


__all__ = ["fit", "load", "predict", "evaluate", "Classifier", "Prediction", "Plan"]
