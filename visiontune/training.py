"""One training run from a data folder to a saved classifier: the playbook read top to bottom.

catalog -> split -> backbone -> profile -> plan -> cached trunk activations -> (auto choices) -> tail on
cached activations -> (fine-tune on images) -> the task's final metrics -> classifier + report. Each step
lives in its own module; this one wires them for :func:`visiontune.api.fit` and
:func:`visiontune.api.resume`, and writes the run directory only through :class:`~visiontune.runs.RunDir`.
"""

from __future__ import annotations

import copy
import functools
import random
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from visiontune import beyond, distributed
from visiontune.backbones.cuts import Tail, cut_points
from visiontune.backbones.heads import install_head, output_layer
from visiontune.backbones.registry import Backbone, create_backbone, resolve_arch
from visiontune.cache.features import cached_activations, cached_thumbnails, trunk_engine_path, uncached_count
from visiontune.cache.store import CachedRows
from visiontune.classifier import Classifier
from visiontune.clock import expect_after_phase, seconds_since_process_start
from visiontune.data.checked import recorded_in
from visiontune.data.catalog import Catalog, DataError, Skipped, Source, discover, labelled_like
from visiontune.data.leakage import Leakage, exact_leakage, near_leakage
from visiontune.data.split import kfold_indices, split_catalog
from visiontune.inference.engines import default_engine
from visiontune.errors import UsageError
from visiontune.files import fault_point
from visiontune.locations import cache_folder
from visiontune.progress import console
from visiontune.runs import RunConfig, RunDir, Split
from visiontune.task.kinds import Task, task_for
from visiontune.train.checkpoint import load_checkpoint
from visiontune.train.balance import class_prior, shift_bias
from visiontune.train.head_choice import AUTO_CANDIDATES, choose_head, fit_closed_form_head
from visiontune.train.probe import FITS
from visiontune.train.phases import cached_phase, finetune, pooled_features, predict_cached, train_cached
from visiontune.train.plan import (
    Candidate, Plan, caching_seconds, choose_img_size, epochs_for_remaining, epoch_seconds, finetune_seconds, make_plan,
    parse_duration,
)
from visiontune.train.profile import DataProfile, SpeedProfile, profile_data, profile_speed

# Subnormal floats (the gradients and Adam statistics of a loss near 0 on easy data) cost x86 CPUs ~100x:
# an epoch went from 4 s to 55 s on a separable 2-class folder. Flush them to zero before torch starts its
# worker threads, which inherit the mode; the loop sets it again on its own thread (onnxruntime resets it).
torch.set_flush_denormal(True)

FINAL_OVERHEAD_S = 2.0  # final metrics and saving the classifier, measured ~1-2 s here
REPORT_S = 4.0  # building report.html: 3.7 s measured on the Fashion-MNIST bench (2,000 validation images)


