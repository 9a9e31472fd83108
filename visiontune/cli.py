"""The `visiontune` command: parses arguments, calls the API, prints with rich (results to stdout, messages to stderr)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from visiontune.errors import (
    ArtifactError, DataError, ImageError, RunExistsError, RunInterrupted, UsageError, WeightsError, WriteError,
)
from visiontune.data.archives import is_archive, split_member
from visiontune.names import AUGMENTATIONS, COMBINE, DEVICE_HELP, ENGINE_CHOICES, INFERENCE_BATCH, PRIOR_HELP, TTA_MODES
from visiontune.progress import console
from visiontune.version import __version__

USER_ERRORS = (DataError, WeightsError, ArtifactError, RunExistsError, FileNotFoundError, UsageError, ImageError,
               WriteError)


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
    from visiontune import distributed, stopping

    stopping.install()  # SIGTERM / Ctrl-C: finish the step, checkpoint it, print the resume command

    if args.gpus and not distributed.world().shared:
        from visiontune import device as devices

        gpus = devices.parse_gpus(args.gpus)
        if args.nproc not in (None, len(gpus)):
            raise UsageError(f"--gpus {args.gpus} names {len(gpus)} GPUs but --nproc is {args.nproc}: one process per GPU; "
                             "drop --nproc")
        if len(gpus) == 1:  # one process on that GPU
            args.device = f"cuda:{gpus[0]}"
        else:  # one process per GPU, each seeing only its own (cuda:0 = its local rank's GPU among those)
            argv = without_option(without_option(args.argv, "--gpus"), "--nproc")
            return distributed.launch(len(gpus), argv, env=devices.visible_devices_env(gpus))
    if args.nproc is not None and args.nproc > 1 and not distributed.world().shared:
        return distributed.launch(args.nproc, without_option(args.argv, "--nproc"))
    from visiontune import api

    if args.resume:
        clf = api.resume(args.resume)
    else:
        if not args.data:
            raise UsageError("train needs a data folder (or --resume runs/NAME)")
        from dataclasses import fields

        from visiontune.runs import RunConfig

        settings = {name: getattr(args, name) for name in plan_flag_names() if getattr(args, name) is not None}
        # every RunConfig field train has a flag for (a new one needs its flag and its field, nothing here)
        run_arguments = {f.name: getattr(args, f.name) for f in fields(RunConfig) if f.name != "data" and hasattr(args, f.name)}
        clf = api.fit(args.data, out=args.out, valid_fraction=args.valid, **run_arguments, **settings)
    if not distributed.world().main:  # rank 0 reports the job's outcome
        return 0
    from visiontune.runs import RunDir

    run = RunDir(clf.run_dir)
    results = Console()  # the outcome goes to stdout (progress and messages went to stderr)
    if "per_class" in clf.metrics:
        for table in _metrics_tables(clf.metrics, clf.classes):
            results.print(table)
    if "seconds" in clf.metrics:  # a --folds ensemble reports the folds' spread instead (printed above)
        key, value = clf.task.headline(clf.metrics)
        more = {k: clf.metrics[k] for k in ("mean_average_precision", "subset_accuracy") if k in clf.metrics}
        extra = " (" + ", ".join(f"{k} {v:.4f}" for k, v in more.items()) + ")" if more else ""
        results.print(f"[bold green]validation {key} {value:.4f}[/]{extra} in {clf.metrics['seconds']} s")
        results.print(f"metrics per epoch: {run.file('metrics.jsonl')}")
    results.print(f"run: {escape(str(clf.run_dir))}", soft_wrap=True, highlight=False)
    if run.report_path.exists():
        for step in (f"open {run.report_path}", f"visiontune show {clf.run_dir} --mistakes",
                     f"visiontune predict {clf.run_dir} IMAGES"):
            results.print(f"next: {escape(step)}", soft_wrap=True, highlight=False)
    return 0


def cmd_lr_find(args: argparse.Namespace) -> int:
    from visiontune import api

    found, png = api.find_lr(args.data, arch=args.arch, weights=args.weights, labels=args.labels, seed=args.seed,
                             out=args.out, cut=args.cut, img_size=args.img_size, device=args.device)
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

    result = api.ensemble_runs(args.runs, args.data, args.labels, args.method, args.out, args.batch_size, args.engine,
                               args.device)
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
        q = result.quantization
        shifts = ", ".join(f"{k} {v:.4f}" for k, v in q["shift"].items())
        console.print(f"int8 scheme {q['scheme']} (probabilities moved from fp32's, mean L1 on {q['calibration_images']} "
                      f"training images: {shifts}; kept at <= {q['limit']} or the least)")
    if result.accuracy:
        fp32, int8 = result.accuracy["fp32"], result.accuracy["int8"]
        console.print(f"validation accuracy: fp32 {fp32:.4f} -> int8 {int8:.4f} ({int8 - fp32:+.4f})")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from visiontune import api

    if args.host not in ("127.0.0.1", "localhost", "::1"):
        console.print(f"[yellow]serving on {args.host}: reachable from other machines[/]")
    api.serve(args.run, args.host, args.port, args.max_upload_mb, args.max_pixels, args.max_concurrent,
              max_connections=args.max_connections, body_timeout=args.body_timeout, device=args.device,
              token_file=args.token_file, no_auth=args.no_auth, ssl_certfile=args.ssl_certfile,
              ssl_keyfile=args.ssl_keyfile, access_log=args.access_log, cors_origins=tuple(args.cors_origin),
              drain_seconds=args.drain_seconds, say=_say_serving)
    return 0


def _say_serving(line: str) -> None:
    """How to call the server, on stdout (the outcome the user wants; the access log and errors go to stderr)."""
    style = "yellow" if line.startswith("authentication is OFF") else None
    Console().print(line, style=style, markup=False, highlight=False, soft_wrap=True)


def cmd_report(args: argparse.Namespace) -> int:
    from visiontune import api

    console.print(f"wrote {api.report(args.run)}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from visiontune import api

    if (args.gradcam or args.feature_maps or args.kernels_demo) and len(args.run) > 1:
        raise UsageError(f"--gradcam/--feature-maps/--kernels-demo draw one run's model; {len(args.run)} runs were given")
    if args.kernels_demo:
        console.print(f"wrote {api.show_kernels_demo(args.run[0], args.kernels_demo, args.out)}")
    elif args.gradcam:
        console.print(f"wrote {api.show_gradcam(args.run[0], args.gradcam, args.out)}")
    elif args.feature_maps:
        console.print(f"wrote {api.show_feature_maps(args.run[0], args.feature_maps, args.layer, args.out)}")
    else:
        for run in args.run:  # `visiontune show runs/digits-*` shows every run the pattern matches
            api.show(run, mistakes=args.mistakes, limit=args.limit)
    return 0


def cmd_hard_examples(args: argparse.Namespace) -> int:
    from visiontune import api

    found, out, total = api.hard_examples(args.run, args.out, args.margin, args.confident, args.batch_size, args.engine,
                                          args.device)
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
                        target=args.target, device=args.device)
    Console().print(report.table())
    for line in report.advice:
        console.print(f"[yellow]•[/] {line}")
    return 0 if report.healthy else 1


def cmd_plan(args: argparse.Namespace) -> int:
    from visiontune import api

    prep = api.plan(args.data, args.arch, args.weights, args.labels, args.seed, args.budget, device=args.device)
    profile = prep.data_profile
    console.print(
        f"{profile.n_train} train / {profile.n_valid} valid images, {profile.n_classes} classes ({prep.task.name}), "
        f"median side {profile.median_side}px, grayscale {profile.grayscale:.0%}, ImageNet-head entropy {profile.imagenet_entropy}"
    )
    Console().print(prep.plan.table())
    return 0





def cmd_predict(args: argparse.Namespace) -> int:
    from visiontune import api

    result = api.predict_files(args.classifier, args.images, csv_out=args.csv, json_out=args.json,
                               submission_sample=args.submission, prior=args.prior, topk=args.topk,
                               batch_size=args.batch_size, tta=args.tta, combine=args.combine, engine=args.engine,
                               device=args.device)
    if result.prior:
        console.print(f"prior: {_prior_text(result.prior, result.classifier.classes)}")
    if result.submission:
        done = result.submission
        console.print(f"wrote {result.out}: {done['rows']} rows ({done['format']} format of {args.submission}); "
                      f"{done['unreadable']} unreadable images got uniform probabilities")
        return 0
    if result.out is not None:
        count = result.count
        console.print(f"wrote {count} predictions to {result.out}")
    else:
        results = Console()
        rows = []
        for p in result.predictions:
            others = ", ".join(f"{c} {q:.2f}" for c, q in zip(p.classes[1:], p.probs[1:]))
            rows.append((_shown_path(p.path), " ".join(p.tags) if p.tags is not None else p.label, f"{p.probs[0]:.3f}", others))
        count = len(rows)
        if results.is_terminal:
            # the path column folds instead of being cut, so the file name (its end) always shows
            table = Table(title=f"top-{args.topk} predictions")
            table.add_column("image", overflow="fold", ratio=3)
            table.add_column("class", overflow="fold", ratio=1)
            table.add_column("prob", justify="right", no_wrap=True)
            table.add_column("next", overflow="fold", ratio=2)
            for row in rows:
                table.add_row(*row)
            results.print(table)
        else:  # piped or redirected: one tab-separated line per image, whole paths, nothing cut
            print("image\tclass\tprob\tnext")
            for row in rows:
                print("\t".join(row))
    for s in result.skipped:
        console.print(f"[yellow]skipped[/] {s.path}: {s.reason}")
    return 0 if count else 1


def _shown_path(path: str) -> str:
    """A path as the user would type it: relative to the working directory when it is below it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _prior_text(info: dict, classes: list[str]) -> str:
    """'estimate (EM, 12 iterations): cat 0.31, dog 0.69'."""
    how = info["prior"] + (f" (EM, {info['em_iterations']} iterations)" if "em_iterations" in info else "")
    return how + ": " + ", ".join(f"{c} {p:.3f}" for c, p in zip(classes, info["proportions"]))


