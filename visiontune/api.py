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

from visiontune.version import __version__
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
from visiontune.data.split import kfold_indices, split_catalog
from visiontune.evaluate.metrics import classification_metrics
from visiontune.progress import console
from visiontune.runs import RunDir, save_predictions
from visiontune.clock import seconds_since_process_start
from visiontune.inference.engines import default_engine
from visiontune.errors import UsageError
from visiontune.train.phases import cached_phase, finetune, predict_cached, train_cached
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
REPORT_S = 4.0  # building report.html: 3.7 s measured on the Fashion-MNIST bench (2,000 validation images)


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
    fold: tuple[int, int] | None = None,
    reserve_s: float = 0.0,
    **overrides,
) -> Prepared:
    """Catalog and split the data (or take fold `fold` = (k, K) of a K-fold), load the backbone, measure
    the data (and speed) and choose the plan; a budget keeps `reserve_s` seconds for the work after
    training (the report)."""
    seed_everything(seed)
    arch = resolve_arch(arch)  # typos in the name or the budget fail before any folder is scanned
    budget_s = parse_duration(budget)
    source = discover(data, labels=labels)
    if fold is not None:
        everything = source.train if source.valid is None else _concat(source.train, source.valid)
        train_idx, valid_idx = kfold_indices(everything.labels, fold[1], fold[0], seed)
        train_cat, valid_cat = everything.subset(train_idx), everything.subset(valid_idx)
    elif source.valid is None:
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
    if train_cat.multi_label:
        overrides = {**overrides, "multi_label": True}
    plan = make_plan(data_profile, native, cuts, overrides, budget_s, speed, seconds_since_process_start() + reserve_s)
    if train_cat.multi_label:
        plan.why["multi_label"] = "labels CSV has several space-separated tags per image: sigmoid + BCE, thresholds for F-beta"
    return Prepared(source, train_cat, valid_cat, backbone, data_profile, speed, plan, overrides)


def _concat(a: Catalog, b: Catalog) -> Catalog:
    tags = a.tags + b.tags if a.tags is not None and b.tags is not None else None
    return Catalog(a.paths + b.paths, a.labels + b.labels, a.classes, a.skipped + b.skipped, tags=tags)


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
        kept, x, bad = cached_activations(
            backbone, prep.train.paths, cache_root, view=view, description="train", aug=plan.aug, **common
        )
        if view is None:
            skipped += bad
            kept_tr = kept
        views.append(x[np.isin(kept, kept_tr)])
    prep.train, prep.valid = _drop(prep.train, kept_tr), _drop(prep.valid, kept_va)
    return views, x_va, skipped


#: fit() arguments that are plan settings under another name.
ALIASES = {"unfreeze": "finetune_epochs"}


def fit(
    data: str | Path,
    arch: str = DEFAULT_ARCH,
    weights: str = "default",
    out: str | Path | None = None,
    labels: str | Path | None = None,
    budget: str | float | None = None,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    workers: int = 1,
    runs_root: str | Path = "runs",
    folds: int = 0,
    report: bool = True,
    **settings,
) -> Classifier:
    """Train a classifier on a folder of labelled images and save it as a run; returns the classifier.

    `settings` are plan settings (see :class:`~visiontune.train.plan.Plan`): e.g. `epochs` (on cached
    activations), `unfreeze` (fine-tuning epochs on images), `cut`, `views`, `lr` (a number or "auto":
    the LR finder), `batch_size` (a number or "auto"), `schedule`, `loss`, `label_smoothing`, `mixup`,
    `swa`, `ema`, `early_stop`, `aug`, ...; None lets the plan decide. `budget` ("90s", "5m") is a
    wall-clock target the plan fits. `folds=K` trains K models on a stratified K-fold and returns their
    mean-probability ensemble with the folds' mean and spread in `metrics`.
    """
    settings = {ALIASES.get(k, k): v for k, v in settings.items()}
    auto = {k for k in ("lr", "batch_size") if settings.get(k) == "auto"}
    for k in auto:
        settings[k] = None
    call = {"data": data, "arch": arch, "weights": weights, "labels": labels, "budget": budget, "seed": seed,
            "cache_dir": cache_dir, "workers": workers, "auto": sorted(auto), "report": report}
    if folds and folds > 1:
        return _fit_folds(call, settings, folds, out, Path(runs_root))
    prep = prepare(data, arch, weights, labels, seed, budget, reserve_s=REPORT_S if report else 0.0, **settings)
    run = RunDir.create(out, Path(data).resolve().name or "data", Path(runs_root))
    return _train(prep, run, call)


