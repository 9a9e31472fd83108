"""The epoch loop, shared by the cached phase (tail on stored activations) and fine-tuning on images.

A :class:`Phase` says what trains and on which batches; :func:`run_phase` is the loop with the playbook's
hooks: optimizer and schedule (schedules.py), loss, mixup/cutmix and class weights (losses.py), weight
averaging (averaging.py), bf16 autocast, validation every epoch and every N steps, early stopping with
the best weights restored, and exact-resume checkpoints (checkpoint.py). Every epoch's batch order is a
pure function of (seed, epoch), so a resumed run can start in the middle of one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from visiontune.train.averaging import Averager
from visiontune.train.checkpoint import Checkpoint, Position, save_checkpoint
from visiontune.train.losses import class_weights, make_loss, mix_batch
from visiontune.train.plan import Plan
from visiontune.train.schedules import make_optimizer, make_schedule
from visiontune.progress import progress_bar

Log = Callable[[dict], None]
Batches = Callable[[int, int], Iterator[tuple[torch.Tensor, torch.Tensor]]]


@dataclass
class Phase:
    """What one phase trains and on what; the loop in :func:`run_phase` does the rest."""

    name: str
    module: nn.Module  # inputs -> logits
    groups: list[dict]  # optimizer parameter groups (per-layer-group learning rates)
    epochs: int
    labels: np.ndarray  # training labels (class weights, balanced sampling, steps per epoch)
    n_classes: int
    batches: Batches  # (epoch, first step) -> (inputs, labels), in the epoch's fixed order
    validate: Callable[[nn.Module], dict]  # {"valid_loss", "valid_accuracy"} of a module
    prepare_epoch: Callable[[int], None]  # after module.train(): frozen BatchNorm, gradual unfreezing
    batchnorms: Callable[[nn.Module], list[nn.Module]]  # the trained BN layers (SWA recomputes them)
    bn_batches: Callable[[], Iterable[torch.Tensor]] | None = None  # training inputs for that
    batch_size: int = 64
    pct_start: float = 0.3  # one-cycle warm-up fraction

    @property
    def steps_per_epoch(self) -> int:
        return max(1, -(-len(self.labels) // self.batch_size))


def epoch_order(n: int, seed: int, epoch: int, sample_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Generator]:
    """The epoch's item order (a permutation, or a class-balanced draw) and the generator it came from."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    if sample_weights is None:
        return torch.randperm(n, generator=generator), generator
    return torch.multinomial(sample_weights, n, replacement=True, generator=generator), generator


def balanced_sample_weights(labels: np.ndarray) -> torch.Tensor:
    """Per-item weights 1 / count(class): every class is drawn equally often (the balanced sampler)."""
    counts = np.bincount(labels)
    return torch.from_numpy(1.0 / counts[labels]).double()