def cmd_evaluate(args: argparse.Namespace) -> int:
    from visiontune import api

    metrics = api.evaluate(args.classifier, args.data, labels=args.labels, batch_size=args.batch_size, tta=args.tta,
                           combine=args.combine, engine=args.engine, prior=args.prior, json_out=args.json,
                           device=args.device)
    classes = list(metrics["per_class"])  # in the classifier's class order
    if "prior" in metrics:
        console.print(f"prior: {_prior_text(metrics['prior'], classes)}")
    for table in _metrics_tables(metrics, classes):
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


class _Parser(argparse.ArgumentParser):
    """Argument errors as two short lines (the message, where to look) instead of the whole usage."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n(`{self.prog} --help` lists the options, with examples)\n")


class _Help(argparse.RawDescriptionHelpFormatter):
    """Examples keep their lines; every option with a real default shows it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or "(default" in text or not action.option_strings:
            return text
        if action.default in (None, False, "", argparse.SUPPRESS) or isinstance(action, argparse.BooleanOptionalAction):
            return text
        return f"{text} (default: %(default)s)"


def _examples(*lines: str) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


def _path_kind(check, what: str):
    """An argparse type that fails fast (before torch loads) with the path and what to pass instead."""

    def parse(text: str) -> str:
        problem = check(Path(text))
        if problem:
            raise argparse.ArgumentTypeError(f"{text}: {problem}")
        return text

    parse.__name__ = what
    return parse


