"""The `visiontune` command: parses arguments, calls the API, prints with rich. No logic of its own."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from visiontune.version import __version__
from visiontune.backbones.providers import WeightsError
from visiontune.classifier import ArtifactError
from visiontune.data.catalog import DataError
from visiontune.data.images import ImageError
from visiontune.data.transforms import AUGMENTATIONS
from visiontune.inference.engines import ENGINES, default_engine
from visiontune.errors import UsageError
from visiontune.progress import console
from visiontune.runs import RunExistsError

USER_ERRORS = (DataError, WeightsError, ArtifactError, RunExistsError, FileNotFoundError, UsageError, ImageError)


def _metrics_tables(metrics: dict, classes: list[str]) -> list[Table]:
    """Summary, per-class and confusion-matrix tables for printed metrics."""
    summary = Table(title="validation")
    summary.add_column("metric")
    summary.add_column("value", justify="right")
    for key in ("n", "accuracy", "balanced_accuracy", "top5_accuracy", "macro_f1", "log_loss", "seconds"):
        if key in metrics:
            value = metrics[key]
            summary.add_row(key, f"{value:.4f}" if isinstance(value, float) and key != "seconds" else str(value))
    per_class = Table(title="per class")
    for column in ("class", "precision", "recall", "f1", "support"):
        per_class.add_column(column, justify="left" if column == "class" else "right")
    for name in classes:
        row = metrics["per_class"][name]
        per_class.add_row(name, f"{row['precision']:.3f}", f"{row['recall']:.3f}", f"{row['f1']:.3f}", str(row["support"]))
    tables = [summary, per_class]
    if "confusion_matrix" in metrics:
        confusion = Table(title="confusion matrix (rows: true, columns: predicted)")
        confusion.add_column("true \\ pred")
        for name in classes:
            confusion.add_column(name[:10], justify="right")
        for name, row in zip(classes, metrics["confusion_matrix"]):
            confusion.add_row(name, *[str(v) for v in row])
        tables.append(confusion)
    return tables


def _number_or_auto(kind):
    def parse(text: str):
        return "auto" if text == "auto" else kind(text)

    parse.__name__ = kind.__name__
    return parse


def cmd_train(args: argparse.Namespace) -> int:
    from visiontune import api

    if args.resume:
        clf = api.resume(args.resume)
    else:
        if not args.data:
            raise UsageError("train needs a data folder (or --resume runs/NAME)")
        settings = {name: getattr(args, name) for name in plan_flag_names() if getattr(args, name) is not None}
        clf = api.fit(
            args.data, arch=args.arch, weights=args.weights, out=args.out, labels=args.labels, budget=args.budget,
            seed=args.seed, cache_dir=args.cache_dir, workers=args.workers, folds=args.folds,
            valid_fraction=args.valid, report=args.report, unlabeled=args.unlabeled, target=args.target,
            target_labels=args.target_labels, **settings,
        )
    if "per_class" in clf.metrics:
        for table in _metrics_tables(clf.metrics, clf.classes):
            console.print(table)
    if "seconds" in clf.metrics:  # a --folds ensemble reports the folds' spread instead (printed above)
        key, value = clf.task.headline(clf.metrics)
        more = {k: clf.metrics[k] for k in ("mean_average_precision", "subset_accuracy") if k in clf.metrics}
        extra = " (" + ", ".join(f"{k} {v:.4f}" for k, v in more.items()) + ")" if more else ""
        console.print(f"[bold green]validation {key} {value:.4f}[/]{extra} in {clf.metrics['seconds']} s")
        console.print(f"metrics per epoch: {clf.run_dir / 'metrics.jsonl'}")
    console.print(f"run: {clf.run_dir}")
    return 0


def cmd_lr_find(args: argparse.Namespace) -> int:
    from visiontune import api

    found, png = api.find_lr(args.data, arch=args.arch, weights=args.weights, labels=args.labels, seed=args.seed,
                             out=args.out, cut=args.cut, img_size=args.img_size)
    console.print(f"suggested learning rate: [bold]{found.suggestion:.3g}[/] ({found.rule})")
    console.print(f"plot: {png}")
    print(f"{found.suggestion:.6g}")
    return 0


def cmd_augment_preview(args: argparse.Namespace) -> int:
    from visiontune import api

    out = api.augment_preview(args.data, args.out, args.aug, args.images, args.samples, args.img_size, args.seed)
    console.print(f"wrote {out}")
    return 0


def cmd_ensemble(args: argparse.Namespace) -> int:
    from visiontune import api

    result = api.ensemble_runs(args.runs, args.data, args.labels, args.method, args.out, args.batch_size)
    table = Table(title=f"ensemble ({args.method}) on {result['n']} images")
    for column in ("model", "accuracy", "log loss", "weight"):
        table.add_column(column)
    for member, weight in zip(result["members"], result["weights"]):
        table.add_row(member["run"], f"{member['accuracy']:.4f}", f"{member['log_loss']:.4f}", f"{weight:.3f}")
    table.add_row("[bold]ensemble[/]", f"[bold]{result['accuracy']:.4f}[/]", f"{result['log_loss']:.4f}", "")
    Console().print(table)
    corr = Table(title="correlation of the members' errors")
    corr.add_column("")
    for k in range(len(args.runs)):
        corr.add_column(str(k + 1), justify="right")
    for k, row in enumerate(result["error_correlation"]):
        corr.add_row(str(k + 1), *[f"{v:.2f}" for v in row])
    Console().print(corr)
    if args.out:
        console.print(f"saved the ensemble to {args.out} (load it like a run: visiontune predict {args.out} ...)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from visiontune import api

    result = api.export(args.run, args.format, args.out, args.quantize, args.parity_images)
    console.print(f"wrote {result.path} ({result.path.stat().st_size / 1e6:.1f} MB)")
    if result.parity:
        check = result.parity
        console.print(f"parity on {check['images']} real images: max |Δprob| = {check['max_abs_prob_diff']:.2e} "
                      f"(tolerance {check['tolerance']:.0e}) -> {'OK' if check['ok'] else 'FAILED'}")
        if not check["ok"]:
            return 1
    if result.quantized:
        console.print(f"wrote {result.quantized} ({result.quantized.stat().st_size / 1e6:.1f} MB)")
    if result.accuracy:
        fp32, int8 = result.accuracy["fp32"], result.accuracy["int8"]
        console.print(f"validation accuracy: fp32 {fp32:.4f} -> int8 {int8:.4f} ({int8 - fp32:+.4f})")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from visiontune import api

    if args.host not in ("127.0.0.1", "localhost", "::1"):
        console.print(f"[yellow]serving on {args.host}: reachable from other machines[/]")
    api.serve(args.run, args.host, args.port, args.max_upload_mb, args.max_pixels, args.max_concurrent)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from visiontune import api

    console.print(f"wrote {api.report(args.run)}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from visiontune import api

    if args.gradcam:
        console.print(f"wrote {api.show_gradcam(args.run, args.gradcam, args.out)}")
    elif args.feature_maps:
        console.print(f"wrote {api.show_feature_maps(args.run, args.feature_maps, args.layer, args.out)}")
    else:
        api.show(args.run, mistakes=args.mistakes, limit=args.limit)
    return 0


def cmd_hard_examples(args: argparse.Namespace) -> int:
    from visiontune import api

    found, out, total = api.hard_examples(args.run, args.out, args.margin, args.confident, args.batch_size)
    kinds = {k: sum(h.kind == k for h in found) for k in ("likely-label-error", "wrong", "barely-right")}
    console.print(f"{total} training images: " + ", ".join(f"{v} {k}" for k, v in kinds.items()))
    table = Table(title="hardest training images")
    for column in ("path", "label", "predicted", "p(label)", "kind"):
        table.add_column(column)
    for h in found[: args.limit]:
        table.add_row(h.path, h.label, h.predicted, f"{h.p_label:.3f}", h.kind)
    Console().print(table)
    console.print(f"wrote {out}; retrain with: visiontune train DATA --upweight {out}")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from visiontune import api

    report = api.doctor(args.data, labels=args.labels, arch=args.arch, weights=args.weights, seed=args.seed,
                        target=args.target)
    Console().print(report.table())
    for line in report.advice:
        console.print(f"[yellow]•[/] {line}")
    return 0 if report.healthy else 1


def cmd_plan(args: argparse.Namespace) -> int:
    from visiontune import api

    prep = api.plan(args.data, args.arch, args.weights, args.labels, args.seed, args.budget)
    profile = prep.data_profile
    console.print(
        f"{profile.n_train} train / {profile.n_valid} valid images, {profile.n_classes} classes ({prep.task.name}), "
        f"median side {profile.median_side}px, grayscale {profile.grayscale:.0%}, ImageNet-head entropy {profile.imagenet_entropy}"
    )
    Console().print(prep.plan.table())
    return 0





def cmd_predict(args: argparse.Namespace) -> int:
    from visiontune import api

    clf = api.load(args.classifier)
    options = {"batch_size": args.batch_size, "tta": args.tta, "engine": args.engine}
    if args.submission:
        out = args.csv or "submission.csv"
        done = api.submission(clf, args.submission, args.images, out, **options)
        console.print(f"wrote {out}: {done['rows']} rows ({done['format']} format of {args.submission}); "
                      f"{done['unreadable']} unreadable images got uniform probabilities")
        return 0
    skipped: list = []
    options.update(topk=args.topk, combine=args.combine, skipped=skipped)
    if args.json or args.csv:
        out = args.json or args.csv
        count = api.predict_to_file(clf, args.images, out, "json" if args.json else "csv", **options)
        console.print(f"wrote {count} predictions to {out}")
    else:
        table = Table(title=f"top-{args.topk} predictions")
        table.add_column("image")
        table.add_column("class")
        table.add_column("prob", justify="right")
        table.add_column("next")
        count = 0
        for p in api.iter_predictions(clf, args.images, **options):
            others = ", ".join(f"{c} {q:.2f}" for c, q in zip(p.classes[1:], p.probs[1:]))
            table.add_row(p.path, " ".join(p.tags) if p.tags is not None else p.label, f"{p.probs[0]:.3f}", others)
            count += 1
        Console().print(table)
    for s in skipped:
        console.print(f"[yellow]skipped[/] {s.path}: {s.reason}")
    return 0 if count else 1


def cmd_evaluate(args: argparse.Namespace) -> int:
    from visiontune import api

    clf = api.load(args.classifier)
    metrics = api.evaluate(clf, args.data, labels=args.labels, batch_size=args.batch_size, tta=args.tta, combine=args.combine)
    if args.json:
        Path(args.json).write_text(json.dumps(metrics, indent=2))
    for table in _metrics_tables(metrics, clf.classes):
        Console().print(table)
    for s in metrics["skipped"]:
        console.print(f"[yellow]skipped[/] {s['path']}: {s['reason']}")
    return 0


def cmd_split(args: argparse.Namespace) -> int:
    from visiontune import api

    result = api.split(args.src, args.dst, args.valid, args.seed)
    console.print(f"{args.dst}: {result['train']} train / {result['valid']} valid images ({result['links']})")
    return 0


def cmd_demo_data(args: argparse.Namespace) -> int:
    from visiontune import api

    console.print(f"wrote the {args.name} demo dataset to {api.demo_data(args.name, args.dest)}")
    return 0





def cmd_cache(args: argparse.Namespace) -> int:
    from visiontune import api

    if args.action == "build":
        if not args.data:
            raise DataError("cache build needs a data folder: visiontune cache build DATA")
        done = api.warm_cache(args.data, args.cache_dir, args.arch, args.weights, args.img_size, args.cut, args.views, args.engine)
        console.print(f"cached {done['images']} images x {done['views']} views at {done['cut']} under {done['root']}; "
                      f"{len(done['skipped'])} skipped")
        return 0
    if args.action == "clear":
        root, freed = api.clear_cache(args.cache_dir)
        console.print(f"freed {freed / 1e6:.1f} MB under {root}")
        return 0
    root, entries = api.cache_info(args.cache_dir)
    table = Table(title=f"feature cache: {root}")
    for column in ("arch", "size", "cut", "view", "images", "MB"):
        table.add_column(column)
    for entry in entries:
        key = entry["key"]
        table.add_row(
            key["arch"], str(key["preprocessing"]["input_size"]), key["cut"], key["view"], str(entry["rows"]),
            f"{entry['bytes'] / 1e6:.1f}",
        )
    Console().print(table)
    return 0


def _add_backbone(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", default="tf_efficientnet_lite0", help="timm architecture (default: %(default)s)")
    parser.add_argument("--weights", default="default", help="default (packaged) | PATH | none | hub (online)")


def _add_data_and_backbone(parser: argparse.ArgumentParser, optional: bool = False) -> None:
    """Arguments shared by `train` and `plan`: what to learn from, with which backbone, which seed."""
    parser.add_argument(
        "data", nargs="?" if optional else None, help="class folders, train/ + valid/ folders, or images named by --labels"
    )
    parser.add_argument("--labels", help="CSV with filename,label columns (paths relative to DATA)")
    _add_backbone(parser)
    parser.add_argument("--seed", type=int, default=0)


def _add_tta(parser: argparse.ArgumentParser) -> None:
    from visiontune.inference.tta import COMBINE, TTA_MODES

    parser.add_argument("--tta", choices=TTA_MODES, default="none", help="test-time augmentation views")
    parser.add_argument("--combine", choices=COMBINE, default="mean", help="how TTA probabilities are combined")


def plan_flag_names() -> list[str]:
    """Plan fields that are `train` flags (declared once, in train/plan.py, with a group)."""
    from dataclasses import fields

    from visiontune.train.plan import Plan

    return [f.name for f in fields(Plan) if f.metadata.get("group")]


def _add_playbook(train: argparse.ArgumentParser) -> None:
    """The recipe and playbook flags, generated from the Plan's field declarations (name, type, default,
    help, group): a new setting is one line in train/plan.py. None on the command line = the plan decides."""
    from dataclasses import MISSING, fields
    from typing import get_type_hints

    from visiontune.train.plan import Plan

    kinds = get_type_hints(Plan)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in fields(Plan):
        meta = f.metadata
        if not meta.get("group"):
            continue
        group = groups.setdefault(meta["group"], train.add_argument_group(meta["group"]))
        flag = "--" + (meta["flag"] or f.name).replace("_", "-")
        shown = f.default is not MISSING and f.default != ""  # recipe fields have none: the plan decides
        options: dict = {"dest": f.name, "help": meta["help"] + (f" (default: {f.default})" if shown else "")}
        kind = kinds[f.name]
        if kind is bool:
            options.update(action=argparse.BooleanOptionalAction, default=None)
        else:
            options["type"] = _number_or_auto(kind) if meta["auto"] else kind
        if meta["choices"]:
            options["choices"] = meta["choices"]
        if meta["metavar"]:
            options["metavar"] = meta["metavar"]
        group.add_argument(flag, **options)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="visiontune", description=__doc__)
    parser.add_argument("--version", action="version", version=__version__)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a classifier on a folder of labelled images")
    _add_data_and_backbone(train, optional=True)
    train.add_argument("--out", help="run folder (default: runs/<data>-<time>); never overwritten")
    train.add_argument("--resume", metavar="RUN", help="continue an interrupted run from its last checkpoint")
    train.add_argument("--folds", type=int, default=0, help="K-fold cross-validation: K models, mean ± std")
    train.add_argument("--budget", help="wall-clock target, e.g. 90s or 5m: the plan picks what fits")
    train.add_argument("--valid", type=float, help="validation fraction when DATA is not split (default 0.2)")
    train.add_argument("--cache-dir", help="feature cache (default: $VISIONTUNE_CACHE or ~/.cache/visiontune)")
    train.add_argument("--workers", type=int, default=1, help="image-decoding processes")
    train.add_argument("--report", action=argparse.BooleanOptionalAction, default=True, help="write report.html (default)")
    train.add_argument("--unlabeled", metavar="DIR", help="also learn from these unlabelled images (recursive; --ssl picks the method)")
    train.add_argument("--target", metavar="DIR", help="adapt to this domain's unlabelled images (--adapt picks the method)")
    train.add_argument("--target-labels", metavar="DIR", help="labelled target images (class folders): evaluation only, after training")
    _add_playbook(train)
    train.set_defaults(func=cmd_train)

    lr_find = sub.add_parser("lr-find", help="learning-rate range test on the cached phase: plot + suggestion")
    _add_data_and_backbone(lr_find)
    lr_find.add_argument("--out", default="lr_find.png", help="PNG of loss vs learning rate")
    lr_find.add_argument("--cut", help="pooled | blocks.K (default: plan)")
    lr_find.add_argument("--img-size", type=int)
    lr_find.set_defaults(func=cmd_lr_find)

    preview = sub.add_parser("augment-preview", help="image grid of an augmentation preset on your images")
    preview.add_argument("data", help="folder of images (searched recursively)")
    preview.add_argument("--aug", default="standard", choices=AUGMENTATIONS)
    preview.add_argument("--out", default="augment-preview.png")
    preview.add_argument("--images", type=int, default=4, help="rows: source images")
    preview.add_argument("--samples", type=int, default=6, help="columns: augmented samples per image")
    preview.add_argument("--img-size", type=int, default=224)
    preview.add_argument("--seed", type=int, default=0)
    preview.set_defaults(func=cmd_augment_preview)

    ens = sub.add_parser("ensemble", help="evaluate runs and their ensemble; error correlation; save it")
    ens.add_argument("runs", nargs="+", help="run folders (same classes and preprocessing)")
    ens.add_argument("--data", required=True, help="labelled images to evaluate on (class folders or split folder)")
    ens.add_argument("--labels", help="CSV with filename,label columns")
    ens.add_argument("--method", choices=["mean", "vote", "weighted"], default="mean")
    ens.add_argument("--out", help="save the ensemble here")
    ens.add_argument("--batch-size", type=int, default=64)
    ens.set_defaults(func=cmd_ensemble)

    export = sub.add_parser("export", help="ONNX or TorchScript file with a parity check (and int8 quantization)")
    export.add_argument("run")
    export.add_argument("--format", choices=["onnx", "torchscript"], default="onnx")
    export.add_argument("--out", help="file to write (default: RUN/export/model.onnx|.pt); never overwritten")
    export.add_argument("--quantize", choices=["int8"], help="also write a static int8 ONNX model")
    export.add_argument("--parity-images", type=int, default=64, help="validation images for the parity check")
    export.set_defaults(func=cmd_export)

    serve = sub.add_parser("serve", help="HTTP API + web page for a classifier (FastAPI + uvicorn)")
    serve.add_argument("run")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--max-upload-mb", type=int, default=10)
    serve.add_argument("--max-pixels", type=int, default=40_000_000)
    serve.add_argument("--max-concurrent", type=int, default=4)
    serve.set_defaults(func=cmd_serve)

    report = sub.add_parser("report", help="(re)build the run's self-contained report.html")
    report.add_argument("run")
    report.set_defaults(func=cmd_report)

    show = sub.add_parser("show", help="a run's mistakes in the terminal (inline images in iTerm2/kitty)")
    show.add_argument("run")
    show.add_argument("--mistakes", action="store_true", help="the most confident mistakes (default: summary)")
    show.add_argument("--limit", type=int, default=12)
    show.add_argument("--gradcam", nargs="+", metavar="IMAGE", help="write Grad-CAM overlays of these images (PNG)")
    show.add_argument("--feature-maps", metavar="IMAGE", help="write the feature maps of --layer for this image (PNG)")
    show.add_argument("--layer", default="blocks.2", help="module name for --feature-maps, e.g. conv_stem, blocks.4")
    show.add_argument("--out", help="PNG to write (default: inside the run folder)")
    show.set_defaults(func=cmd_show)

    hard = sub.add_parser("hard-examples", help="training images the model gets wrong or barely right -> CSV")
    hard.add_argument("run")
    hard.add_argument("--out", help="CSV path (default: RUN/hard_examples.csv)")
    hard.add_argument("--margin", type=float, default=0.2, help="barely right: top-2 margin below this")
    hard.add_argument("--confident", type=float, default=0.9, help="likely label error: wrong with p >= this")
    hard.add_argument("--batch-size", type=int, default=64)
    hard.add_argument("--limit", type=int, default=15)
    hard.set_defaults(func=cmd_hard_examples)

    doctor = sub.add_parser("doctor", help="check data and pipeline: balance, duplicates, mean/std, overfit a tiny subset")
    _add_data_and_backbone(doctor)
    doctor.add_argument("--target", metavar="DIR", help="also measure how far this domain's images are from DATA")
    doctor.set_defaults(func=cmd_doctor)

    plan = sub.add_parser("plan", help="print the plan for a data folder without training")
    _add_data_and_backbone(plan)
    plan.add_argument("--budget", help="also time a few batches and fit this wall-clock budget")
    plan.set_defaults(func=cmd_plan)

    predict = sub.add_parser("predict", help="top-k classes for images or folders")
    predict.add_argument("classifier", help="run folder or classifier folder")
    predict.add_argument("images", nargs="+", help="image files and/or folders")
    predict.add_argument("--csv", help="write predictions to this CSV instead of a table")
    predict.add_argument("--json", help="write predictions to this JSON file (array) instead of a table")
    predict.add_argument("--topk", type=int, default=3)
    predict.add_argument("--batch-size", type=int, default=32)
    predict.add_argument("--engine", choices=["auto", "torch", "onnx"], default="auto",
                         help="auto: onnxruntime when installed (fastest here)")
    predict.add_argument("--submission", metavar="SAMPLE_CSV", help="write a Kaggle submission in this sample's format")
    _add_tta(predict)
    predict.set_defaults(func=cmd_predict)

    evaluate = sub.add_parser("evaluate", help="accuracy, per-class P/R/F1 and confusion matrix on labelled data")
    evaluate.add_argument("classifier", help="run folder or classifier folder")
    evaluate.add_argument("data", help="class folders (or a split folder: its valid/ part)")
    evaluate.add_argument("--labels", help="CSV with filename,label columns")
    evaluate.add_argument("--json", help="also write the metrics to this JSON file")
    evaluate.add_argument("--batch-size", type=int, default=64)
    _add_tta(evaluate)
    evaluate.set_defaults(func=cmd_evaluate)

    split = sub.add_parser("split", help="make train/ and valid/ folders as links, without copying")
    split.add_argument("src", help="folder with one sub-folder per class")
    split.add_argument("dst", help="new folder for train/ and valid/")
    split.add_argument("--valid", type=float, default=0.2)
    split.add_argument("--seed", type=int, default=0)
    split.set_defaults(func=cmd_split)

    demo = sub.add_parser("demo-data", help="write an offline demo dataset as image folders")
    demo.add_argument("name", choices=["digits", "fashion-mnist"])
    demo.add_argument("dest")
    demo.set_defaults(func=cmd_demo_data)

    cache = sub.add_parser("cache", help="inspect or clear the feature cache")
    cache.add_argument("action", choices=["info", "clear", "build"])
    cache.add_argument("data", nargs="?", help="with build: the images to cache (recursively)")
    cache.add_argument("--cache-dir")
    _add_backbone(cache)
    cache.add_argument("--img-size", type=int)
    cache.add_argument("--cut", default="pooled")
    cache.add_argument("--views", type=int, default=0)
    cache.add_argument("--engine", choices=ENGINES, default=default_engine())
    cache.set_defaults(func=cmd_cache)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as err:
        console.print(f"[bold red]error:[/] {err}")
        return 2
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        return 130


if __name__ == "__main__":
    sys.exit(main())