def resume(run_path: str | Path) -> Classifier:
    """Continue an interrupted run from its last checkpoint (same data, plan and seeds) to the same result
    as an uninterrupted run."""
    run = RunDir.open(run_path)
    config = run.read_config()
    if run.classifier_dir.exists():
        raise UsageError(f"{run.path}: this run already finished (classifier/ exists); nothing to resume.")
    settings = {k: v for k, v in config.get("overrides", {}).items() if k != "seed"}
    call = {k: config.get(k) for k in ("data", "arch", "weights", "labels", "budget", "seed", "cache_dir", "workers")}
    call["auto"] = []
    plan = Plan.from_dict(json.loads((run.path / "plan.json").read_text()))
    prep = prepare(call["data"], call["arch"], call["weights"], call["labels"], call["seed"], None, **settings)
    prep.plan = plan
    split = json.loads((run.path / "split.json").read_text()) if (run.path / "split.json").exists() else None
    return _train(prep, run, call, resuming=True, expected_split=split)


def _fit_folds(call: dict, settings: dict, folds: int, out: str | Path | None, runs_root: Path) -> Classifier:
    """K models on a stratified K-fold; each fold is a run under the parent run folder."""
    from visiontune.ensemble import Ensemble

    data = call["data"]
    parent = RunDir.create(out, Path(data).resolve().name or "data", runs_root)
    parent.write_config({**_config(call, {**settings, "folds": folds}), "folds": folds})
    members = []
    for k in range(folds):
        console.rule(f"fold {k + 1}/{folds}")
        prep = prepare(data, call["arch"], call["weights"], call["labels"], call["seed"], call["budget"], fold=(k, folds), **settings)
        run = RunDir.create(parent.path / f"fold-{k + 1}", "fold", runs_root)
        members.append(_train(prep, run, call))
    summary = {"folds": folds}
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "log_loss"):
        values = [float(m.metrics[key]) for m in members if key in m.metrics]
        summary[key] = values
        summary[f"{key}_mean"], summary[f"{key}_std"] = float(np.mean(values)), float(np.std(values))
    (parent.path / "folds.json").write_text(json.dumps(summary, indent=2))
    console.print(
        f"[bold]{folds}-fold validation accuracy {summary['accuracy_mean']:.4f} ± {summary['accuracy_std']:.4f}[/]"
    )
    ensemble = Ensemble.from_members(members, run_dir=parent.path)
    ensemble.metrics = summary
    return ensemble


def _config(call: dict, settings: dict) -> dict:
    return {
        "data": str(Path(call["data"]).resolve()),
        "labels": str(call["labels"]) if call["labels"] else None,
        "arch": call["arch"],
        "weights": call["weights"],
        "seed": call["seed"],
        "budget": call["budget"],
        "overrides": {k: v for k, v in settings.items() if v is not None},
        "auto": call.get("auto", []),
        "cache_dir": str(call["cache_dir"]) if call["cache_dir"] else None,
        "workers": call["workers"],
        "visiontune": __version__,
        "torch": str(torch.__version__),
        "python": platform.python_version(),
    }


