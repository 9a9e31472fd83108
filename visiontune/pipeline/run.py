"""One training run from a data folder to a saved classifier, read top to bottom in :func:`train_run`.

open the run -> cache the inputs -> carve selection images -> decide the plan (once) -> train (cached phase,
then fine-tuning on images) -> evaluate on the validation images -> save the classifier and the report.
Each step is a function below or a module of this package (prepare, inputs, selection, choices, finish);
the run folder is written only through :class:`~visiontune.runs.RunDir`.

In a distributed run every rank runs this: caching and the training phases are shared; rank 0 alone makes
the automatic choices (the others receive its plan), writes the run folder, and evaluates and saves the
classifier after training, when the others return.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from visiontune import beyond, distributed
from visiontune.backbones.cuts import Tail
from visiontune.backbones.heads import install_head
from visiontune.classifier import Classifier
from visiontune.clock import expect_after_phase, seconds_since_process_start
from visiontune.data.catalog import DataError
from visiontune.files import fault_point
from visiontune.pipeline.choices import decide_plan
from visiontune.pipeline.finish import Trained, apply_balance, effective_prior, extra_images, finish_beyond
from visiontune.pipeline.inputs import CachedInputs, cache_inputs, report_leakage
from visiontune.pipeline.prepare import Prepared, predicted_text
from visiontune.pipeline.selection import carve_selection
from visiontune.progress import console
from visiontune.runs import RunConfig, RunDir, Split
from visiontune.train.checkpoint import Checkpoint, load_checkpoint
from visiontune.train.extra_methods import method_named
from visiontune.train.head_choice import fit_closed_form_head
from visiontune.train.phases import finetune, pooled_features, predict_cached, train_cached
from visiontune.train.probe import FITS


def train_run(prep: Prepared, run: RunDir, config: RunConfig, resuming: bool = False) -> Classifier:
    """Cache, decide, train (cached phase, then fine-tuning), evaluate and save one run; resumable.

    config.yaml is written first; plan.json once the plan is final (after caching and the automatic
    choices), so a resumed run trains with exactly the plan it started."""
    started = time.perf_counter()
    planned = run.has_plan()
    checkpoint = open_run(prep, run, config, resuming)
    inputs, extra, skipped = cache_run_inputs(prep, run, config, resuming)
    y_train, y_valid = prep.task.targets(prep.train), prep.task.targets(prep.valid)
    install_head(prep.backbone.model, prep.plan.head)  # an MLP replaces timm's classifier; linear heads keep it
    tail = Tail(prep.backbone.model, prep.plan.cut, dropout=prep.plan.head_dropout)
    select = carve_selection(prep, config, inputs, y_train) if extra is None else None
    trial_inputs = inputs
    if select is not None:  # trials (and, for choices made during training, the run) train without them
        console.print(select.reason[0].upper() + select.reason[1:])
        trial_inputs = CachedInputs([v[select.fit] for v in inputs.train_views], inputs.valid, inputs.skipped)
    if not planned:
        decide_plan(prep, config, run, tail, inputs, trial_inputs, y_train, select, extra)
    prep.plan.freeze()  # as plan.json says, for the rest of the run
    if select is not None and select.keeps_out:
        trained = Trained(trial_inputs, y_train[select.fit], y_valid, prep.train.subset([int(i) for i in select.fit]),
                          select, skipped)
    else:  # every choice is made (or none was): the run trains on every training image
        trained = Trained(inputs, y_train, y_valid, prep.train, None, skipped)
    classifier = train_model(prep, run, config, tail, trained, extra, checkpoint)
    if not distributed.world().main:  # rank 0 evaluates and saves what every rank trained
        return classifier
    kept, probs, tuning = validation_probabilities(prep, classifier, tail, trained)
    return save_run(prep, run, config, classifier, tail, trained, extra, kept, probs, tuning, started, resuming)


def open_run(prep: Prepared, run: RunDir, config: RunConfig, resuming: bool) -> Checkpoint | None:
    """A new run writes config.yaml and profile.json; a resumed one reads its last checkpoint and forgets the
    metrics logged after it. Both print the data, the backbone and the plan (a new run: its predicted time)."""
    checkpoint = load_checkpoint(run.checkpoints) if resuming else None
    if not resuming:
        run.write_config(config, weights_source=prep.backbone.weights, weights_sha256=prep.backbone.weights_sha256 or None)
        run.write_json("profile.json", {"data": prep.data_profile.to_dict(), "speed": prep.speed.to_dict() if prep.speed else None})
    else:
        run.truncate_metrics(checkpoint.position.metrics_lines if checkpoint else 0)
        where = f"{checkpoint.position.phase} epoch {checkpoint.position.epoch + 1}, step {checkpoint.position.step}" if checkpoint else "the start"
        console.print(f"resuming {run.path} from {where}")
    console.print(
        f"[bold]{prep.source.layout}[/] layout: {len(prep.train)} train / {len(prep.valid)} valid images, "
        f"{len(prep.source.classes)} classes ({prep.task.name}); backbone {prep.backbone.arch} ({prep.backbone.weights})"
    )
    console.print(prep.plan.table())
    if not resuming:
        console.print(predicted_text(prep.predicted) + ("" if extra_images(config) is None else
                      "; the unlabelled/target images' method comes on top"))
        expect_after_phase(sum(v for k, v in prep.predicted.items() if "fine-tuning" in k or "report" in k))
    return checkpoint


def cache_run_inputs(prep: Prepared, run: RunDir, config: RunConfig, resuming: bool):
    """Trunk activations of every image (and of the unlabelled/target images); the files that failed are
    counted in skipped.txt and left out of split.json; leakage reported. A resumed run refuses data that
    changed since it started. Returns (inputs, extra images or None, skipped)."""
    expected = run.read_split() if resuming else None
    caching_started = time.perf_counter()
    inputs = cache_inputs(prep, config)
    run.write_json("timings.json", {"caching_s": round(time.perf_counter() - caching_started, 2),
                                    "processes": distributed.world().size})
    extra = None
    if extra_images(config):
        extra = beyond.cache_extra("u" if config.unlabeled else "xt", extra_images(config), prep.backbone,
                                   prep.plan, config.cache_dir, config.workers)
    skipped = list(prep.source.skipped) + inputs.skipped + (extra.skipped if extra else [])
    if expected is not None and [str(p) for p in prep.train.paths] != expected.train:
        raise DataError(f"{config.data}: the data changed since {run.path} started (its split.json differs); start a new run.")
    run.write_skipped(skipped)
    run.write_split(Split(
        [str(p) for p in prep.train.paths], [str(p) for p in prep.valid.paths], list(prep.source.classes),
        list(prep.train.labels), list(prep.valid.labels), prep.train.tags, prep.valid.tags,
    ))
    if skipped:
        console.print(f"[yellow]skipped {len(skipped)} unusable files[/] (listed in {run.file('skipped.txt')})")
    if distributed.world().main:
        report_leakage(prep, config, run)
    return inputs, extra, skipped


def train_model(prep: Prepared, run: RunDir, config: RunConfig, tail: Tail, trained: Trained, extra,
                checkpoint: Checkpoint | None) -> Classifier:
    """The plan's training: the unlabelled/target method, or the closed-form head, or the tail on cached
    activations; then fine-tuning on images when the plan unfreezes. Resumes inside whichever phase the
    checkpoint was written in."""
    plan, task, main = prep.plan, prep.task, distributed.world().main
    shared = distributed.active()
    inputs, y_train, y_valid, select = trained.inputs, trained.y_train, trained.y_valid, trained.select
    in_finetune = checkpoint is not None and checkpoint.position.phase == "finetune"
    logger = trained.logger = run.logger()
    run_options = {"phase": f"cached:{plan.cut}", "checkpoints": run.checkpoints_to_write, "resume": checkpoint,
                   "metrics_lines": run.metrics_lines, "train_paths": trained.fit_catalog.paths}
    if extra is not None:
        if extra.key == "xt":
            trained.before = beyond.domain_picture(pooled_features(tail, inputs.train_views[0]),
                                                   pooled_features(tail, extra.views[0]), plan.seed)
        # the source-only yardstick (one process: under torchrun rank 0 alone would wait on the others' gradients)
        baseline = method_named(plan.ssl or plan.adapt).baseline
        if extra.key == "xt" and config.target_labels and not baseline and not distributed.active():
            trained.yardstick = beyond.SourceOnlyYardstick.before_training(tail)
        trained.chosen = beyond.candidate(plan.ssl or plan.adapt, plan, tail, inputs.train_views[0], y_train, extra)
        beyond.train_candidate(tail, trained.chosen, inputs.train_views, y_train, inputs.valid, y_valid, extra, task, logger,
                               **run_options)
    elif not in_finetune and plan.head in FITS and main:  # the others get the head when fine-tuning syncs them
        fitted = fit_closed_form_head(tail, plan, inputs.train_views[0], y_train)
        trained.head_fit = {"head": plan.head, **fitted.info}
        logger({"phase": f"{plan.head}:{plan.cut}", "epoch": 1, **task.validate(predict_cached(tail, inputs.valid), torch.from_numpy(y_valid))})
        console.print(f"{plan.head} head fitted on the pooled features of {len(y_train)} images "
                      f"(C {fitted.info['C']:.3g} by {fitted.info['folds']}-fold cross-validation on them)")
    elif not in_finetune and plan.head not in FITS:
        train_cached(tail, inputs.train_views, y_train, inputs.valid, y_valid, plan, logger, task=task,
                     select=select.rows_and_targets() if select else None, shared=shared, **run_options)
    model = prep.backbone.model
    classifier = Classifier(model.eval(), prep.backbone.arch, prep.source.classes, prep.backbone.preprocessing,
                            run_dir=run.path, extra={"task": task.name}, device=prep.device)
    if plan.finetune_epochs > 0:
        finetune(
            model, trained.fit_catalog, prep.valid, prep.backbone.preprocessing, plan, logger, run.checkpoints_to_write,
            trained.skipped, config.workers, resume=checkpoint if in_finetune else None, metrics_lines=run.metrics_lines,
            task=task, select=select.catalog if select else None, shared=shared,
        )
        if shared:  # files that failed while another rank loaded them
            trained.skipped = list({s.path: s for part in distributed.gather(trained.skipped) for s in part}.values())
        if main:
            run.write_skipped(trained.skipped)
    return classifier


def validation_probabilities(prep: Prepared, classifier: Classifier, tail: Tail, trained: Trained):
    """(kept positions, probabilities) of the validation images, and (targets, probabilities) of the selection
    images that tune the task's decisions — after the logit adjustment is folded into the classifier. A
    fine-tuned model reads images; a tail alone reads the cached activations."""
    plan, task, select = prep.plan, prep.task, trained.select
    apply_balance(prep.backbone.model, plan, trained.y_train, len(prep.source.classes))
    if plan.finetune_epochs > 0:
        kept, probs = classifier.probabilities(prep.valid.paths, plan.batch_size)
        tuning = None
        if select is not None:
            seen, select_probs = classifier.probabilities(select.catalog.paths, plan.batch_size)
            tuning = (select.y[seen], select_probs)
        return kept, probs, tuning
    kept = np.arange(len(trained.y_valid))
    probs = task.activation(predict_cached(tail, trained.inputs.valid)).numpy()
    tuning = (select.y, task.activation(predict_cached(tail, select.rows)).numpy()) if select else None
    return kept, probs, tuning


def save_run(prep: Prepared, run: RunDir, config: RunConfig, classifier: Classifier, tail: Tail, trained: Trained, extra,
             kept: np.ndarray, probs: np.ndarray, tuning, started: float, resuming: bool) -> Classifier:
    """The task's final metrics and decisions, the classifier (last: its presence marks the run finished),
    the validation predictions and the report."""
    plan, task, classes, logger = prep.plan, prep.task, prep.source.classes, trained.logger
    targets = trained.y_valid[kept]
    fault_point("evaluation")
    metrics, decisions = task.finish(targets, probs, classes, plan, tuning)
    metrics["seconds"] = round(time.perf_counter() - started, 1)
    metrics["wall_seconds"] = round(seconds_since_process_start(), 1)
    if plan.predicted_s is not None:
        metrics["predicted_seconds"] = plan.predicted_s
    logger({"phase": "final", **{k: v for k, v in metrics.items() if not isinstance(v, (dict, list))}})
    logger.close()
    classifier.metrics = {k: v for k, v in metrics.items() if k not in ("confusion_matrix", "confusion_matrix_normalized")}
    classifier.extra = {"weights": prep.backbone.weights, "trained_on": str(Path(config.data).resolve()), "task": task.name,
                        "multi_label": task.tags, **decisions, **({"head_fit": trained.head_fit} if trained.head_fit else {})}
    if task.exclusive:  # what --prior re-weights from: the training prior, after any logit adjustment
        classifier.extra["train_prior"] = effective_prior(plan, trained.y_train, len(classes)).round(6).tolist()
    if extra is not None:
        classifier.metrics.update(finish_beyond(prep, config, run, tail, trained, extra))
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