def evaluate_logits(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    return {
        "valid_loss": float(F.cross_entropy(logits.float(), labels)),
        "valid_accuracy": float((logits.argmax(1) == labels).float().mean()),
    }


def evaluate_multilabel(logits: torch.Tensor, targets: torch.Tensor) -> dict:
    """BCE, exact-match accuracy and sample-averaged F2 at threshold 0.5 (thresholds are tuned at the end)."""
    predicted = (logits > 0).float()
    tp = (predicted * targets).sum(1)
    precision = tp / predicted.sum(1).clamp_min(1)
    recall = tp / targets.sum(1).clamp_min(1)
    f2 = (5 * precision * recall / (4 * precision + recall).clamp_min(1e-12))
    return {
        "valid_loss": float(F.binary_cross_entropy_with_logits(logits.float(), targets)),
        "valid_accuracy": float((predicted == targets).all(1).float().mean()),
        "valid_f2": float(f2.mean()),
    }


def _better(monitor: str, value: float, best: float | None) -> bool:
    if best is None:
        return True
    return value < best if monitor == "valid_loss" else value > best


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def run_phase(
    phase: Phase,
    plan: Plan,
    log: Log,
    checkpoints: Path | None = None,
    resume: Checkpoint | None = None,
    metrics_lines: Callable[[], int] = lambda: 0,
) -> list[dict]:
    """Train `phase.module` in place for `phase.epochs` epochs; returns the per-epoch records."""
    module, steps = phase.module, phase.steps_per_epoch
    forward = torch.compile(module) if plan.compile else module  # shares the parameters; state stays uncompiled
    optimizer = make_optimizer(phase.groups, plan.optimizer, plan.weight_decay)
    schedule = make_schedule(
        optimizer, plan.schedule, phase.epochs, steps, plan.warmup_epochs, plan.sgdr_cycle, plan.sgdr_mult, phase.pct_start
    )
    weight = None if plan.multi_label else class_weights(phase.labels, phase.n_classes, plan.class_weights)
    loss_fn = make_loss("bce" if plan.multi_label else plan.loss, plan.label_smoothing, plan.focal_gamma, weight)
    swa_start = min(phase.epochs - 1, int(plan.swa_start * phase.epochs))
    averager = Averager(module, plan.ema, plan.swa, swa_start)
    position = Position(phase.name)
    best: dict[str, torch.Tensor] | None = None
    extra = {"best_value": None, "bad_epochs": 0, "stopped": False, "swa_schedule": False}
    swa_lrs = [plan.swa_lr or g["lr"] * 0.1 for g in optimizer.param_groups]

    def switch_to_swa() -> None:
        nonlocal schedule
        schedule = averager.swa_schedule(optimizer, swa_lrs, steps)
        extra["swa_schedule"] = True

    if resume is not None:
        position = resume.position
        extra.update(position.extra)
        module.load_state_dict(resume.model)
        if extra["swa_schedule"]:
            switch_to_swa()
        optimizer.load_state_dict(resume.optimizer)
        schedule.load_state_dict(resume.scheduler)
        if resume.averaged is not None and averager.model is not None:
            averager.model.load_state_dict(resume.averaged)
        best = resume.best
        resume.restore_rng()

    def checkpoint() -> None:
        if checkpoints is not None:
            position.extra = dict(extra)
            position.metrics_lines = metrics_lines()
            save_checkpoint(checkpoints, position, module, optimizer, schedule, averager.model, best)

    def record_validation(kind: dict) -> dict:
        record = {"phase": phase.name, **kind, "step": position.global_step}
        record.update(phase.validate(averager.evaluated(module)))
        record["lr"] = optimizer.param_groups[-1]["lr"]
        return record

    while position.epoch < phase.epochs and not extra["stopped"]:
        epoch = position.epoch
        if averager.swa_active(epoch) and not extra["swa_schedule"]:
            switch_to_swa()
        started = time.perf_counter()
        module.train()
        phase.prepare_epoch(epoch)
        total = position.extra.get("loss_sum", 0.0) if position.step else 0.0
        count = position.extra.get("loss_count", 0) if position.step else 0
        with progress_bar() as bar:
            task = bar.add_task(f"{phase.name} epoch {epoch + 1}/{phase.epochs}", total=steps, completed=position.step)
            for inputs, labels in phase.batches(epoch, position.step):
                if len(labels) == 0:
                    continue
                inputs, targets = mix_batch(inputs, labels, phase.n_classes, plan.mixup, plan.cutmix)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=plan.amp):
                    logits = forward(inputs)
                loss = loss_fn(logits, targets if (plan.mixup or plan.cutmix) else labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                averager.after_step(module)
                total += float(loss.detach()) * len(labels)
                count += len(labels)
                position.step += 1
                position.global_step += 1
                bar.advance(task)
                if plan.eval_every and position.global_step % plan.eval_every == 0:
                    log(record_validation({"epoch": round(epoch + position.step / steps, 3), "kind": "step"}))
                    module.train()
                    phase.prepare_epoch(epoch)
                if plan.checkpoint_every and position.global_step % plan.checkpoint_every == 0:
                    extra["loss_sum"], extra["loss_count"] = total, count
                    checkpoint()
        averager.after_epoch(module, epoch)
        record = record_validation({"epoch": epoch + 1})
        record["train_loss"] = total / max(count, 1)
        record["seconds"] = round(time.perf_counter() - started, 3)
        if plan.early_stop:
            value = record[plan.monitor]
            if _better(plan.monitor, value, extra["best_value"]):
                extra["best_value"], extra["bad_epochs"] = value, 0
                best = _state(averager.evaluated(module))
            else:
                extra["bad_epochs"] += 1
                if extra["bad_epochs"] >= plan.early_stop:
                    extra["stopped"] = True
                    record["stopped_early"] = f"no better {plan.monitor} for {plan.early_stop} epochs"
        log(record)
        position.history.append(record)
        position.epoch, position.step = epoch + 1, 0
        checkpoint()
    if averager.finish(module, phase.bn_batches, phase.batchnorms):
        log(record_validation({"epoch": position.epoch, "kind": "averaged", "averaging": "ema" if plan.ema else "swa"}))
    if best is not None:
        module.load_state_dict(best)
        log({"phase": phase.name, "kind": "restored-best", "step": position.global_step, plan.monitor: extra["best_value"]})
    return position.history