def _choose_auto(prep: Prepared, call: dict, run: RunDir, train_views, x_va, y_train, y_valid) -> None:
    """`lr="auto"`: the LR finder on the cached phase; `batch_size="auto"`: the notes' search on it, capped
    by the memory-fit search when fine-tuning on images follows."""
    plan = prep.plan
    if "lr" in call["auto"]:
        from visiontune.report.plots import plot_lr_find
        from visiontune.train.lr_find import lr_find

        tail = Tail(prep.backbone.model, plan.cut, dropout=plan.head_dropout)
        found = lr_find(cached_phase(tail, train_views, y_train, x_va, y_valid, plan), plan)
        plot_lr_find(found, run.path / "lr_find.png")
        (run.path / "lr_find.json").write_text(json.dumps(found.to_dict()))
        plan.lr = round(found.suggestion, 6)
        plan.why["lr"] = f"LR finder ({found.rule}); plot: lr_find.png"
        console.print(f"LR finder suggests {plan.lr:.2g} ({found.rule})")
    if "batch_size" in call["auto"]:
        from visiontune.train.batch_size import memory_fit_batch_size, search_batch_size

        def score(size: int) -> float:
            trial = Plan.from_dict({**plan.to_dict(), "batch_size": size, "early_stop": 0, "checkpoint_every": 0, "eval_every": 0})
            tail = Tail(prep.backbone.model, plan.cut, dropout=plan.head_dropout)
            saved = {k: v.clone() for k, v in tail.model.state_dict().items()}
            history = train_cached(tail, train_views, y_train, x_va, y_valid, trial, lambda r: None, "batch-size")
            tail.model.load_state_dict(saved)
            return history[-1].get("valid_accuracy", 0.0)

        size, tried = search_batch_size(score, smallest=8, largest=max(8, len(y_train)))
        reason = "validation accuracy by batch size " + ", ".join(f"{b}: {v:.4f}" for b, v in sorted(tried.items()))
        if plan.finetune_epochs > 0:
            fit_size, memory = memory_fit_batch_size(prep.backbone.model, plan.img_size)
            if fit_size < size:
                size, reason = fit_size, reason + f"; capped to {fit_size} by memory ({memory['per_image_bytes'] / 1e6:.1f} MB/image)"
        plan.batch_size = size
        plan.why["batch_size"] = reason
        console.print(f"batch size {size} ({reason})")
    plan.save(run.path / "plan.json")