def _where(path: Path) -> str:
    return "" if path.is_absolute() else f" (looked in {Path.cwd()})"


def _missing(path: Path) -> str | None:
    if path.exists() or split_member(path) is not None:  # a path inside a .zip/.tar is checked when read
        return None
    return f"no such file or folder{_where(path)}. Check the path."


def _not_folder(path: Path) -> str | None:
    if split_member(path) is not None:
        return None
    if not path.exists():
        return f"no such folder{_where(path)}. Check the path."
    return None if path.is_dir() or is_archive(path) else "is a file, not a folder of images (or a .zip/.tar of them)"


def _not_classifier(path: Path) -> str | None:
    if not path.is_dir():
        return _not_folder(path)
    marks = ("classifier.json", "classifier/classifier.json", "ensemble.json", "fold-*/classifier/classifier.json")
    if any(next(iter(path.glob(mark)), None) for mark in marks):
        return None
    runs = sorted(p.name for p in Path("runs").glob("*/classifier")) if Path("runs").is_dir() else []
    known = f"; runs here: {', '.join('runs/' + r for r in runs[-3:])}" if runs else ""
    return ("not a visiontune classifier (needs classifier.json and model.safetensors). "
            f"Pass a run folder (runs/NAME) or its classifier/ folder{known}")


FOLDER = _path_kind(_not_folder, "folder")
EXISTING = _path_kind(_missing, "path")
CLASSIFIER = _path_kind(_not_classifier, "run")


def _command(sub, name: str, summary: str, description: str, *examples: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=summary, description=description, epilog=_examples(*examples),
                          formatter_class=_Help)


def cmd_backbones(args: argparse.Namespace) -> int:
    from visiontune import api
    from visiontune.backbones.weights_folder import weights_folder

    rows = api.backbones(measure=not args.no_measure, remeasure=args.remeasure, progress=lambda text: console.print(text))
    engines = sorted({e for row in rows for e in row["img_per_s"]})
    table = Table(title="backbones loadable offline (img/s: the cached trunk pass, measured here, 112 / 224 px)")
    for column in ("--arch", "weights", "parameters", "input", "ImageNet top-1", *engines):
        table.add_column(column, overflow="fold")
    for row in rows:
        speeds = [" / ".join(f"{row['img_per_s'][e][size]:.0f}" for size in ("112", "224")) if e in row["img_per_s"] else ""
                  for e in engines]
        top1 = f"{row['imagenet_top1']:.1f} %" if row["imagenet_top1"] else "-"
        table.add_row(row["arch"], row["source"], f"{row['parameters'] / 1e6:.1f} M", f"{row['input_size']} px", top1, *speeds)
    Console().print(table)
    console.print(f"more offline backbones: put <timm-name>.safetensors in {weights_folder()} ($VISIONTUNE_WEIGHTS), "
                  "or pass --weights PATH with any timm architecture")
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    from visiontune import api

    results = Console()
    if args.items[:1] == ["compare"]:
        if len(args.items) != 3:
            raise UsageError("visiontune runs compare A B: give exactly two run folders")
        table = Table(title=f"{args.items[1]} vs {args.items[2]}")
        for column in ("setting / metric", "A", "B"):
            table.add_column(column, overflow="fold")
        shown = lambda value: f"{value:.4f}" if isinstance(value, float) else str(value)  # noqa: E731
        for key, left, right in api.compare_runs(args.items[1], args.items[2]):
            table.add_row(key, shown(left), shown(right))
        results.print(table)
        return 0
    if len(args.items) > 1:
        raise UsageError("visiontune runs [DIR] lists the runs under DIR; visiontune runs compare A B compares two")
    root = args.items[0] if args.items else "runs"
    rows = api.runs(root)
    if not rows:
        console.print(f"no runs under {root} (train one: visiontune train DATA)")
        return 0
    table = Table(title=f"runs under {root}")
    for column in ("run", "started", "data", "backbone", "recipe", "best metric", "wall", "status"):
        table.add_column(column, overflow="fold")
    for row in rows:
        wall = f"{row.wall_s:.0f}s" if row.wall_s is not None else "-"
        table.add_row(str(row.path), row.started, row.data, row.backbone, row.recipe, row.metric, wall, row.status)
    results.print(table)
    return 0