def seed_everything(seed: int) -> None:
    """Same seed, same numbers on CPU: python, numpy and torch generators, deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


@dataclass
class Prepared:
    """Everything decided before training: data, split, task, backbone, measured profiles and the plan."""

    source: Source
    train: Catalog
    valid: Catalog
    task: Task
    backbone: Backbone
    data_profile: DataProfile
    speed: SpeedProfile | None
    plan: Plan
    predicted: dict[str, float]  # predicted seconds of each part of the run (printed before training)


def concat(a: Catalog, b: Catalog) -> Catalog:
    tags = a.tags + b.tags if a.tags is not None and b.tags is not None else None
    return Catalog(a.paths + b.paths, a.labels + b.labels, a.classes, a.skipped + b.skipped, tags=tags)


def prepare(config: RunConfig, fold: tuple[int, int] | None = None, reserve_s: float = 0.0) -> Prepared:
    """Catalog and split the data (or take fold `fold` = (k, K) of a K-fold), choose the task, load the
    backbone, measure the data (and speed) and choose the plan; a budget keeps `reserve_s` seconds for
    the work after training (the report)."""
    seed_everything(config.seed)
    arch = resolve_arch(config.arch)  # typos in the name or the budget fail before any folder is scanned
    budget_s = parse_duration(config.budget)
    overrides = {**config.overrides, **{k: None for k in config.auto}}
    with recorded_in(cache_folder(config.cache_dir)):  # the header-check record lives with --cache-dir's features
        source = discover(config.data, labels=config.labels)
    if fold is not None:
        everything = source.train if source.valid is None else concat(source.train, source.valid)
        train_idx, valid_idx = kfold_indices(everything.labels, fold[1], fold[0], config.seed)
        train_cat, valid_cat = everything.subset(train_idx), everything.subset(valid_idx)
    elif source.valid is None:
        train_cat, valid_cat = split_catalog(source.train, overrides.get("valid_fraction") or 0.2, config.seed)
        if len(valid_cat) == 0:
            raise DataError(f"{config.data}: too few images to hold any out for validation; add images per class.")
    else:
        train_cat, valid_cat = source.train, source.valid
    task = task_for(train_cat)
    backbone = create_backbone(arch, config.weights, num_classes=len(source.classes))
    native = backbone.preprocessing.input_size
    data_profile = profile_data(backbone, train_cat, len(valid_cat))
    size = overrides.get("img_size") or choose_img_size(data_profile, native)[0]
    backbone.preprocessing = backbone.preprocessing.with_size(size)
    cuts = cut_points(backbone.model)
    engine = overrides.get("engine") or default_engine()
    speed = profile_speed(backbone, train_cat, cuts[:4], engine) if budget_s is not None else None
    overrides = {**overrides, "seed": config.seed, "task": task.name}
    cache_root = cache_folder(config.cache_dir)

    @functools.cache
    def missing(cut: str, view: int | None, part: str) -> int:  # one index read per feature key, not per candidate
        paths = valid_cat.paths if part == "valid" else train_cat.paths
        return uncached_count(backbone, paths, cache_root, cut=cut, view=view, seed=config.seed, engine=engine,
                              aug=overrides.get("aug") or "light")

    def uncached(candidate: Candidate) -> int:
        """Trunk passes `candidate` still needs: the views of each image no cache shard holds yet."""
        return missing(candidate.cut, None, "valid") + sum(
            missing(candidate.cut, view, "train") for view in [None, *range(candidate.views)])

    plan = make_plan(data_profile, native, cuts, overrides, budget_s, speed, seconds_since_process_start() + reserve_s,
                     uncached, exclusive=task.exclusive)
    if speed is None:  # time this plan's parts once, so the run can say how long it will take
        timed_cuts = sorted({plan.cut, cuts[0]} if plan.finetune_epochs else {plan.cut})
        to_cache = uncached(Candidate(plan.cut, plan.views, plan.epochs))
        paths = {plan.cut: trunk_engine_path(backbone, cache_root, plan.cut, plan.engine, plan.seed)} if to_cache else {}
        with torch.random.fork_rng():  # timing train steps must not move the run's random numbers
            speed = profile_speed(backbone, train_cat, timed_cuts, plan.engine, batch=plan.batch_size, engine_paths=paths)
    predicted = predict_parts(plan, data_profile, speed, uncached, reserve_s)
    if plan.budget_s is None:
        plan.predicted_s = round(sum(predicted.values()), 1)
        plan.why["predicted_s"] = "timed batches of this data on this machine (caching, epochs, fine-tuning, report)"
    beyond.check_request(plan, config.unlabeled, config.target, task)
    beyond.settle_plan(plan, config.unlabeled, config.target)
    plan.why["task"] = task.why
    return Prepared(source, train_cat, valid_cat, task, backbone, data_profile, speed, plan, predicted)


def predict_parts(plan: Plan, data: DataProfile, speed: SpeedProfile, uncached, reserve_s: float) -> dict[str, float]:
    """Predicted seconds of each part of the run, from the speed profile and what the cache already holds."""
    candidate = Candidate(plan.cut, plan.views, plan.epochs)
    passes = uncached(candidate)
    return {"so far": seconds_since_process_start(), f"caching {passes:,} image views": caching_seconds(candidate, passes, speed),
            f"{plan.epochs} epochs on cached activations": plan.epochs * epoch_seconds(plan.cut, data, speed),
            f"{plan.finetune_epochs} fine-tuning epochs": finetune_seconds(plan.finetune_epochs, data, speed),
            "evaluation, saving and the report": FINAL_OVERHEAD_S + reserve_s}


def predicted_text(predicted: dict[str, float]) -> str:
    """'predicted time 1:18 from the start (caching 1,968 image views 0:13, 10 epochs ... 0:51, ...)': the parts that take time."""
    from visiontune.progress import clock_text

    parts = ", ".join(f"{name} {clock_text(seconds)}" for name, seconds in predicted.items()
                      if name != "so far" and seconds >= 0.5)
    return f"predicted time {clock_text(sum(predicted.values()))} from the start ({parts})"


@dataclass
class CachedInputs:
    """Trunk activations at the plan's cut: the training views (plain + augmented) and validation."""

    train_views: list[CachedRows]
    valid: CachedRows
    skipped: list[Skipped]