def _train(prep: Prepared, run: RunDir, call: dict, resuming: bool = False, expected_split: dict | None = None) -> Classifier:
    """Cache, train (cached phase, then fine-tuning), evaluate and save one run; resumable."""
    from visiontune.train.checkpoint import load_checkpoint

    started = time.perf_counter()
    plan, backbone, classes = prep.plan, prep.backbone, prep.source.classes
    data = call["data"]
    checkpoint = load_checkpoint(run.checkpoints) if resuming else None
    if not resuming:
        run.write_config(_config(call, {k: v for k, v in prep.overrides.items() if k != "seed"}))
        plan.save(run.path / "plan.json")
        (run.path / "profile.json").write_text(
            json.dumps({"data": prep.data_profile.to_dict(), "speed": prep.speed.to_dict() if prep.speed else None}, indent=2)
        )
    else:
        run.truncate_metrics(checkpoint.position.metrics_lines if checkpoint else 0)
        where = f"{checkpoint.position.phase} epoch {checkpoint.position.epoch + 1}, step {checkpoint.position.step}" if checkpoint else "the start"
        console.print(f"resuming {run.path} from {where}")
    console.print(
        f"[bold]{prep.source.layout}[/] layout: {len(prep.train)} train / {len(prep.valid)} valid images, "
        f"{len(classes)} classes; backbone {backbone.arch} ({backbone.weights})"
    )
    console.print(plan.table())

    cache_root = Path(call["cache_dir"]) if call["cache_dir"] else default_cache_root()
    train_views, x_va, skipped = _cached_inputs(prep, cache_root, call["workers"])
    skipped = list(prep.source.skipped) + skipped
    if expected_split is not None and [str(p) for p in prep.train.paths] != expected_split["train"]:
        raise DataError(f"{data}: the data changed since {run.path} started (its split.json differs); start a new run.")
    run.write_skipped(skipped)
    run.write_split({"train": prep.train.paths, "valid": prep.valid.paths},
                    {"train": prep.train.labels, "valid": prep.valid.labels}, classes,
                    {"train": prep.train.tags, "valid": prep.valid.tags} if prep.train.multi_label else None)
    if skipped:
        console.print(f"[yellow]skipped {len(skipped)} unusable files[/] (listed in {run.path / 'skipped.txt'})")

    y_train, y_valid = np.array(prep.train.labels), np.array(prep.valid.labels)
    if not resuming:
        _choose_auto(prep, call, run, train_views, x_va, y_train, y_valid)
    if plan.budget_s is not None and prep.speed is not None and prep.overrides.get("epochs") is None and not resuming:
        remaining = plan.budget_s - seconds_since_process_start() - FINAL_OVERHEAD_S - (REPORT_S if call.get("report", True) else 0)
        planned = plan.epochs
        plan.epochs = epochs_for_remaining(remaining, planned, prep.data_profile, prep.speed, plan.cut)
        plan.why["epochs"] = f"re-fitted after caching to the {remaining:.0f}s left (planned {planned})"
        plan.save(run.path / "plan.json")
        console.print(f"budget: {remaining:.0f}s left after caching -> {plan.epochs} epochs (planned {planned})")
    model = backbone.model
    tail = Tail(model, plan.cut, dropout=plan.head_dropout)
    in_finetune = checkpoint is not None and checkpoint.position.phase == "finetune"
    logger = run.logger()
    if not in_finetune:
        train_cached(
            tail, train_views, y_train, x_va, y_valid, plan, logger, phase=f"cached:{plan.cut}",
            checkpoints=run.checkpoints, resume=checkpoint, metrics_lines=run.metrics_lines,
            train_paths=prep.train.paths,
            train_targets=prep.train.targets() if plan.multi_label else None,
            valid_targets=prep.valid.targets() if plan.multi_label else None,
        )
    classifier = Classifier(model.eval(), backbone.arch, classes, backbone.preprocessing, run_dir=run.path)
    if plan.multi_label:
        classifier.extra["multi_label"] = True
    if plan.finetune_epochs > 0:
        finetune(
            model, prep.train, prep.valid, backbone.preprocessing, plan, logger, run.checkpoints, skipped,
            call["workers"], resume=checkpoint if in_finetune else None, metrics_lines=run.metrics_lines,
        )
        run.write_skipped(skipped)
        kept, probs = classifier.probabilities(prep.valid.paths, plan.batch_size)
        y_valid = y_valid[kept]
    else:
        kept = np.arange(len(y_valid))
        logits = predict_cached(tail, x_va)
        probs = (logits.sigmoid() if plan.multi_label else logits.softmax(-1)).numpy()
    if plan.multi_label:
        _finish_multilabel(classifier, prep, run, probs, kept, started)
        _report(run, call)
        return classifier
    metrics = classification_metrics(y_valid, probs, classes)
    metrics["seconds"] = round(time.perf_counter() - started, 1)
    metrics["wall_seconds"] = round(seconds_since_process_start(), 1)
    if plan.predicted_s is not None:
        metrics["predicted_seconds"] = plan.predicted_s
        console.print(
            f"time since start: predicted {plan.predicted_s:.1f}s, actual {metrics['wall_seconds']:.1f}s "
            f"(budget {plan.budget_s:.0f}s)"
        )
    logger({"phase": "final", **{k: v for k, v in metrics.items() if not isinstance(v, (dict, list))}})
    logger.close()
    classifier.metrics = {k: v for k, v in metrics.items() if k not in ("confusion_matrix", "confusion_matrix_normalized")}
    classifier.extra = {"weights": backbone.weights, "trained_on": str(Path(data).resolve())}
    classifier.save(run.classifier_dir)
    save_predictions(run.path, kept, probs, y_valid)
    _report(run, call)
    return classifier


def _report(run: RunDir, call: dict) -> None:
    """The run's report.html, unless the call said --no-report (time for it is reserved in a --budget)."""
    if call.get("report", True):
        from visiontune.report.html import build_report

        report_started = time.perf_counter()
        console.print(f"report: {build_report(run.path)} ({time.perf_counter() - report_started:.1f}s)")


