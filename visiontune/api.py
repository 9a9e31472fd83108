"""The Python API used by notebooks and the CLI: `fit`, `load`, `predict`, `evaluate`.

`fit` is the whole playbook read top to bottom: catalog -> split -> backbone -> profile -> plan ->
cached trunk activations -> tail (classifier, or last blocks + classifier) -> (fine-tune) -> evaluate ->
save. Each step lives in its own module; this one only wires them.
"""

from __future__ import annotations

import json
import platform
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from visiontune.backbones.cuts import Tail, cut_points
from visiontune.backbones.registry import DEFAULT_ARCH, Backbone, create_backbone, resolve_arch
from visiontune.cache.features import cached_activations
from visiontune.cache.store import CachedRows, default_cache_root
from visiontune.classifier import Classifier, Prediction
from visiontune.data.catalog import (
    Catalog,
    DataError,
    Skipped,
    Source,
    catalog_from_csv,
    catalog_from_folders,
    discover,
)
from visiontune.data.split import split_catalog
from visiontune.evaluate.metrics import classification_metrics
from visiontune.progress import console
from visiontune.runs import RunDir
from visiontune.clock import seconds_since_process_start
from visiontune.engines import default_engine
from visiontune.train.loop import finetune, predict_cached, train_cached
from visiontune.train.plan import Plan, choose_img_size, epochs_for_remaining, make_plan, parse_duration
from visiontune.train.profile import DataProfile, SpeedProfile, profile_data, profile_speed