def report_leakage(prep: Prepared, config: RunConfig, run: RunDir) -> Leakage:
    """The same image in two classes, or on both sides of the split (byte-identical or near): printed as
    warnings and kept in `leakage.json`, so a run's numbers say what they may be inflated by."""
    found = exact_leakage(prep.train.paths, prep.train.labels, prep.valid.paths, prep.valid.labels, list(prep.source.classes))
    cache_root = cache_folder(config.cache_dir)
    found = near_leakage(found, cached_thumbnails(prep.train.paths, cache_root, "train"), prep.train.paths,
                         cached_thumbnails(prep.valid.paths, cache_root, "valid"), prep.valid.paths, seed=prep.plan.seed)
    run.write_json("leakage.json", found.to_dict())
    for line in found.lines():
        console.print(f"[yellow]{line}[/]")
    return found


def cache_inputs(prep: Prepared, config: RunConfig) -> CachedInputs:
    """Cache (or read) the activations of every image; drops the files that fail from the catalogs. In a
    distributed run the ranks share the work (cache/features.py)."""
    plan, backbone = prep.plan, prep.backbone
    cache_root = cache_folder(config.cache_dir)
    common = {"cut": plan.cut, "seed": plan.seed, "batch_size": plan.batch_size, "workers": config.workers,
              "engine": plan.engine, "shared": distributed.active()}
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
    prep.train = prep.train.subset([int(i) for i in kept_tr])
    prep.valid = prep.valid.subset([int(i) for i in kept_va])
    return CachedInputs(views, x_va, skipped)


#: Fraction of the training images held out as selection images when the run makes an automatic choice.
SELECTION_FRACTION = 0.15


@dataclass
class Selection:
    """Training images set aside for the run's automatic choices (early stopping's epoch, the batch-size
    search, the head, multi-label thresholds), so that none is made on the validation images the run
    reports on. Choices made before training (batch size, head) are scored on `held` after trial fits on
    `fit`, and the run then trains on every training image; choices made during or after training (early
    stopping, thresholds) keep `held` out of training for good (`keeps_out`)."""

    fit: np.ndarray  # positions in the training catalog the trials (and, with keeps_out, the run) train on
    held: np.ndarray  # positions of the selection images
    rows: object  # cached activations of the selection images (plain view)
    y: np.ndarray  # their targets
    catalog: Catalog  # their files (fine-tuning validates on images)
    reason: str
    keeps_out: bool = True

    def rows_and_targets(self) -> tuple:
        return self.rows, self.y


def carve_selection(prep: Prepared, config: RunConfig, inputs: CachedInputs, y_train: np.ndarray) -> Selection | None:
    """A stratified SELECTION_FRACTION of the training images when the plan makes a choice on data, else None."""
    plan = prep.plan
    during = [name for name, needed in (
        ("the early-stopping epoch", plan.early_stop > 0), ("the decision thresholds", prep.task.tunes_decisions),
    ) if needed]
    before = [name for name, needed in (
        ("the batch size", "batch_size" in config.auto), ("the classifier head", plan.head == "auto"),
        ("the logit adjustment", tau_to_choose(plan, config)),
    ) if needed]
    if not during + before:
        return None
    from visiontune.data.split import stratified_split

    fit, held = (np.asarray(part, dtype=np.int64) for part in stratified_split(prep.train.labels, SELECTION_FRACTION, plan.seed + 1))
    if len(held) == 0 or len(fit) == 0:
        return None
    reason = (f"{' and '.join(during + before)} chosen on {len(held)} images carved from the training images "
              f"({SELECTION_FRACTION:.0%}, stratified), never on the reported validation images")
    reason += "; not trained on" if during else "; the run then trains on every training image"
    return Selection(fit, held, inputs.train_views[0][held], y_train[held], prep.train.subset([int(i) for i in held]),
                     reason, keeps_out=bool(during))