def find_lr(
    data: str | Path, arch: str = DEFAULT_ARCH, weights: str = "default", labels: str | Path | None = None,
    seed: int = 0, out: str | Path = "lr_find.png", cache_dir: str | Path | None = None, workers: int = 1, **settings,
):
    """The LR range test on the cached phase the plan would train; returns (result, PNG path)."""
    from visiontune.report.plots import plot_lr_find
    from visiontune.train.lr_find import lr_find

    prep = prepare(data, arch, weights, labels, seed, None, **settings)
    cache_root = Path(cache_dir) if cache_dir else default_cache_root()
    train_views, x_va, _ = _cached_inputs(prep, cache_root, workers)
    plan = prep.plan
    tail = Tail(prep.backbone.model, plan.cut, dropout=plan.head_dropout)
    phase = cached_phase(tail, train_views, np.array(prep.train.labels), x_va, np.array(prep.valid.labels), plan)
    found = lr_find(phase, plan)
    return found, plot_lr_find(found, Path(out))


def _finish_multilabel(classifier: Classifier, prep: Prepared, run: RunDir, probs: np.ndarray, kept: np.ndarray, started: float) -> Classifier:
    """Multi-label end of a run: per-class thresholds tuned for F-beta on validation, metrics, save."""
    from visiontune.evaluate.metrics import multilabel_metrics, tune_thresholds

    plan = prep.plan
    targets = prep.valid.targets()[kept]
    thresholds = tune_thresholds(targets, probs, plan.fbeta)
    metrics = multilabel_metrics(targets, probs, thresholds, classifier.classes, plan.fbeta)
    at_half = multilabel_metrics(targets, probs, np.full(len(thresholds), 0.5), classifier.classes, plan.fbeta)
    key = f"f{plan.fbeta:g}_samples"
    metrics[f"{key}_at_0.5"] = at_half[key]
    metrics["seconds"] = round(time.perf_counter() - started, 1)
    console.print(f"multi-label: {key} {metrics[key]:.4f} with tuned thresholds ({at_half[key]:.4f} at 0.5)")
    run.log_metrics({"phase": "final", **{k: v for k, v in metrics.items() if not isinstance(v, (dict, list))}})
    classifier.metrics = metrics
    classifier.extra = {"weights": prep.backbone.weights, "trained_on": str(prep.source.root.resolve()), "multi_label": True,
                        "thresholds": [float(t) for t in thresholds], "fbeta": plan.fbeta}
    classifier.save(run.classifier_dir)
    save_predictions(run.path, kept, probs, targets)
    return classifier


def load(path: str | Path) -> Classifier:
    """Load a classifier from a run folder or a classifier folder (a --folds run: the folds' ensemble)."""
    if (Path(path) / "ensemble.json").exists():
        from visiontune.ensemble import Ensemble

        return Ensemble.load_ensemble(Path(path))
    if list(Path(path).glob("fold-*/classifier")) and not (Path(path) / "classifier").exists():
        from visiontune.ensemble import Ensemble

        return Ensemble.load_folds(path)
    return Classifier.load(path)


def predict(
    classifier: Classifier | str | Path, images: str | Path | Sequence[str | Path], topk: int = 5, tta: str = "none"
):
    """Top-k predictions; `classifier` may be a loaded Classifier or a run/classifier folder."""
    clf = classifier if isinstance(classifier, Classifier) else load(classifier)
    return clf.predict(images, topk=topk, tta=tta)