def _add_backbone(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", default="tf_efficientnet_lite0", help="timm architecture")
    parser.add_argument("--weights", default="default",
                        help="default (the packaged ImageNet weights, offline) | PATH (.safetensors/.pth) | none | hub (online)")


def _add_seed(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, the batches and the initialisation: "
                        "the same seed gives the same numbers on CPU")


def _add_data_and_backbone(parser: argparse.ArgumentParser, optional: bool = False) -> None:
    """Arguments shared by `train`, `plan`, `doctor` and `lr-find`: the data, the backbone, the seed."""
    parser.add_argument(
        "data", nargs="?" if optional else None, type=FOLDER,
        help="folder of images: one sub-folder per class, or train/ + valid/ with class sub-folders, or any "
             "folder with --labels",
    )
    _add_labels(parser)
    _add_backbone(parser)
    _add_seed(parser)


# Options several commands share, each declared once here; a command passes only what it writes (--out).

def _add_labels(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--labels", type=EXISTING, metavar="CSV",
                        help="CSV of filename,label instead of class folders (paths relative to the data folder; "
                             "several space-separated tags = multi-label)")


def _add_out(parser: argparse.ArgumentParser, what: str, default: str | None = None) -> None:
    parser.add_argument("--out", default=default, help=what + (f" (default: {default})" if default else ""))


def _add_batch_size(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=int, default=INFERENCE_BATCH, metavar="N", help="images per forward pass")


def _add_img_size(parser: argparse.ArgumentParser, default: int | None = None, unset: str = "the plan's") -> None:
    parser.add_argument("--img-size", type=int, default=default, metavar="PX",
                        help=f"input size in pixels (default: {default if default is not None else unset})")


def _add_engine(parser: argparse.ArgumentParser, what: str = "the forward passes") -> None:
    parser.add_argument("--engine", choices=ENGINE_CHOICES, default="auto",
                        help=f"engine of {what}; auto: onnxruntime when installed (fastest here), else torch")


def _add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", metavar="DEVICE", help=DEVICE_HELP)


def _add_inference(parser: argparse.ArgumentParser) -> None:
    """What every command that runs a trained classifier over images takes: batch size, engine and device."""
    _add_batch_size(parser)
    _add_engine(parser)
    _add_device(parser)


def _add_tta(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tta", choices=TTA_MODES, default="none",
                        help="test-time augmentation: average the probabilities of flipped/cropped views")
    parser.add_argument("--combine", choices=COMBINE, default="mean", help="how TTA probabilities are combined")


def plan_flag_names() -> list[str]:
    """Plan fields that are `train` flags (declared once, in train/plan.py, with a group)."""
    from dataclasses import fields

    from visiontune.train.plan import Plan

    return [f.name for f in fields(Plan) if f.metadata.get("group")]


METAVARS = {int: "N", float: "X", str: "NAME"}


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
        shown = f.default not in (MISSING, "", None)  # recipe fields have none: the plan decides
        options: dict = {"dest": f.name, "help": meta["help"] + (f" (default: {f.default})" if shown else "")}
        kind = kinds[f.name]
        if kind is bool:
            options.update(action=argparse.BooleanOptionalAction, default=None)
        else:
            options["type"] = _number_or_auto(kind) if meta["auto"] else kind
            options["metavar"] = meta["metavar"] or METAVARS.get(kind)
        if meta["choices"]:
            options["choices"] = meta["choices"]
            options.pop("metavar", None)
        group.add_argument(flag, **options)


DESCRIPTION = """\
visiontune turns a folder of labelled images into a strong image classifier by transfer learning,
on an ordinary CPU and offline: it checks the data, chooses a recipe from its size, trains on cached
backbone activations, explains the model's mistakes in a report, and ships it (predict, export, serve).

The usual order: doctor -> plan -> train -> report/show -> evaluate/predict -> export/serve.
Run `visiontune COMMAND --help` for each command's options and examples."""

TOP_EXAMPLES = (
    "visiontune demo-data digits data/digits        # an offline dataset to try it on",
    "visiontune train data/digits                   # writes runs/digits-<time>/ with report.html",
    "visiontune predict runs/digits-<time> photo.png more_photos/",
)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="visiontune", description=DESCRIPTION, epilog=_examples(*TOP_EXAMPLES),
                                     formatter_class=_Help)
    parser.add_argument("--version", action="version", version=__version__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = _command(sub, "demo-data", "write an offline demo dataset as class folders",
                    "Write a dataset that ships with the install (scikit-learn digits, or Fashion-MNIST from the "
                    "Debian package dataset-fashion-mnist) as one PNG folder per class.",
                    "visiontune demo-data digits data/digits", "visiontune demo-data fashion-mnist data/fmnist")
    demo.add_argument("name", choices=["digits", "fashion-mnist"], help="which dataset")
    demo.add_argument("dest", help="new folder to write (one sub-folder per class)")
    demo.set_defaults(func=cmd_demo_data)

    doctor = _command(sub, "doctor", "check the data before training: balance, duplicates, mean/std, a tiny overfit",
                      "Check a data folder and the training pipeline: unreadable files, class balance, identical images "
                      "(also under two labels), per-channel mean/std, and whether the model can overfit 4 images per "
                      "class. Exit code 1 when something needs fixing. With --target, also how far another domain's "
                      "images are from DATA in the backbone's feature space.",
                      "visiontune doctor data/", "visiontune doctor source/ --target other_camera/")
    _add_data_and_backbone(doctor)
    doctor.add_argument("--target", metavar="DIR", type=FOLDER, help="also measure how far this domain's images are from DATA")
    _add_device(doctor)
    doctor.set_defaults(func=cmd_doctor)

    plan = _command(sub, "plan", "print the recipe train would use, with its reasons, without training",
                    "Measure the data (size, colour, distance from ImageNet) and print the plan `train` would follow, "
                    "each setting with the reason it was chosen. With --budget, time a few batches and fit the budget.",
                    "visiontune plan data/", "visiontune plan data/ --budget 2m")
    _add_data_and_backbone(plan)
    plan.add_argument("--budget", help="wall-clock target such as 90s, 5m or 1h")
    _add_device(plan)
    plan.set_defaults(func=cmd_plan)

    train = _command(
        sub, "train", "train a classifier on a folder of labelled images -> runs/NAME/",
        "Check the data, choose the recipe from its size (printed with its reasons; every setting below "
        "overrides it), cache the backbone's activations, train, evaluate on the validation images and write "
        "runs/NAME/: the classifier, metrics, predictions and report.html. Ctrl-C stops with a checkpoint; "
        "--resume continues it exactly.",
        "visiontune train data/",
        "visiontune train data/ --budget 5m --out runs/quick",
        "visiontune train data/ --unfreeze 3 --aug standard --lr auto",
        "visiontune train --resume runs/quick",
        "visiontune train data/ --nproc 2",
        "torchrun --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d --rdzv-endpoint HOST:29400 -m visiontune train data/",
    )
    _add_data_and_backbone(train, optional=True)
    _add_out(train, "run folder (default: runs/<data>-<time>); never overwritten")
    train.add_argument("--resume", metavar="RUN", type=FOLDER, help="continue an interrupted run from its last checkpoint")
    train.add_argument("--folds", type=int, default=0, metavar="K", help="K-fold cross-validation: K models, mean ± std; 0 = off")
    train.add_argument("--budget", help="wall-clock target such as 90s, 5m or 1h: the plan picks the recipe that fits")
    train.add_argument("--valid", type=float, metavar="FRACTION", help="validation fraction when DATA is not split (default: 0.2)")
    train.add_argument("--cache-dir", metavar="DIR", help="feature cache (default: $VISIONTUNE_CACHE or ~/.cache/visiontune)")
    train.add_argument("--workers", type=int, default=1, metavar="N", help="image-decoding processes")
    train.add_argument("--gpus", metavar="LIST", help="train on these GPUs, one process each: 0,1,3 or all (NCCL)")
    train.add_argument("--nproc", type=int, metavar="N", help="train with N processes on this machine (starts "
                       "torchrun; each gets cores/N threads); for several machines run torchrun yourself")
    train.add_argument("--report", action=argparse.BooleanOptionalAction, default=True, help="write report.html (default: yes)")
    train.add_argument("--unlabeled", metavar="DIR", type=FOLDER, help="also learn from these unlabelled images (recursive; --ssl picks the method)")
    train.add_argument("--target", metavar="DIR", type=FOLDER, help="adapt to this domain's unlabelled images (--adapt picks the method)")
    train.add_argument("--target-labels", metavar="DIR", type=FOLDER, help="labelled target images (class folders): evaluation only, after training")
    _add_playbook(train)
    train.set_defaults(func=cmd_train)

    lr_find = _command(sub, "lr-find", "learning-rate range test on the cached phase: plot and suggestion",
                       "Sweep the learning rate from 1e-6 to 10 over the cached phase, plot the loss and suggest a "
                       "rate (a tenth of the rate at the smoothed minimum). `train --lr auto` does the same inside a run.",
                       "visiontune lr-find data/", "visiontune lr-find data/ --cut blocks.6 --out lr.png")
    _add_data_and_backbone(lr_find)
    _add_out(lr_find, "PNG of loss vs learning rate", "lr_find.png")
    lr_find.add_argument("--cut", help="pooled | blocks.K (default: the plan's)")
    _add_img_size(lr_find)
    _add_device(lr_find)
    lr_find.set_defaults(func=cmd_lr_find)

    preview = _command(sub, "augment-preview", "a grid of an augmentation preset applied to your images",
                       "Write a PNG grid: rows are your images, columns random augmentations of them, so you see what "
                       "--aug does before training with it.",
                       "visiontune augment-preview data/ --aug strong", "visiontune augment-preview data/ --aug aerial --out aerial.png")
    preview.add_argument("data", type=FOLDER, help="folder of images (searched recursively)")
    preview.add_argument("--aug", default="standard", choices=AUGMENTATIONS, help="augmentation preset")
    _add_out(preview, "PNG to write", "augment-preview.png")
    preview.add_argument("--images", type=int, default=4, metavar="N", help="rows: source images")
    preview.add_argument("--samples", type=int, default=6, metavar="N", help="columns: augmented samples per image")
    _add_img_size(preview, 224)
    _add_seed(preview)
    preview.set_defaults(func=cmd_augment_preview)

    run_help = "a run folder written by `visiontune train` (runs/NAME)"
    report = _command(sub, "report", "(re)build a run's self-contained report.html",
                      "Rebuild RUN/report.html from the run's saved predictions: metrics, per-class table, confusion "
                      "matrix, calibration, ROC, the most confidently wrong / uncertain / correct images per class.",
                      "visiontune report runs/digits-20261125-1200")
    report.add_argument("run", type=CLASSIFIER, help=run_help)
    report.set_defaults(func=cmd_report)

    show = _command(sub, "show", "a run's summary and mistakes in the terminal; Grad-CAM and feature maps as PNG",
                    "Print a run's summary, or its most confident mistakes (images inline in iTerm2/kitty); write "
                    "Grad-CAM overlays or a layer's feature maps for images you choose.",
                    "visiontune show runs/NAME --mistakes", "visiontune show runs/NAME --gradcam cat.jpg dog.jpg",
                    "visiontune show runs/NAME --feature-maps cat.jpg --layer blocks.4")
    show.add_argument("run", nargs="+", type=CLASSIFIER, help=run_help + "; several (or a pattern such as runs/digits-*) "
                      "show one after the other")
    show.add_argument("--mistakes", action="store_true", help="the most confident mistakes (default: the summary)")
    show.add_argument("--limit", type=int, default=12, metavar="N", help="how many mistakes")
    show.add_argument("--gradcam", nargs="+", metavar="IMAGE", type=EXISTING, help="write Grad-CAM overlays of these images (PNG)")
    show.add_argument("--feature-maps", metavar="IMAGE", type=EXISTING, help="write the feature maps of --layer for this image (PNG)")
    show.add_argument("--kernels-demo", metavar="IMAGE", type=EXISTING,
                      help="what a convolution does: blur/sharpen/Sobel/emboss on this image beside the first learned filters (PNG)")
    show.add_argument("--layer", default="blocks.2", help="module name for --feature-maps, e.g. conv_stem, blocks.4")
    _add_out(show, "PNG to write (default: inside the run folder)")
    show.set_defaults(func=cmd_show)

    hard = _command(sub, "hard-examples", "training images the model gets wrong or barely right -> CSV",
                    "Score the training images with the trained model: likely label errors (confidently wrong), "
                    "wrong, and barely right. Retrain with --upweight CSV to draw them more often.",
                    "visiontune hard-examples runs/NAME", "visiontune train data/ --upweight runs/NAME/hard_examples.csv")
    hard.add_argument("run", type=CLASSIFIER, help=run_help)
    _add_out(hard, "CSV to write (default: RUN/hard_examples.csv)")
    hard.add_argument("--margin", type=float, default=0.2, metavar="X", help="barely right: top-2 margin below this")
    hard.add_argument("--confident", type=float, default=0.9, metavar="P", help="likely label error: wrong with p >= this")
    _add_inference(hard)
    hard.add_argument("--limit", type=int, default=15, metavar="N", help="rows printed")
    hard.set_defaults(func=cmd_hard_examples)

    classifier_help = "a run folder (runs/NAME), its classifier/ folder, or a saved ensemble"
    evaluate = _command(sub, "evaluate", "accuracy, per-class precision/recall/F1 and confusion matrix on labelled images",
                        "Evaluate a trained classifier on labelled images it has not seen (class folders, a train/valid "
                        "folder's valid/ part, or --labels CSV). Tables go to stdout.",
                        "visiontune evaluate runs/NAME test/", "visiontune evaluate runs/NAME test/ --tta flip --json metrics.json",
                        "visiontune evaluate runs/NAME test/ --prior estimate")
    evaluate.add_argument("classifier", type=CLASSIFIER, help=classifier_help)
    evaluate.add_argument("data", type=FOLDER, help="labelled images: one sub-folder per class (or a split folder: its valid/ part)")
    _add_labels(evaluate)
    evaluate.add_argument("--json", help="also write the metrics to this JSON file")
    _add_inference(evaluate)
    evaluate.add_argument("--prior", metavar="PRIOR", help=PRIOR_HELP)
    _add_tta(evaluate)
    evaluate.set_defaults(func=cmd_evaluate)

    predict = _command(sub, "predict", "top-k classes for images or folders -> table, CSV, JSON or a Kaggle submission",
                       "Predict the classes of image files and folders (recursively). Without --csv/--json a table "
                       "goes to stdout; unreadable files are listed and skipped.",
                       "visiontune predict runs/NAME photo.jpg more_photos/",
                       "visiontune predict runs/NAME test/ --csv preds.csv --tta flip",
                       "visiontune predict runs/NAME test/ --submission sample_submission.csv --csv submission.csv")
    predict.add_argument("classifier", type=CLASSIFIER, help=classifier_help)
    predict.add_argument("images", nargs="+", type=EXISTING, help="image files and/or folders")
    predict.add_argument("--csv", help="write predictions to this CSV instead of a table")
    predict.add_argument("--json", help="write predictions to this JSON file (array) instead of a table")
    predict.add_argument("--topk", type=int, default=3, metavar="K", help="classes per image")
    _add_inference(predict)
    predict.add_argument("--submission", metavar="SAMPLE_CSV", type=EXISTING, help="write a Kaggle submission in this sample's format")
    predict.add_argument("--prior", metavar="PRIOR", help=PRIOR_HELP)
    _add_tta(predict)
    predict.set_defaults(func=cmd_predict)

    export = _command(sub, "export", "ONNX or TorchScript file with a parity check (and int8 quantization)",
                      "Write the classifier as ONNX (or TorchScript) under RUN/export/, check it against the PyTorch "
                      "model on real validation images, and optionally write a static int8 ONNX model beside it "
                      "(with the accuracy before and after). An existing file is never overwritten: a new name is chosen.",
                      "visiontune export runs/NAME", "visiontune export runs/NAME --quantize int8",
                      "visiontune export runs/NAME --format torchscript --out model.pt")
    export.add_argument("run", type=CLASSIFIER, help=run_help)
    export.add_argument("--format", choices=["onnx", "torchscript"], default="onnx", help="file format")
    _add_out(export, "file to write (default: RUN/export/model.onnx | model.pt; the suffix is added if missing)")
    export.add_argument("--quantize", choices=["int8"], help="also write a static int8 ONNX model (calibrated on training images)")
    export.add_argument("--parity-images", type=int, default=64, metavar="N", help="validation images for the parity check")
    export.set_defaults(func=cmd_export)

    serve = _command(sub, "serve", "HTTP API and a small web page for a classifier (FastAPI + uvicorn)",
                     "Serve a classifier over HTTP. Routes: GET / (a web page to drop images on); POST /predict with "
                     "multipart file fields (or JSON {\"images\": [base64]}) -> JSON top-5 per image; GET /health; "
                     "GET /model (classes, architecture, metrics); GET /metrics (Prometheus); GET /docs (OpenAPI). "
                     "Every route but /health and the page wants `Authorization: Bearer TOKEN`: serve prints the token's "
                     "file, a curl line and the page URL with the token. Binds 127.0.0.1 by default: reachable only "
                     "from this machine.",
                     "visiontune serve runs/NAME",
                     "curl -H \"Authorization: Bearer $(cat runs/NAME/serve.token)\" -F file=@photo.jpg http://127.0.0.1:8000/predict",
                     "visiontune serve runs/NAME --host 0.0.0.0 --port 8080    # reachable from other machines")
    serve.add_argument("run", type=CLASSIFIER, help=classifier_help)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: every interface)")
    serve.add_argument("--port", type=int, default=8000, help="TCP port")
    serve.add_argument("--max-upload-mb", type=int, default=10, metavar="MB", help="larger uploads get HTTP 413")
    serve.add_argument("--max-pixels", type=int, default=40_000_000, metavar="N", help="larger images (decompression bombs) get HTTP 413")
    serve.add_argument("--max-concurrent", type=int, default=None, metavar="N", help="requests decoded and predicted at once "
                       "(default: 4 on CPU, 32 on a GPU, whose batched forward takes them together); more wait for a slot "
                       "(HTTP 503 after 30 s)")
    serve.add_argument("--max-connections", type=int, default=64, metavar="N", help="open connections; more get HTTP 503 (bounds memory: N x upload limit)")
    serve.add_argument("--body-timeout", type=float, default=10.0, metavar="S", help="an upload silent this long gets HTTP 408 (slow clients cannot hold the server)")
    serve.add_argument("--token-file", type=EXISTING, default=None, metavar="FILE", help="the bearer token callers must send "
                       "(mode 600; default: $VISIONTUNE_TOKEN, else RUN/serve.token, made on the first start)")
    serve.add_argument("--no-auth", action="store_true", help="answer every request without a token (anyone who reaches the port)")
    serve.add_argument("--ssl-certfile", type=EXISTING, default=None, metavar="PEM", help="serve https with this certificate")
    serve.add_argument("--ssl-keyfile", type=EXISTING, default=None, metavar="PEM", help="the certificate's private key")
    serve.add_argument("--access-log", default=None, metavar="FILE", help="one JSON line per request appended here (default: stderr)")
    serve.add_argument("--cors-origin", action="append", default=[], metavar="URL", help="a page served elsewhere that may call "
                       "this server (repeatable; CORS is off without it)")
    serve.add_argument("--drain-seconds", type=float, default=30.0, metavar="S", help="on SIGTERM / Ctrl-C: stop accepting, "
                       "finish accepted requests for up to S seconds, exit 0")
    _add_device(serve)
    serve.set_defaults(func=cmd_serve)

    ens = _command(sub, "ensemble", "evaluate runs and their ensemble; error correlation; save it",
                   "Evaluate several runs (same classes and preprocessing) and their ensemble on labelled images, with "
                   "the correlation of their errors; --out saves the ensemble, usable like a run.",
                   "visiontune ensemble runs/A runs/B runs/C --data test/",
                   "visiontune ensemble runs/A runs/B --data test/ --method weighted --out runs/ens")
    ens.add_argument("runs", nargs="+", type=CLASSIFIER, help="run folders (same classes and preprocessing)")
    ens.add_argument("--data", required=True, type=FOLDER, help="labelled images to evaluate on (class folders or split folder)")
    _add_labels(ens)
    ens.add_argument("--method", choices=["mean", "vote", "weighted"], default="mean", help="how the members are combined")
    _add_out(ens, "save the ensemble here")
    _add_inference(ens)
    ens.set_defaults(func=cmd_ensemble)

    split = _command(sub, "split", "make train/ and valid/ folders as links, without copying",
                     "Split a folder of class sub-folders into DST/train and DST/valid (stratified), as hard links "
                     "(symlinks across disks): nothing is copied or moved.",
                     "visiontune split data/ data_split/ --valid 0.2")
    split.add_argument("src", type=FOLDER, help="folder with one sub-folder per class")
    split.add_argument("dst", help="new folder for train/ and valid/")
    split.add_argument("--valid", type=float, default=0.2, metavar="FRACTION", help="validation fraction")
    _add_seed(split)
    split.set_defaults(func=cmd_split)

    listing = _command(sub, "backbones", "backbones loadable offline, with their measured speed here",
                       "List every backbone this install loads without a network (packaged weights, files in the weights "
                       "folder) with parameters, native input size, published ImageNet top-1 and the images/s of the "
                       "cached trunk pass at 112 and 224 px on each installed engine, measured once on this machine.",
                       "visiontune backbones", "visiontune backbones --remeasure")
    listing.add_argument("--remeasure", action="store_true", help="time every backbone again (after a hardware or library change)")
    listing.add_argument("--no-measure", action="store_true", help="list without timing what was never measured")
    listing.set_defaults(func=cmd_backbones)

    registry = _command(sub, "runs", "list runs (status, data, recipe, best metric, wall time) or compare two",
                        "List every run under DIR (default: runs/) as a table: name, start, data, backbone, recipe, "
                        "best metric, wall time and status (finished / interrupted / incomplete). `runs compare A B` "
                        "shows the config, plan and metric differences of two runs side by side. Runs are only read.",
                        "visiontune runs", "visiontune runs experiments/",
                        "visiontune runs compare runs/digits-20261125-1200 runs/digits-20261125-1300")
    registry.add_argument("items", nargs="*", metavar="DIR | compare A B",
                          help="a folder of runs (default: runs), or `compare` and two run folders")
    registry.set_defaults(func=cmd_runs)

    cache = _command(sub, "cache", "inspect, warm or clear the feature cache",
                     "The feature cache holds backbone activations keyed by image content, backbone and preprocessing, "
                     "so a second run on the same images skips the trunk pass.",
                     "visiontune cache info", "visiontune cache build data/ --img-size 112", "visiontune cache clear")
    cache.add_argument("action", choices=["info", "clear", "build"], help="info: list entries; clear: delete; build: cache DATA")
    cache.add_argument("data", nargs="?", type=FOLDER, help="with build: the images to cache (recursively)")
    cache.add_argument("--cache-dir", metavar="DIR", help="default: $VISIONTUNE_CACHE or ~/.cache/visiontune")
    _add_backbone(cache)
    _add_img_size(cache, unset="the backbone's")
    cache.add_argument("--cut", default="pooled", help="pooled | blocks.K")
    cache.add_argument("--views", type=int, default=0, metavar="N", help="augmented views per image")
    _add_engine(cache, "the trunk pass")
    cache.set_defaults(func=cmd_cache)
    return parser