def choose_auto(prep: Prepared, config: RunConfig, run: RunDir, inputs: CachedInputs, select: Selection | None) -> None:
    """`lr="auto"`: the LR finder on the cached phase (training loss only); `batch_size="auto"`: the notes'
    search on it, scored on the selection images carved from the training data (never the reported
    validation images), capped by the memory-fit search when fine-tuning on images follows."""
    plan, task = prep.plan, prep.task
    if "batch_size" in config.auto and select is None:
        raise UsageError(f"--batch-size auto needs a few training images per class to hold out for the search; "
                         f"{len(prep.train)} are too few: give a number (e.g. --batch-size {plan.batch_size})")
    y_train = task.targets(prep.train)[select.fit] if select is not None else task.targets(prep.train)
    y_valid = task.targets(prep.valid)
    if "lr" in config.auto:
        from visiontune.report.plots import plot_lr_find
        from visiontune.train.lr_find import lr_find

        tail = Tail(prep.backbone.model, plan.cut, dropout=plan.head_dropout)
        found = lr_find(cached_phase(tail, inputs.train_views, y_train, inputs.valid, y_valid, plan, task=task), plan)
        plot_lr_find(found, run.file("lr_find.png"))
        run.write_json("lr_find.json", found.to_dict())
        plan.lr = round(found.suggestion, 6)
        plan.why["lr"] = f"LR finder ({found.rule}); plot: lr_find.png"
        console.print(f"LR finder suggests {plan.lr:.2g} ({found.rule})")
    if "batch_size" in config.auto:
        from visiontune.train.batch_size import memory_fit_batch_size, search_batch_size

        def score(size: int) -> float:
            trial = replace(plan, batch_size=size, early_stop=0, checkpoint_every=0, eval_every=0, why={})
            tail = Tail(prep.backbone.model, plan.cut, dropout=plan.head_dropout)
            saved = {k: v.clone() for k, v in tail.model.state_dict().items()}
            history = train_cached(tail, inputs.train_views, y_train, select.rows[:0], y_valid[:0], trial,
                                   lambda r: None, "batch-size", task=task, select=select.rows_and_targets())
            tail.model.load_state_dict(saved)
            return history[-1].get("select_accuracy", 0.0)

        size, tried = search_batch_size(score, smallest=8, largest=max(8, len(y_train)))
        reason = (f"inner-validation accuracy ({len(select.held)} training images held out) by batch size "
                  + ", ".join(f"{b}: {v:.4f}" for b, v in sorted(tried.items())))
        if plan.finetune_epochs > 0:
            fit_size, memory = memory_fit_batch_size(prep.backbone.model, plan.img_size)
            if fit_size < size:
                size, reason = fit_size, reason + f"; capped to {fit_size} by memory ({memory['per_image_bytes'] / 1e6:.1f} MB/image)"
        plan.batch_size = size
        plan.why["batch_size"] = reason
        console.print(f"batch size {size} ({reason})")
    if plan.head == "auto":
        choose_on_selection(prep, config, inputs, y_train, select)
    elif plan.balance == "logit-adjust" and "balance_tau" not in plan.why:
        plan.why["balance_tau"] = "1: the Bayes-optimal shift of a calibrated model (chosen on data with --head auto)"


def tau_to_choose(plan: Plan, config: RunConfig) -> bool:
    """The logit adjustment's strength is chosen on the selection images when the head's trial runs anyway
    (`--head auto`) and you did not set it (--balance-tau); otherwise it stays at 1, the Bayes-optimal shift
    of a calibrated model (no extra trial training on larger data)."""
    return plan.balance == "logit-adjust" and plan.head == "auto" and config.overrides.get("balance_tau") is None