def ensemble_runs(
    runs: Sequence[str | Path], data: str | Path, labels: str | Path | None = None, method: str = "mean",
    out: str | Path | None = None, batch_size: int = 64, engine: str = "auto",
) -> dict:
    """Evaluate runs and their ensemble on labelled data: each member's accuracy, the pairwise correlation
    of their errors (low correlation = an ensemble gains), the ensemble's metrics; saves it with `out`.

    `weighted` sets each member's weight proportional to 1 / its log loss on `data` — fitted on the
    data it is evaluated on, so judge it on held-out data.
    """
    from visiontune.ensemble import METHODS, Ensemble

    if method not in METHODS:
        raise UsageError(f"unknown ensemble method {method!r}; choose from {', '.join(METHODS)}")
    members = [load(r) for r in runs]
    catalog = evaluation_catalog(data, members[0].classes, labels)
    y = np.array(catalog.labels)
    member_probs, kept_sets = [], []
    for member in members:
        kept, probs = member.probabilities(catalog.paths, batch_size, engine=engine)
        member_probs.append((kept, probs))
        kept_sets.append(set(kept.tolist()))
    common = np.array(sorted(set.intersection(*kept_sets)))
    aligned = [probs[np.searchsorted(kept, common)] for kept, probs in member_probs]
    yc = y[common]
    per_member = [classification_metrics(yc, p, members[0].classes) for p in aligned]
    errors = np.stack([p.argmax(1) != yc for p in aligned]).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        correlation = np.corrcoef(errors) if len(members) > 1 else np.ones((1, 1))
    weights = [1.0 / max(m["log_loss"], 1e-6) for m in per_member] if method == "weighted" else None
    combined = Ensemble.from_members(members, method=method, weights=weights)
    stacked = torch.from_numpy(np.stack(aligned)).float()
    w = combined.model.weights.view(-1, 1, 1)
    probs = (stacked * w).sum(0)
    if method == "vote":
        votes = torch.nn.functional.one_hot(stacked.argmax(-1), stacked.shape[-1]).float().mean(0)
        probs = (votes + 1e-3 * probs) / (1 + 1e-3)
    metrics = classification_metrics(yc, probs.numpy(), members[0].classes)
    result = {
        "members": [{"run": str(r), "accuracy": m["accuracy"], "log_loss": m["log_loss"]} for r, m in zip(runs, per_member)],
        "error_correlation": np.round(np.nan_to_num(correlation, nan=0.0), 4).tolist(),
        "method": method, "weights": combined.model.weights.tolist(),
        "accuracy": metrics["accuracy"], "log_loss": metrics["log_loss"], "n": int(len(yc)),
    }
    if out is not None:
        combined.metrics = {k: v for k, v in result.items() if k != "members"}
        combined.save_ensemble(Path(out))
    return result


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
        tags = [[index[catalog.classes[t]] for t in row] for row in catalog.tags] if catalog.tags is not None else None
        catalog = Catalog(catalog.paths, [index[catalog.classes[y]] for y in catalog.labels], classes, catalog.skipped, tags)
    if len(catalog) == 0:
        raise DataError(f"{data}: no usable labelled images to evaluate on.")
    return catalog


def evaluate(
    classifier: Classifier | str | Path, data: str | Path, labels: str | Path | None = None, batch_size: int = 64,
    tta: str = "none", combine: str = "mean", engine: str = "auto",
) -> dict:
    """Metrics of a classifier on labelled images (class folders, split folders or a labels CSV), with
    optional test-time augmentation (`tta`: flip | flips | 5crop | 10crop | scale)."""
    clf = classifier if isinstance(classifier, Classifier) else load(classifier)
    catalog = evaluation_catalog(data, clf.classes, labels)
    skipped: list[Skipped] = list(catalog.skipped)
    kept, probs = clf.probabilities(catalog.paths, batch_size, skipped=skipped, tta=tta, combine=combine, engine=engine)
    if clf.multi_label:
        from visiontune.evaluate.metrics import multilabel_metrics

        if not catalog.multi_label:
            raise DataError(f"{data}: a multi-label classifier needs a tags CSV (--labels) to evaluate on")
        metrics = multilabel_metrics(catalog.targets()[kept], probs, clf.thresholds, clf.classes, clf.extra.get("fbeta", 2.0))
        metrics["skipped"] = [{"path": s.path, "reason": s.reason} for s in skipped]
        return metrics
    metrics = classification_metrics(np.array(catalog.labels)[kept], probs, clf.classes)
    metrics["skipped"] = [{"path": s.path, "reason": s.reason} for s in skipped]
    return metrics


__all__ = ["fit", "resume", "find_lr", "ensemble_runs", "load", "predict", "evaluate", "Classifier", "Prediction", "Plan"]
