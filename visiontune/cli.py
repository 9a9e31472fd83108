"""The `visiontune` command: parses arguments, calls the API, prints with rich. No logic of its own."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from visiontune.version import __version__
from visiontune.backbones.providers import WeightsError
from visiontune.classifier import ArtifactError
from visiontune.data.catalog import DataError
from visiontune.data.images import ImageError, is_image_name
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


#: `train` flags that are plan settings, passed through to fit() when given.
PLAN_FLAGS = (
    "epochs", "unfreeze", "img_size", "batch_size", "lr", "lr_mult", "cut", "views", "engine", "optimizer",
    "weight_decay", "schedule", "warmup_epochs", "sgdr_cycle", "sgdr_mult", "loss", "label_smoothing",
    "focal_gamma", "class_weights", "sampler", "aug", "mixup", "cutmix", "swa", "swa_start", "swa_lr", "ema",
    "early_stop", "monitor", "eval_every", "checkpoint_every", "amp", "compile", "freeze_to", "upweight",
    "upweight_factor", "fbeta", "gradual", "bn_freeze",
    "head_dropout",
)


def _number_or_auto(kind):
    def parse(text: str):
        return "auto" if text == "auto" else kind(text)

    parse.__name__ = kind.__name__
    return parse


def cmd_train(args: argparse.Namespace) -> int:
    from visiontune.api import fit, resume

    if args.resume:
        clf = resume(args.resume)
    else:
        if not args.data:
            raise UsageError("train needs a data folder (or --resume runs/NAME)")
        settings = {name: getattr(args, name) for name in PLAN_FLAGS if getattr(args, name) is not None}
        clf = fit(
            args.data, arch=args.arch, weights=args.weights, out=args.out, labels=args.labels, budget=args.budget,
            seed=args.seed, cache_dir=args.cache_dir, workers=args.workers, folds=args.folds,
            valid_fraction=args.valid, report=args.report, **settings,
        )
    if clf.multi_label:
        key = next(k for k in clf.metrics if k.startswith("f") and k.endswith("_samples"))
        console.print(f"[bold green]multi-label {key} {clf.metrics[key]:.4f}[/] (mAP {clf.metrics['mean_average_precision']:.4f}, "
                      f"subset accuracy {clf.metrics['subset_accuracy']:.4f}) in {clf.metrics['seconds']} s")
    elif "per_class" in clf.metrics:
        for table in _metrics_tables(clf.metrics, clf.classes):
            console.print(table)
        console.print(f"[bold green]validation accuracy {clf.metrics['accuracy']:.4f}[/] in {clf.metrics['seconds']} s")
        console.print(f"metrics per epoch: {clf.run_dir / 'metrics.jsonl'}")
    console.print(f"run: {clf.run_dir}")
    return 0


def cmd_lr_find(args: argparse.Namespace) -> int:
    from visiontune.api import find_lr

    found, png = find_lr(args.data, arch=args.arch, weights=args.weights, labels=args.labels, seed=args.seed,
                         out=args.out, cut=args.cut, img_size=args.img_size)
    console.print(f"suggested learning rate: [bold]{found.suggestion:.3g}[/] ({found.rule})")
    console.print(f"plot: {png}")
    print(f"{found.suggestion:.6g}")
    return 0


def cmd_augment_preview(args: argparse.Namespace) -> int:
    from visiontune.doctor import augment_preview

    out = augment_preview(args.data, args.out, args.aug, args.images, args.samples, args.img_size, args.seed)
    console.print(f"wrote {out}")
    return 0


def cmd_ensemble(args: argparse.Namespace) -> int:
    from visiontune.api import ensemble_runs

    result = ensemble_runs(args.runs, args.data, args.labels, args.method, args.out, args.batch_size)
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
    from visiontune.api import load
    from visiontune.export.formats import export, parity, quantize_int8

    run = Path(args.run)
    clf = load(run)
    suffix = ".onnx" if args.format == "onnx" else ".pt"
    out = Path(args.out) if args.out else run / "export" / f"model{suffix}"
    split = json.loads((run / "split.json").read_text()) if (run / "split.json").exists() else {}
    images = (split.get("valid") or split.get("train") or [])[: args.parity_images]
    export(clf, args.format, out)
    console.print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")
    if images:
        check = parity(clf, out, images)
        console.print(f"parity on {check['images']} real images: max |Δprob| = {check['max_abs_prob_diff']:.2e} "
                      f"(tolerance {check['tolerance']:.0e}) -> {'OK' if check['ok'] else 'FAILED'}")
        if not check["ok"]:
            return 1
    if args.quantize == "int8":
        if args.format != "onnx":
            raise UsageError("--quantize int8 needs --format onnx")
        quantized = quantize_int8(clf, out, out.with_name(out.stem + "-int8.onnx"), images[:64])
        console.print(f"wrote {quantized} ({quantized.stat().st_size / 1e6:.1f} MB)")
        if split.get("valid_labels"):
            from visiontune.export.formats import exported_accuracy

            labels = split["valid_labels"]
            fp32, int8 = exported_accuracy(out, split["valid"], labels), exported_accuracy(quantized, split["valid"], labels)
            console.print(f"validation accuracy: fp32 {fp32:.4f} -> int8 {int8:.4f} ({int8 - fp32:+.4f})")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from visiontune.serve.app import serve

    if args.host not in ("127.0.0.1", "localhost", "::1"):
        console.print(f"[yellow]serving on {args.host}: reachable from other machines[/]")
    serve(args.run, args.host, args.port, max_upload_bytes=args.max_upload_mb * 1024 * 1024, max_pixels=args.max_pixels,
          max_concurrent=args.max_concurrent)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from visiontune.report.html import build_report

    out = build_report(args.run)
    console.print(f"wrote {out}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from visiontune.report.show import show, show_feature_maps, show_gradcam

    if args.gradcam:
        console.print(f"wrote {show_gradcam(args.run, args.gradcam, args.out)}")
    elif args.feature_maps:
        console.print(f"wrote {show_feature_maps(args.run, args.feature_maps, args.layer, args.out)}")
    else:
        show(args.run, mistakes=args.mistakes, limit=args.limit)
    return 0


def cmd_hard_examples(args: argparse.Namespace) -> int:
    from visiontune.api import load
    from visiontune.evaluate.hard_examples import mine_hard_examples, write_hard_examples

    run = Path(args.run)
    split = json.loads((run / "split.json").read_text())
    if "train_labels" not in split:
        raise UsageError(f"{run}: split.json has no labels (a run from an older visiontune); retrain it")
    clf = load(run)
    found = mine_hard_examples(clf, split["train"], split["train_labels"], args.margin, args.confident, args.batch_size)
    out = write_hard_examples(found, Path(args.out) if args.out else run / "hard_examples.csv")
    kinds = {k: sum(h.kind == k for h in found) for k in ("likely-label-error", "wrong", "barely-right")}
    console.print(f"{len(split['train'])} training images: " + ", ".join(f"{v} {k}" for k, v in kinds.items()))
    table = Table(title="hardest training images")
    for column in ("path", "label", "predicted", "p(label)", "kind"):
        table.add_column(column)
    for h in found[: args.limit]:
        table.add_row(h.path, h.label, h.predicted, f"{h.p_label:.3f}", h.kind)
    Console().print(table)
    console.print(f"wrote {out}; retrain with: visiontune train DATA --upweight {out}")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from visiontune.doctor import doctor

    report = doctor(args.data, labels=args.labels, arch=args.arch, weights=args.weights, seed=args.seed)
    Console().print(report.table())
    for line in report.advice:
        console.print(f"[yellow]•[/] {line}")
    return 0 if report.healthy else 1


def cmd_plan(args: argparse.Namespace) -> int:
    from visiontune.api import prepare

    prep = prepare(args.data, args.arch, args.weights, args.labels, args.seed, args.budget)
    profile = prep.data_profile
    console.print(
        f"{profile.n_train} train / {profile.n_valid} valid images, {profile.n_classes} classes, median side "
        f"{profile.median_side}px, grayscale {profile.grayscale:.0%}, ImageNet-head entropy {profile.imagenet_entropy}"
    )
    Console().print(prep.plan.table())
    return 0


def _image_args(items: list[str]) -> list[Path]:
    """Expand folders (recursively) into their image files; keep explicit files as given."""
    paths: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            paths.extend(sorted(p for p in path.rglob("*") if p.is_file() and is_image_name(p)))
        elif path.exists():
            paths.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such file or folder")
    if not paths:
        raise DataError(f"no image files found in {', '.join(items)}")
    return paths


def cmd_predict(args: argparse.Namespace) -> int:
    from visiontune.api import load
    from visiontune.data.catalog import Skipped

    clf = load(args.classifier)
    paths = _image_args(args.images)
    if args.submission:
        from visiontune.submission import write_submission

        out = Path(args.csv or "submission.csv")
        done = write_submission(clf, Path(args.submission), paths, out, args.batch_size, args.tta, args.engine)
        console.print(f"wrote {out}: {done['rows']} rows ({done['format']} format of {args.submission}); "
                      f"{done['unreadable']} unreadable images got uniform probabilities")
        return 0
    skipped: list[Skipped] = []
    predictions = clf.iter_predictions(
        paths, topk=args.topk, batch_size=args.batch_size, skipped=skipped, tta=args.tta, combine=args.combine,
        engine=args.engine,
    )
    count = 0
    if args.json:
        out = Path(args.json)
        with out.open("w") as handle:  # a JSON array written item by item: memory stays flat
            handle.write("[")
            for p in predictions:
                item = {"path": p.path, "label": p.label, "top": [{"class": c, "prob": round(q, 6)} for c, q in zip(p.classes, p.probs)]}
                if p.tags is not None:
                    item["tags"] = p.tags
                handle.write((",\n" if count else "\n") + json.dumps(item))
                count += 1
            handle.write("\n]\n")
        console.print(f"wrote {count} predictions to {out}")
    elif args.csv:
        out = Path(args.csv)
        with out.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path", "label", "prob", "topk"] + (["tags"] if clf.multi_label else []))
            for p in predictions:
                topk = ";".join(f"{c}:{q:.4f}" for c, q in zip(p.classes, p.probs))
                writer.writerow([p.path, p.label, f"{p.probs[0]:.6f}", topk] + ([" ".join(p.tags)] if p.tags is not None else []))
                count += 1
        console.print(f"wrote {count} predictions to {out}")
    else:
        table = Table(title=f"top-{args.topk} predictions")
        table.add_column("image")
        table.add_column("class")
        table.add_column("prob", justify="right")
        table.add_column("next")
        for p in predictions:
            others = ", ".join(f"{c} {q:.2f}" for c, q in zip(p.classes[1:], p.probs[1:]))
            label = " ".join(p.tags) if p.tags is not None else p.label
            table.add_row(p.path, label, f"{p.probs[0]:.3f}", others)
            count += 1
        Console().print(table)
    for s in skipped:
        console.print(f"[yellow]skipped[/] {s.path}: {s.reason}")
    return 0 if count else 1


def cmd_evaluate(args: argparse.Namespace) -> int:
    from visiontune.api import evaluate, load

    clf = load(args.classifier)
    metrics = evaluate(clf, args.data, labels=args.labels, batch_size=args.batch_size, tta=args.tta, combine=args.combine)
    if args.json:
        Path(args.json).write_text(json.dumps(metrics, indent=2))
    for table in _metrics_tables(metrics, clf.classes):
        Console().print(table)
    for s in metrics["skipped"]:
        console.print(f"[yellow]skipped[/] {s['path']}: {s['reason']}")
    return 0


def cmd_split(args: argparse.Namespace) -> int:
    from visiontune.data.catalog import catalog_from_folders
    from visiontune.data.split import write_split_folders

    src = Path(args.src)
    catalog = catalog_from_folders(src, check=False)
    result = write_split_folders(catalog, src, Path(args.dst), args.valid, args.seed)
    console.print(f"{args.dst}: {result['train']} train / {result['valid']} valid images ({result['links']})")
    return 0


def cmd_demo_data(args: argparse.Namespace) -> int:
    from visiontune.data.demo import DEMOS

    dest = DEMOS[args.name](args.dest)
    console.print(f"wrote the {args.name} demo dataset to {dest}")
    return 0


def _cache_build(args: argparse.Namespace, root: Path) -> int:
    """Warm the cache for a folder of images (no training): every image once through the trunk."""
    from visiontune.backbones.registry import create_backbone
    from visiontune.cache.features import cached_activations

    if not args.data:
        raise DataError("cache build needs a data folder: visiontune cache build DATA")
    paths = _image_args([args.data])
    backbone = create_backbone(args.arch, args.weights, num_classes=0, img_size=args.img_size)
    skipped_total = 0
    for view in [None, *range(args.views)]:
        kept, _, skipped = cached_activations(
            backbone, paths, root, cut=args.cut, view=view, engine=args.engine, load=False,
            description="caching",
        )
        skipped_total += len(skipped)
    console.print(f"cached {len(kept)} images x {1 + args.views} views at {args.cut} under {root}; {skipped_total} skipped")
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    from visiontune.cache.store import cache_info, clear_cache, default_cache_root

    root = Path(args.cache_dir) if args.cache_dir else default_cache_root()
    if args.action == "build":
        return _cache_build(args, root)
    if args.action == "clear":
        console.print(f"freed {clear_cache(root) / 1e6:.1f} MB under {root}")
        return 0
    table = Table(title=f"feature cache: {root}")
    for column in ("arch", "size", "cut", "view", "images", "MB"):
        table.add_column(column)
    for entry in cache_info(root):
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


def _add_playbook(train: argparse.ArgumentParser) -> None:
    """The training playbook's flags; each maps to one plan setting (None: the plan decides)."""
    g = train.add_argument_group("recipe (default: the plan)")
    g.add_argument("--epochs", type=int, help="epochs on cached activations")
    g.add_argument("--unfreeze", type=int, help="fine-tuning epochs on images afterwards")
    g.add_argument("--img-size", type=int, help="input size in pixels")
    g.add_argument("--cut", help="cached trunk ends here: pooled | blocks.K")
    g.add_argument("--views", type=int, help="augmented cached views per training image")
    g.add_argument("--engine", choices=ENGINES, help="engine of the cached trunk pass")
    g = train.add_argument_group("optimisation")
    g.add_argument("--lr", type=_number_or_auto(float), help="head learning rate, or auto (LR finder)")
    g.add_argument("--lr-mult", type=float, help="each layer group down learns this many times slower (10)")
    g.add_argument("--batch-size", type=_number_or_auto(int), help="a number, or auto (validation + memory search)")
    g.add_argument("--optimizer", choices=["adamw", "sgd"])
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--schedule", choices=["onecycle", "cosine", "sgdr", "constant"])
    g.add_argument("--warmup-epochs", type=float, help="linear warm-up (cosine/sgdr/constant)")
    g.add_argument("--sgdr-cycle", type=int, help="epochs of SGDR's first cycle")
    g.add_argument("--sgdr-mult", type=int, help="SGDR cycle length multiplier")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None, help="bf16 autocast")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile the training step")
    g = train.add_argument_group("freezing")
    g.add_argument("--freeze-to", help="fine-tune from this layer group up, e.g. blocks.4")
    g.add_argument("--gradual", action=argparse.BooleanOptionalAction, default=None, help="gradual unfreezing")
    g.add_argument("--bn-freeze", action=argparse.BooleanOptionalAction, default=None, help="keep BatchNorm statistics fixed")
    g = train.add_argument_group("loss and regularisation")
    g.add_argument("--loss", choices=["ce", "focal"])
    g.add_argument("--label-smoothing", type=float)
    g.add_argument("--focal-gamma", type=float)
    g.add_argument("--class-weights", choices=["none", "balanced"])
    g.add_argument("--sampler", choices=["random", "balanced"])
    g.add_argument("--head-dropout", type=float)
    g.add_argument("--aug", choices=AUGMENTATIONS, help="augmentation preset (images and cached views)")
    g.add_argument("--mixup", type=float, help="mixup alpha (0.2-0.4 typical)")
    g.add_argument("--cutmix", type=float, help="cutmix alpha (1.0 typical)")
    g.add_argument("--swa", action=argparse.BooleanOptionalAction, default=None, help="stochastic weight averaging")
    g.add_argument("--swa-start", type=float, help="fraction of the epochs before SWA starts (0.75)")
    g.add_argument("--swa-lr", type=float)
    g.add_argument("--ema", type=float, help="EMA decay of the weights, e.g. 0.999")
    g.add_argument("--early-stop", type=int, metavar="PATIENCE", help="stop after this many epochs without improvement")
    g.add_argument("--monitor", choices=["valid_loss", "valid_accuracy"])
    g.add_argument("--upweight", metavar="CSV", help="draw the images of a hard-examples CSV more often")
    g.add_argument("--upweight-factor", type=float, help="how much more often (3)")
    g.add_argument("--fbeta", type=float, help="multi-label: thresholds maximise this F-beta (2)")
    g = train.add_argument_group("monitoring")
    g.add_argument("--eval-every", type=int, metavar="STEPS", help="also validate every N steps (metrics.jsonl, tb/)")
    g.add_argument("--checkpoint-every", type=int, metavar="STEPS", help="also checkpoint every N steps")


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