def choose_on_selection(prep: Prepared, config: RunConfig, inputs: CachedInputs, y_fit: np.ndarray,
                        select: Selection | None) -> None:
    """`--head auto` (the plan's trained tail, or the cross-validated logistic regression when it scores
    clearly better) and the logit adjustment of imbalanced data, from trial fits on the training images
    minus the selection images, scored on the selection images."""
    plan = prep.plan
    choose_tau = tau_to_choose(plan, config)
    if select is None:
        unheld = ("no images held out for choices in this run (too few, or unlabelled/target images: their method "
                  "is chosen on its own inner split)")
        plan.head, plan.why["head"] = "linear", f"{unheld}: the tail trained by the loop"
        if choose_tau:
            plan.why["balance_tau"] = f"{unheld}: 1 (Bayes-optimal if calibrated)"
        return
    prior = class_prior(y_fit, len(prep.source.classes)) if choose_tau else None
    tail = Tail(prep.backbone.model, plan.cut, dropout=plan.head_dropout)
    with torch.random.fork_rng():  # the trials draw no random number the run's own training would draw
        head, tau, scores = choose_head(tail, plan, inputs.train_views, y_fit, select.rows, select.y, prep.task, prior=prior)
    shown = ", ".join(f"{name} {' / '.join(f'{k} {v:g}' for k, v in values.items())}" for name, values in scores.items())
    where = f"on the {len(select.held)} selection images ({shown})"
    verdict = "the probe scored clearly better" if head != AUTO_CANDIDATES[0] else "the plan's recipe unless the probe scores clearly better"
    plan.head, plan.why["head"] = head, f"auto: {head} ({verdict}) {where}"
    console.print(f"head: {plan.why['head']}")
    if choose_tau:
        plan.balance_tau = float(tau)
        plan.why["balance_tau"] = f"the best balanced accuracy {where}"
        console.print(f"logit adjustment: tau {tau:g}, {plan.why['balance_tau']}")


def refit_to_budget(prep: Prepared, config: RunConfig) -> None:
    """With a budget, re-decide the epochs once caching is done (caching time varies most)."""
    plan = prep.plan
    if plan.budget_s is None or prep.speed is None or config.overrides.get("epochs") is not None:
        return
    remaining = plan.budget_s - seconds_since_process_start() - FINAL_OVERHEAD_S - (REPORT_S if config.report else 0)
    planned = plan.epochs
    plan.epochs = epochs_for_remaining(remaining, planned, prep.data_profile, prep.speed, plan.cut)
    if remaining <= 0:
        over = -remaining
        plan.why["epochs"] = f"caching used the whole budget ({over:.0f}s over): the minimum, 1 epoch"
        console.print(f"[yellow]budget: caching took longer than predicted and used the whole budget ({over:.0f}s "
                      f"over); training 1 epoch only[/]")
    else:
        plan.why["epochs"] = f"re-fitted after caching to the {remaining:.0f}s left (planned {planned})"
        console.print(f"budget: {remaining:.0f}s left after caching -> {plan.epochs} epochs (planned {planned})")