def seed_everything(seed: int) -> None:
    """Same seed, same numbers on CPU: python, numpy and torch generators, deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def _drop(catalog: Catalog, kept: np.ndarray) -> Catalog:
    return catalog.subset([int(i) for i in kept])


FINAL_OVERHEAD_S = 2.0  # final metrics and saving the classifier, measured ~1-2 s here


@dataclass
class Prepared:
    """Everything decided before training: data, split, backbone, measured profiles and the plan."""

    source: Source
    train: Catalog
    valid: Catalog
    backbone: Backbone
    data_profile: DataProfile
    speed: SpeedProfile | None
    plan: Plan
    overrides: dict


def prepare(
    data: str | Path,
    arch: str = DEFAULT_ARCH,
    weights: str = "default",
    labels: str | Path | None = None,
    seed: int = 0,
    budget: str | float | None = None,
    **overrides,
) -> Prepared:
    """Catalog and split the data, load the backbone, measure the data (and speed) and choose the plan."""
    seed_everything(seed)
    arch = resolve_arch(arch)  # typos in the name or the budget fail before any folder is scanned
    budget_s = parse_duration(budget)
    source = discover(data, labels=labels)
    if source.valid is None:
        fraction = overrides.get("valid_fraction") or 0.2
        train_cat, valid_cat = split_catalog(source.train, fraction, seed)
        if len(valid_cat) == 0:
            raise DataError(f"{data}: too few images to hold any out for validation; add images per class.")
    else:
        train_cat, valid_cat = source.train, source.valid
    backbone = create_backbone(arch, weights, num_classes=len(source.classes))
    native = backbone.preprocessing.input_size
    data_profile = profile_data(backbone, train_cat, len(valid_cat))
    size = overrides.get("img_size") or choose_img_size(data_profile, native)[0]
    backbone.preprocessing = backbone.preprocessing.with_size(size)
    cuts = cut_points(backbone.model)
    engine = overrides.get("engine") or default_engine()
    speed = profile_speed(backbone, train_cat, cuts[:4], engine) if budget_s is not None else None
    overrides = {**overrides, "seed": seed}
    plan = make_plan(data_profile, native, cuts, overrides, budget_s, speed, seconds_since_process_start())
    return Prepared(source, train_cat, valid_cat, backbone, data_profile, speed, plan, overrides)


def _cached_inputs(prep: Prepared, cache_root: Path, workers: int) -> tuple[list[CachedRows], CachedRows, list[Skipped]]:
    """Trunk activations at the plan's cut: train views (plain + augmented) and valid; drops failed files."""
    plan, backbone = prep.plan, prep.backbone
    common = {"cut": plan.cut, "seed": plan.seed, "batch_size": plan.batch_size, "workers": workers,
              "engine": plan.engine}
    skipped: list[Skipped] = []
    kept_va, x_va, bad = cached_activations(backbone, prep.valid.paths, cache_root, description="valid", **common)
    skipped += bad
    views = []
    kept_tr = None
    for view in [None, *range(plan.views)]:
        kept, x, bad = cached_activations(backbone, prep.train.paths, cache_root, view=view, description="train", **common)
        if view is None:
            skipped += bad
            kept_tr = kept
        views.append(x[np.isin(kept, kept_tr)])
    prep.train, prep.valid = _drop(prep.train, kept_tr), _drop(prep.valid, kept_va)
    return views, x_va, skipped


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
    cut: str | None = None,
    views: int | None = None,
    engine: str | None = None,
    budget: str | float | None = None,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    workers: int = 1,
    runs_root: str | Path = "runs",
) -> Classifier:
    """Train a classifier on a folder of labelled images and save it as a run; returns the classifier.

    `epochs` counts epochs on cached activations (head, or last blocks + head with `cut`), `unfreeze`
    fine-tuning epochs on images afterwards, `budget` ("90s", "5m") a wall-clock target the plan fits;
    None lets the plan decide from the data.
    """
    started = time.perf_counter()
    prep = prepare(
        data, arch, weights, labels, seed, budget, epochs=epochs, finetune_epochs=unfreeze, img_size=img_size,
        valid_fraction=valid_fraction, batch_size=batch_size, lr=lr, cut=cut, views=views, engine=engine,
    )
    plan, backbone, classes = prep.plan, prep.backbone, prep.source.classes
    run = RunDir.create(out, Path(data).resolve().name or "data", Path(runs_root))
    run.write_config(
        {
            "data": str(Path(data).resolve()),
            "labels": str(labels) if labels else None,
            "arch": backbone.arch,
            "weights": backbone.weights,
            "weights_id": backbone.weights_id,
            "seed": seed,
            "budget": budget,
            "overrides": {k: v for k, v in prep.overrides.items() if v is not None},
            "cache_dir": str(cache_dir) if cache_dir else None,
            "workers": workers,
            "visiontune": __import__("visiontune").__version__,
            "torch": str(torch.__version__),
            "python": platform.python_version(),
        }
    )
    plan.save(run.path / "plan.json")
    (run.path / "profile.json").write_text(
        json.dumps({"data": prep.data_profile.to_dict(), "speed": prep.speed.to_dict() if prep.speed else None}, indent=2)
    )
    console.print(
        f"[bold]{prep.source.layout}[/] layout: {len(prep.train)} train / {len(prep.valid)} valid images, "
        f"{len(classes)} classes; backbone {backbone.arch} ({backbone.weights})"
    )
    console.print(plan.table())

    cache_root = Path(cache_dir) if cache_dir else default_cache_root()
    train_views, x_va, skipped = _cached_inputs(prep, cache_root, workers)
    skipped = list(prep.source.skipped) + skipped
    run.write_skipped(skipped)
    run.write_split({"train": prep.train.paths, "valid": prep.valid.paths})
    if skipped:
        console.print(f"[yellow]skipped {len(skipped)} unusable files[/] (listed in {run.path / 'skipped.txt'})")

    if plan.budget_s is not None and prep.speed is not None and prep.overrides.get("epochs") is None:
        remaining = plan.budget_s - seconds_since_process_start() - FINAL_OVERHEAD_S
        planned = plan.epochs
        plan.epochs = epochs_for_remaining(remaining, planned, prep.data_profile, prep.speed, plan.cut)
        plan.why["epochs"] = f"re-fitted after caching to the {remaining:.0f}s left (planned {planned})"
        plan.save(run.path / "plan.json")
        console.print(f"budget: {remaining:.0f}s left after caching -> {plan.epochs} epochs (planned {planned})")
    model = backbone.model
    y_train, y_valid = np.array(prep.train.labels), np.array(prep.valid.labels)
    tail = Tail(model, plan.cut, dropout=plan.head_dropout)
    train_cached(tail, train_views, y_train, x_va, y_valid, plan, run.log_metrics, phase=f"cached:{plan.cut}")
    classifier = Classifier(model.eval(), backbone.arch, classes, backbone.preprocessing, run_dir=run.path)
    if plan.finetune_epochs > 0:
        finetune(
            model, prep.train, prep.valid, backbone.preprocessing, plan, run.log_metrics, run.checkpoints, skipped,
            workers,
        )
        run.write_skipped(skipped)
        kept, probs = classifier.probabilities(prep.valid.paths, plan.batch_size)
        y_valid = y_valid[kept]
    else:
        probs = predict_cached(tail, x_va).softmax(-1).numpy()
    metrics = classification_metrics(y_valid, probs, classes)
    metrics["seconds"] = round(time.perf_counter() - started, 1)
    metrics["wall_seconds"] = round(seconds_since_process_start(), 1)
    if plan.predicted_s is not None:
        metrics["predicted_seconds"] = plan.predicted_s
        console.print(
            f"time since start: predicted {plan.predicted_s:.1f}s, actual {metrics['wall_seconds']:.1f}s "
            f"(budget {plan.budget_s:.0f}s)"
        )
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
