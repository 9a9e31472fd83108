"""The run's automatic choices, made once caching is done and before training: the LR finder, the batch-size
search, the head and the logit adjustment (on selection images), the budget's epochs, and the unlabelled /
target-domain method. Each records its reason in the plan's `why`; :func:`decide_plan` runs them in order
and writes plan.json, after which the plan does not change."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from visiontune import beyond, distributed
from visiontune.backbones.cuts import Tail
from visiontune.clock import seconds_since_process_start
from visiontune.errors import UsageError
from visiontune.pipeline.inputs import CachedInputs
from visiontune.pipeline.prepare import FINAL_OVERHEAD_S, REPORT_S, Prepared
from visiontune.pipeline.selection import Selection, tau_to_choose
from visiontune.progress import console
from visiontune.runs import RunConfig, RunDir
from visiontune.train.balance import class_prior
from visiontune.train.extra_methods import method_named
from visiontune.train.head_choice import AUTO_CANDIDATES, choose_head
from visiontune.train.phases import cached_phase, train_cached
from visiontune.train.plan import Plan, epochs_for_remaining, finetune_seconds


def choose_auto(prep: Prepared, plan: Plan, config: RunConfig, run: RunDir, inputs: CachedInputs,
                select: Selection | None) -> Plan:
    """`lr="auto"`: the LR finder on the cached phase (training loss only); `batch_size="auto"`: the notes'
    search on it, scored on the selection images carved from the training data (never the reported
    validation images), capped by the memory-fit search when fine-tuning on images follows; then the head
    and the logit adjustment (:func:`choose_on_selection`). Returns the plan with those choices."""
    task = prep.task
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
        plan = plan.chosen({"lr": f"LR finder ({found.rule}); plot: lr_find.png"}, lr=round(found.suggestion, 6))
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
            budget = prep.device.free_bytes // 2 if prep.device.accelerated and prep.device.free_bytes else None
            fit_size, memory = memory_fit_batch_size(prep.backbone.model, plan.img_size, budget)  # GPU: its free memory
            if fit_size < size:
                size, reason = fit_size, reason + f"; capped to {fit_size} by memory ({memory['per_image_bytes'] / 1e6:.1f} MB/image)"
        plan = plan.chosen({"batch_size": reason}, batch_size=size)
        console.print(f"batch size {size} ({reason})")
    if plan.head == "auto":
        return choose_on_selection(prep, plan, config, inputs, y_train, select)
    if plan.balance == "logit-adjust" and "balance_tau" not in plan.why:
        return plan.chosen({"balance_tau": "1: the Bayes-optimal shift of a calibrated model (chosen on data with --head auto)"})
    return plan


def choose_on_selection(prep: Prepared, plan: Plan, config: RunConfig, inputs: CachedInputs, y_fit: np.ndarray,
                        select: Selection | None) -> Plan:
    """`--head auto` (the plan's trained tail, or the cross-validated logistic regression when it scores
    clearly better) and the logit adjustment of imbalanced data, from trial fits on the training images
    minus the selection images, scored on the selection images. Returns the plan with both."""
    choose_tau = tau_to_choose(plan, config)
    if select is None:
        unheld = ("no images held out for choices in this run (too few, or unlabelled/target images: their method "
                  "is chosen on its own inner split)")
        plan = plan.chosen({"head": f"{unheld}: the tail trained by the loop"}, head="linear")
        return plan.chosen({"balance_tau": f"{unheld}: 1 (Bayes-optimal if calibrated)"}) if choose_tau else plan
    prior = class_prior(y_fit, len(prep.source.classes)) if choose_tau else None
    tail = Tail(prep.backbone.model, plan.cut, dropout=plan.head_dropout)
    with torch.random.fork_rng():  # the trials draw no random number the run's own training would draw
        head, tau, scores = choose_head(tail, plan, inputs.train_views, y_fit, select.rows, select.y, prep.task, prior=prior)
    shown = ", ".join(f"{name} {' / '.join(f'{k} {v:g}' for k, v in values.items())}" for name, values in scores.items())
    where = f"on the {len(select.held)} selection images ({shown})"
    verdict = "the probe scored clearly better" if head != AUTO_CANDIDATES[0] else "the plan's recipe unless the probe scores clearly better"
    plan = plan.chosen({"head": f"auto: {head} ({verdict}) {where}"}, head=head)
    console.print(f"head: {plan.why['head']}")
    if choose_tau:
        plan = plan.chosen({"balance_tau": f"the best balanced accuracy {where}"}, balance_tau=float(tau))
        console.print(f"logit adjustment: tau {tau:g}, {plan.why['balance_tau']}")
    return plan


def refit_to_budget(prep: Prepared, plan: Plan, config: RunConfig) -> Plan:
    """With a budget, re-decide the epochs once caching is done (caching time varies most)."""
    if plan.budget_s is None or prep.speed is None or config.overrides.get("epochs") is not None:
        return plan
    remaining = plan.budget_s - seconds_since_process_start() - FINAL_OVERHEAD_S - (REPORT_S if config.report else 0)
    remaining -= finetune_seconds(plan.finetune_epochs, prep.data_profile, prep.speed)  # a GPU budget's fine-tuning
    planned = plan.epochs
    epochs = epochs_for_remaining(remaining, planned, prep.data_profile, prep.speed, plan.cut)
    if remaining <= 0:
        over = -remaining
        console.print(f"[yellow]budget: caching took longer than predicted and used the whole budget ({over:.0f}s "
                      f"over); training 1 epoch only[/]")
        return plan.chosen({"epochs": f"caching used the whole budget ({over:.0f}s over): the minimum, 1 epoch"}, epochs=epochs)
    console.print(f"budget: {remaining:.0f}s left after caching -> {epochs} epochs (planned {planned})")
    return plan.chosen({"epochs": f"re-fitted after caching to the {remaining:.0f}s left (planned {planned})"}, epochs=epochs)


def choose_beyond(prep: Prepared, plan: Plan, run: RunDir, tail: Tail, inputs: CachedInputs, y_train: np.ndarray,
                  extra) -> Plan:
    """Settle `--ssl/--adapt auto` (a criterion without validation or target labels) and the objective."""
    kind = "ssl" if extra.key == "u" else "adapt"
    if getattr(plan, kind) == "auto":
        chosen, info = beyond.choose_method(kind, tail, plan, inputs.train_views, y_train, extra, prep.task)
        plan = plan.chosen({kind: f"auto: {chosen}, by {info['criterion']} (scores in auto.json)"}, **{kind: chosen})
        run.write_json("auto.json", info)
    return replace(plan, objective=method_named(getattr(plan, kind)).objective)


def decide_plan(prep: Prepared, config: RunConfig, run: RunDir, tail: Tail, inputs: CachedInputs,
                trial_inputs: CachedInputs, y_train: np.ndarray, select: Selection | None, extra) -> None:
    """Every automatic choice, in order, on rank 0 (the others receive its plan): each returns a new plan
    with its reasons; the last is written to plan.json and stays as it is for the rest of the run (a resumed
    run reads it back instead)."""
    if distributed.world().main:
        plan = prep.plan
        if select is not None:
            plan = plan.chosen({"selection": select.reason})
        plan = choose_auto(prep, plan, config, run, trial_inputs, select)
        plan = refit_to_budget(prep, plan, config)
        if extra is not None:
            plan = choose_beyond(prep, plan, run, tail, inputs, y_train, extra)
        run.write_plan(plan)
        prep.plan = plan
    prep.plan = distributed.broadcast(prep.plan)