def train_run(prep: Prepared, run: RunDir, config: RunConfig, resuming: bool = False) -> Classifier:
    """Cache, train (cached phase, then fine-tuning), evaluate and save one run; resumable.

    config.yaml is written first; plan.json once the plan is final (after caching and the automatic
    choices), so a resumed run trains with exactly the plan it started.

    In a distributed run every rank runs this: caching and the training phases are shared; rank 0 alone
    makes the automatic choices (the others receive its plan), writes the run folder, and evaluates and
    saves the classifier after training, when the others return."""
    started = time.perf_counter()
    shared, main = distributed.active(), distributed.world().main
    planned = run.has_plan()
    backbone, classes, task = prep.backbone, prep.source.classes, prep.task
    checkpoint = load_checkpoint(run.checkpoints) if resuming else None
    expected = run.read_split() if resuming else None
    if not resuming:
        run.write_config(config, weights_source=backbone.weights, weights_sha256=backbone.weights_sha256 or None)
        run.write_json("profile.json", {"data": prep.data_profile.to_dict(), "speed": prep.speed.to_dict() if prep.speed else None})
    else:
        run.truncate_metrics(checkpoint.position.metrics_lines if checkpoint else 0)
        where = f"{checkpoint.position.phase} epoch {checkpoint.position.epoch + 1}, step {checkpoint.position.step}" if checkpoint else "the start"
        console.print(f"resuming {run.path} from {where}")
    console.print(
        f"[bold]{prep.source.layout}[/] layout: {len(prep.train)} train / {len(prep.valid)} valid images, "
        f"{len(classes)} classes ({task.name}); backbone {backbone.arch} ({backbone.weights})"
    )
    console.print(prep.plan.table())
    if not resuming:
        console.print(predicted_text(prep.predicted) + ("" if extra_images(config) is None else
                      "; the unlabelled/target images' method comes on top"))
        expect_after_phase(sum(v for k, v in prep.predicted.items() if "fine-tuning" in k or "report" in k))
    caching_started = time.perf_counter()
    inputs = cache_inputs(prep, config)
    run.write_json("timings.json", {"caching_s": round(time.perf_counter() - caching_started, 2),
                                    "processes": distributed.world().size})
    extra = None
    if extra_images(config):
        extra = beyond.cache_extra("u" if config.unlabeled else "xt", extra_images(config), backbone,
                                   prep.plan, config.cache_dir, config.workers)
    skipped = list(prep.source.skipped) + inputs.skipped + (extra.skipped if extra else [])
    if expected is not None and [str(p) for p in prep.train.paths] != expected.train:
        raise DataError(f"{config.data}: the data changed since {run.path} started (its split.json differs); start a new run.")
    run.write_skipped(skipped)
    run.write_split(Split(
        [str(p) for p in prep.train.paths], [str(p) for p in prep.valid.paths], list(classes),
        list(prep.train.labels), list(prep.valid.labels), prep.train.tags, prep.valid.tags,
    ))
    if skipped:
        console.print(f"[yellow]skipped {len(skipped)} unusable files[/] (listed in {run.file('skipped.txt')})")
    if main:
        report_leakage(prep, config, run)
    y_train, y_valid = task.targets(prep.train), task.targets(prep.valid)
    model = backbone.model
    install_head(model, prep.plan.head)  # an MLP replaces timm's classifier; linear heads keep it
    tail = Tail(model, prep.plan.cut, dropout=prep.plan.head_dropout)
    select = carve_selection(prep, config, inputs, y_train) if extra is None else None
    trial_inputs = inputs
    if select is not None:  # trials (and, for choices made during training, the run) train without them
        console.print(select.reason[0].upper() + select.reason[1:])
        trial_inputs = CachedInputs([v[select.fit] for v in inputs.train_views], inputs.valid, inputs.skipped)
    if not planned:
        if main:  # trials run on rank 0 only; the others wait for the plan they chose
            if select is not None:
                prep.plan.why["selection"] = select.reason
            choose_auto(prep, config, run, trial_inputs, select)
            refit_to_budget(prep, config)
            if extra is not None:
                choose_beyond(prep, run, tail, inputs, y_train, extra)
            run.write_plan(prep.plan)
        prep.plan = distributed.broadcast(prep.plan)
    plan = prep.plan
    fit_catalog = prep.train
    if select is not None and select.keeps_out:
        inputs, y_train, fit_catalog = trial_inputs, y_train[select.fit], prep.train.subset([int(i) for i in select.fit])
    elif select is not None:  # every choice is made: the run trains on every training image
        select = None
    head_fit: dict = {}
    before = beyond.domain_picture(pooled_features(tail, inputs.train_views[0]), pooled_features(tail, extra.views[0]), plan.seed) \
        if extra is not None and extra.key == "xt" else None

    in_finetune = checkpoint is not None and checkpoint.position.phase == "finetune"
    logger = run.logger()
    run_options = {"phase": f"cached:{plan.cut}", "checkpoints": run.checkpoints_to_write, "resume": checkpoint,
                   "metrics_lines": run.metrics_lines, "train_paths": fit_catalog.paths}
    reference = None
    if extra is not None:
        method = plan.ssl or plan.adapt
        # the source-only yardstick (one process: under torchrun rank 0 alone would wait on the others' gradients)
        if extra.key == "xt" and config.target_labels and method != "none" and not distributed.active():
            reference = functools.partial(beyond.source_only_reference, tail, copy.deepcopy(tail.model.state_dict()),
                                          torch.get_rng_state(), plan, inputs.train_views, y_train, inputs.valid, y_valid, task)
        chosen = beyond.candidate(method, plan, tail, inputs.train_views[0], y_train, extra)
        beyond.train_candidate(tail, chosen, inputs.train_views, y_train, inputs.valid, y_valid, extra, task, logger, **run_options)
    elif not in_finetune and plan.head in FITS and main:  # the others get the head when fine-tuning syncs them
        fitted = fit_closed_form_head(tail, plan, inputs.train_views[0], y_train)
        head_fit = {"head": plan.head, **fitted.info}
        logger({"phase": f"{plan.head}:{plan.cut}", "epoch": 1, **task.validate(predict_cached(tail, inputs.valid), torch.from_numpy(y_valid))})
        console.print(f"{plan.head} head fitted on the pooled features of {len(y_train)} images "
                      f"(C {fitted.info['C']:.3g} by {fitted.info['folds']}-fold cross-validation on them)")
    elif not in_finetune and plan.head not in FITS:
        train_cached(tail, inputs.train_views, y_train, inputs.valid, y_valid, plan, logger, task=task,
                     select=select.rows_and_targets() if select else None, shared=shared, **run_options)
    classifier = Classifier(model.eval(), backbone.arch, classes, backbone.preprocessing, run_dir=run.path,
                            extra={"task": task.name})
    if plan.finetune_epochs > 0:
        finetune(
            model, fit_catalog, prep.valid, backbone.preprocessing, plan, logger, run.checkpoints_to_write, skipped,
            config.workers, resume=checkpoint if in_finetune else None, metrics_lines=run.metrics_lines, task=task,
            select=select.catalog if select else None, shared=shared,
        )
        if shared:  # files that failed while another rank loaded them
            skipped = list({s.path: s for part in distributed.gather(skipped) for s in part}.values())
        if not main:  # rank 0 evaluates and saves what every rank trained
            return classifier
        run.write_skipped(skipped)
        apply_balance(model, plan, y_train, len(classes))
        kept, probs = classifier.probabilities(prep.valid.paths, plan.batch_size)
        tuning = None
        if select is not None:
            seen, select_probs = classifier.probabilities(select.catalog.paths, plan.batch_size)
            tuning = (select.y[seen], select_probs)
    elif not main:
        return classifier
    else:
        apply_balance(model, plan, y_train, len(classes))
        kept = np.arange(len(y_valid))
        probs = task.activation(predict_cached(tail, inputs.valid)).numpy()
        tuning = (select.y, task.activation(predict_cached(tail, select.rows)).numpy()) if select else None
    targets = y_valid[kept]
    fault_point("evaluation")
    metrics, decisions = task.finish(targets, probs, classes, plan, tuning)
    metrics["seconds"] = round(time.perf_counter() - started, 1)
    metrics["wall_seconds"] = round(seconds_since_process_start(), 1)
    if plan.predicted_s is not None:
        metrics["predicted_seconds"] = plan.predicted_s
    logger({"phase": "final", **{k: v for k, v in metrics.items() if not isinstance(v, (dict, list))}})
    logger.close()
    classifier.metrics = {k: v for k, v in metrics.items() if k not in ("confusion_matrix", "confusion_matrix_normalized")}
    classifier.extra = {"weights": backbone.weights, "trained_on": str(Path(config.data).resolve()), "task": task.name,
                        "multi_label": task.tags, **decisions, **({"head_fit": head_fit} if head_fit else {})}
    if task.exclusive:  # what --prior re-weights from: the training prior, after any logit adjustment
        classifier.extra["train_prior"] = effective_prior(plan, y_train, len(classes)).round(6).tolist()
    if extra is not None:
        classifier.metrics.update(finish_beyond(prep, config, run, tail, chosen, inputs.train_views[0], extra, before,
                                                   reference))
    run.save_predictions(kept, probs, targets)
    classifier.save(run.classifier_dir)  # last: a complete classifier/ marks the run finished (api.resume)
    if config.report:
        from visiontune.report.html import build_report

        report_started = time.perf_counter()
        console.print(f"report: {build_report(run.path)} ({time.perf_counter() - report_started:.1f}s)")
    if plan.predicted_s is not None and not resuming:
        budget = f" (budget {plan.budget_s:.0f}s)" if plan.budget_s is not None else ""
        console.print(f"time since start: predicted {plan.predicted_s:.1f}s, actual {seconds_since_process_start():.1f}s{budget}")
    return classifier


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