def _quiet_library_warnings() -> None:
    """Library UserWarnings (torch's determinism notes, timm's deprecations) say nothing a user can act on
    and read like failures; visiontune reports its own problems as messages. VISIONTUNE_WARNINGS=1 shows them."""
    import os
    import warnings

    if os.environ.get("VISIONTUNE_WARNINGS") != "1":
        for module in ("torch", "torchvision", "timm", "onnxruntime", "onnx"):
            warnings.filterwarnings("ignore", category=UserWarning, module=module)
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=module)
            warnings.filterwarnings("ignore", category=FutureWarning, module=module)


def without_option(argv: list[str], option: str) -> list[str]:
    """`argv` without `option` and its value (`--nproc 2` or `--nproc=2`)."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(option + "="):
            kept.append(arg)
    return kept


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    _quiet_library_warnings()
    try:
        return args.func(args)
    except USER_ERRORS as err:  # soft wrap: a command inside the message stays one copyable line
        console.print("[bold red]error:[/]", escape(str(err)), soft_wrap=True, highlight=False)
        return 2
    except RunInterrupted as stop:
        import signal

        name = signal.Signals(stop.signum).name if stop.signum in signal.valid_signals() else f"signal {stop.signum}"
        console.print(f"[yellow]stopped by {name}[/]: {escape(stop.run)} keeps a checkpoint of the last finished "
                      "step (or the work written whole so far). Continue exactly where it stopped with:",
                      soft_wrap=True, highlight=False)
        console.print(f"  visiontune train --resume {escape(stop.run)}", soft_wrap=True, highlight=False)
        return 128 + stop.signum
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        return 130


if __name__ == "__main__":
    sys.exit(main())