def choose_beyond(prep: Prepared, run: RunDir, tail: Tail, inputs: CachedInputs, y_train: np.ndarray, extra) -> None:
    """Settle `--ssl/--adapt auto` (a criterion without validation or target labels) and the objective."""
    plan = prep.plan
    kind = "ssl" if extra.key == "u" else "adapt"
    if getattr(plan, kind) == "auto":
        chosen, info = beyond.choose_method(kind, tail, plan, inputs.train_views, y_train, extra, prep.task)
        setattr(plan, kind, chosen)
        plan.why[kind] = f"auto: {chosen}, by {info['criterion']} (scores in auto.json)"
        run.write_json("auto.json", info)
    method = getattr(plan, kind)
    plan.objective = method if method not in beyond.NOT_OBJECTIVES else "supervised"


def finish_beyond(prep: Prepared, config: RunConfig, run: RunDir, tail: Tail, chosen: beyond.Candidate, source_rows,
                  extra, before, reference=None) -> dict:
    """After training: the target evaluation (the only read of target labels) and the domain picture in the
    features the classifier reads, the source as the method trained on it (:meth:`beyond.Candidate.features_seen`).
    `reference` (:func:`beyond.source_only_reference`, bound to the weights before training) scores the same run
    without adaptation on the labelled target images, with a warning when the method is more than a point below."""
    plan, summary = prep.plan, {"method": plan_method(prep.plan), "extra_images": len(extra.catalog)}
    if extra.key == "xt":
        after = beyond.domain_picture(*chosen.features_seen(tail, source_rows, extra.views[0]), plan.seed)
        report = {"before": before, "after": after}
        if config.target_labels:
            catalog = labelled_like(config.target_labels, list(prep.source.classes))
            evaluate = functools.partial(beyond.evaluate_target, tail, catalog, prep.backbone, plan, list(prep.source.classes),
                                         config.cache_dir, config.workers)
            metrics = evaluate()
            report["target"] = {k: v for k, v in metrics.items() if k != "confusion_matrix_normalized"}
            summary["target_accuracy"] = metrics["accuracy"]
            console.print(f"[bold]target accuracy {metrics['accuracy']:.4f}[/] on {metrics['n']} labelled target images")
            if reference is not None:
                base = reference(evaluate)["accuracy"]
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


def fit_folds(config: RunConfig, out: str | Path | None, runs_root: Path) -> Classifier:
    """K models on a stratified K-fold; each fold is a run under the parent run folder."""
    from visiontune.ensemble import Ensemble

    folds = config.folds
    parent = RunDir.create(out, Path(config.data).resolve().name or "data", runs_root)
    parent.write_config(config)
    members = []
    for k in range(folds):
        console.rule(f"fold {k + 1}/{folds}")
        prep = prepare(config, fold=(k, folds))
        run = RunDir.create(parent.path / f"fold-{k + 1}", "fold", runs_root)
        members.append(train_run(prep, run, config))
    summary: dict = {"folds": folds}
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "log_loss"):
        values = [float(m.metrics[key]) for m in members if key in m.metrics]
        summary[key] = values
        summary[f"{key}_mean"], summary[f"{key}_std"] = float(np.mean(values)), float(np.std(values))
    parent.write_json("folds.json", summary)
    console.print(
        f"[bold]{folds}-fold validation accuracy {summary['accuracy_mean']:.4f} ± {summary['accuracy_std']:.4f}[/]"
    )
    ensemble = Ensemble.from_members(members, run_dir=parent.path)
    ensemble.metrics = summary
    return ensemble
