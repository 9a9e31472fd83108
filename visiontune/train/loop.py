"""The epoch loop, shared by every phase: the tail on cached activations, fine-tuning on images, and
any method registered as an objective.

A :class:`Phase` says what trains, on which batches and for which task; its objective
(train/objectives.py) turns each batch into a loss; :func:`run_phase` steps the optimizer and schedule,
validates every epoch and emits the events the callbacks (train/callbacks.py: weight averaging,
step-wise validation, early stopping, checkpoints) attach to. Every epoch's batch order is a pure
function of (seed, epoch), so a resumed run can start in the middle of one and end bit for bit where an
uninterrupted run ends.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from visiontune import device as devices
from visiontune import distributed, stopping
from visiontune.errors import UsageError
from visiontune.files import fault_point
from visiontune.progress import console, progress_bar
from visiontune.task.kinds import Task
from visiontune.train.callbacks import Callback, ObjectiveState, default_callbacks
from visiontune.train.checkpoint import Checkpoint, Position
from visiontune.train.objectives import Batch, Objective, ObjectiveSetup, batch_size_of, make_objective, train_step
from visiontune.train.plan import Plan
from visiontune.train.schedules import make_optimizer, make_schedule

Log = Callable[[dict], None]
Batches = Callable[[int, int], Iterator[Batch]]


@dataclass
class Phase:
    """What one phase trains and on what; the loop in :func:`run_phase` does the rest."""

    name: str
    module: nn.Module  # inputs -> logits
    groups: list[dict]  # optimizer parameter groups (per-layer-group learning rates)
    epochs: int
    labels: np.ndarray  # training labels (class weights, balanced sampling, steps per epoch)
    n_classes: int
    task: Task
    batches: Batches  # (epoch, first step) -> batch dicts ({"x", "y", ...}), in the epoch's fixed order
    validate: Callable[[nn.Module], dict]  # {"valid_loss", "valid_accuracy", ...} of a module
    prepare_epoch: Callable[[int], None]  # after module.train(): frozen BatchNorm, gradual unfreezing
    batchnorms: Callable[[nn.Module], list[nn.Module]]  # the trained BN layers (SWA recomputes them)
    bn_batches: Callable[[], Iterable[torch.Tensor]] | None = None  # training inputs for that
    batch_size: int = 64
    pct_start: float = 0.3  # one-cycle warm-up fraction
    steps: int | None = None  # optimizer steps per epoch when not one pass over `labels` (unlabelled data)
    input_shape: tuple[int, ...] | None = None  # one input's shape, for methods that size a module from it
    shared: bool = False  # split over the ranks of a distributed run: `batches` yields this rank's block

    def global_batch(self, step: int) -> int:
        """Items in step `step`'s batch over all ranks (the last batch of an epoch may be short)."""
        return min(self.batch_size, len(self.labels) - step * self.batch_size)

    @property
    def steps_per_epoch(self) -> int:
        return self.steps or max(1, -(-len(self.labels) // self.batch_size))


def phase_objective(phase: Phase, plan: Plan) -> Objective:
    """The plan's objective (``--objective``, default ``supervised``) built for this phase."""
    return make_objective(plan.objective, ObjectiveSetup(
        plan, phase.task, phase.labels, phase.n_classes, phase.module, phase.epochs * phase.steps_per_epoch,
        phase.input_shape))


def epoch_order(n: int, seed: int, epoch: int, sample_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Generator]:
    """The epoch's item order (a permutation, or a class-balanced draw) and the generator it came from."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    if sample_weights is None:
        return torch.randperm(n, generator=generator), generator
    return torch.multinomial(sample_weights, n, replacement=True, generator=generator), generator


def step_module(module: nn.Module, plan: Plan, shared: bool, optimizer: torch.optim.Optimizer | None = None) -> nn.Module:
    """What a training step calls: the module, wrapped by DistributedDataParallel when the phase is shared
    (gradients averaged over ranks), compiled with `plan.compile`; either way it shares the parameters.

    DDP reduces every parameter that requires a gradient, so the ones `optimizer` does not train (the
    cached trunk inside a Tail) stop requiring one; :func:`require_grads` gives it back after the phase."""
    if shared:
        from torch.nn.parallel import DistributedDataParallel

        trained = {id(p) for group in optimizer.param_groups for p in group["params"]} if optimizer else None
        for p in module.parameters():
            if trained is not None and id(p) not in trained:
                p.requires_grad_(False)
        if not plan.bn_freeze and devices.device_of(module).kind == "cuda":
            # BatchNorm statistics that train see the whole global batch, not one GPU's slice of it (NCCL only;
            # in place: the layers keep their parameters and buffers, the optimizer its references)
            module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
        module = DistributedDataParallel(module)
    return torch.compile(module) if plan.compile else module


def require_grads(module: nn.Module, required: dict[int, bool]) -> None:
    """Restore each parameter's requires_grad as `required` (id -> flag) recorded it."""
    for p in module.parameters():
        p.requires_grad_(required.get(id(p), p.requires_grad))


def balanced_sample_weights(labels: np.ndarray) -> torch.Tensor:
    """Per-item weights 1 / count(class): every class is drawn equally often (the balanced sampler)."""
    counts = np.bincount(labels)
    return torch.from_numpy(1.0 / counts[labels]).double()


class Loop:
    """The running state of one phase, which the callbacks read and change."""

    def __init__(self, phase: Phase, plan: Plan, log: Log, metrics_lines: Callable[[], int], callbacks: list[Callback],
                 objective: Objective | None = None, precision: devices.Precision | None = None):
        self.phase, self.plan, self.log, self.metrics_lines, self.callbacks = phase, plan, log, metrics_lines, callbacks
        self.precision = precision or devices.Precision(devices.CPU, plan.amp)
        self.scaler = self.precision.scaler()  # fp16 on a GPU without bf16: gradients scaled against underflow
        self.parts = 1  # slices each batch is trained in (gradients accumulated), doubled by an out-of-memory error
        groups = list(phase.groups)
        extra = [p for module in (objective.modules().values() if objective else []) for p in module.parameters()]
        if extra:  # a method's own trainable parts (a domain discriminator, a peer head) learn at the head's rate
            groups.append({"params": extra, "lr": phase.groups[-1]["lr"]})
        self.optimizer = make_optimizer(groups, plan.optimizer, plan.weight_decay)
        self.schedule = make_schedule(
            self.optimizer, plan.schedule, phase.epochs, phase.steps_per_epoch, plan.warmup_epochs, plan.sgdr_cycle,
            plan.sgdr_mult, phase.pct_start,
        )
        self.position = Position(phase.name)
        self.extra: dict = {"stopped": False}  # counters saved with each checkpoint
        self.loss_sum, self.loss_count = 0.0, 0
        self.logged: dict[str, float] = {}  # this epoch's sums of the objective's logs
        self.evaluated: Callable[[], nn.Module] = lambda: phase.module  # the weights validation sees

    def emit(self, event: str, *args) -> None:
        for callback in self.callbacks:
            getattr(callback, event)(self, *args)

    def validation_record(self, kind: dict) -> dict:
        record = {"phase": self.phase.name, **kind, "step": self.position.global_step}
        record.update(self.phase.validate(self.evaluated()))
        record["lr"] = self.optimizer.param_groups[-1]["lr"]
        return record

    def restore(self, checkpoint: Checkpoint) -> None:
        self.position = checkpoint.position
        self.extra.update(checkpoint.position.extra)
        self.phase.module.load_state_dict(checkpoint.model)
        self.emit("restore", checkpoint)
        self.optimizer.load_state_dict(checkpoint.optimizer)
        self.schedule.load_state_dict(checkpoint.scheduler)
        self.parts = int(checkpoint.position.extra.get("micro_batches", 1))
        checkpoint.restore_rng()

    def step(self, forward: nn.Module, objective: Objective, batch: Batch, scale: float) -> tuple[float, dict]:
        """One optimizer step on `batch` (on the phase's device). A device out-of-memory error halves the
        slices the batch is trained in and retries the same step: the effective batch, and so the recipe,
        stays the same (gradient accumulation); said once, and recorded with the epoch and in checkpoints."""
        while True:
            try:
                return train_step(forward, objective, batch, self.optimizer, self.precision, scale, self.parts, self.scaler)
            except Exception as error:  # noqa: BLE001 - only out-of-memory errors are retried
                n = batch_size_of(batch)
                if not devices.is_out_of_memory(error) or self.parts >= n:
                    raise
                self.optimizer.zero_grad(set_to_none=True)
                devices.release_memory(self.precision.device)
                self.parts *= 2
                self.extra["micro_batches"] = self.parts
                console.print(f"[yellow]out of {self.precision.device.spec} memory at {n} images per step[/]: now "
                              f"{self.parts} slices of ~{-(-n // self.parts)} with their gradients accumulated (the "
                              "same effective batch); recorded as micro_batches in metrics.jsonl")


def run_phase(
    phase: Phase,
    plan: Plan,
    log: Log,
    checkpoints: Path | None = None,
    resume: Checkpoint | None = None,
    metrics_lines: Callable[[], int] = lambda: 0,
    callbacks: list[Callback] | None = None,
) -> list[dict]:
    """Train `phase.module` in place for `phase.epochs` epochs; returns the per-epoch records."""
    # subnormal floats cost x86 CPUs ~100x (see visiontune.training); onnxruntime resets this thread's mode
    torch.set_flush_denormal(True)
    objective = phase_objective(phase, plan)
    if callbacks is None:
        callbacks = default_callbacks(plan, checkpoints, [ObjectiveState(objective), *objective.callbacks()])
    module, steps = phase.module, phase.steps_per_epoch
    shared = phase.shared and distributed.active()
    if shared and (phase.steps is not None or objective.modules()):
        raise UsageError("a distributed run trains labelled images with the supervised objective; run the "
                         "unlabelled/target-domain methods in one process")
    ranks = distributed.world().size if shared else 1
    device = devices.choose(plan.device) if plan.device != "cpu" else devices.CPU
    module.to(device.torch_device)  # in place: the optimizer below and the callbacks hold the same parameters
    for extra_module in objective.state_modules().values():
        extra_module.to(device.torch_device)
    forward = None if shared else step_module(module, plan, shared=False)  # a shared one is wrapped each epoch
    loop = Loop(phase, plan, log, metrics_lines, callbacks, objective, devices.Precision(device, plan.amp))
    required = {id(p): p.requires_grad for p in module.parameters()}
    loop.emit("phase_start")
    if resume is not None:
        loop.restore(resume)
    position = loop.position
    with stopping.steps():  # a stop signal from here on waits for the step under way (visiontune/stopping.py)
        _train_epochs(loop, phase, plan, module, forward, objective, device, shared, ranks, steps, log)
    loop.emit("phase_end")
    if shared:
        require_grads(module, required)
    module.to("cpu")  # what follows (closed-form heads, saving, exporting) reads the weights on the CPU
    for extra_module in objective.state_modules().values():
        extra_module.to("cpu")
    return position.history


def _stop_if_asked(loop: Loop, shared: bool, event: str | None) -> None:
    """Stop here when a signal asked for it (every rank at the same step): `event` lets the checkpointing
    callback save this step first (None: the epoch's own checkpoint was just written)."""
    signum = stopping.agreed(shared)
    if signum:
        if event:
            loop.emit(event)
        raise stopping.StopAsked(signum)


def _train_epochs(loop: Loop, phase, plan, module, forward, objective, device, shared: bool, ranks: int, steps,
                  log) -> None:
    position = loop.position
    while position.epoch < phase.epochs and not loop.extra["stopped"]:
        epoch = position.epoch
        loop.emit("epoch_start")
        started = time.perf_counter()
        module.train()
        phase.prepare_epoch(epoch)
        if shared:  # after prepare_epoch: which parameters train may change from epoch to epoch
            forward = step_module(module, plan, shared=True, optimizer=loop.optimizer)
        resumed_here = position.step and (not shared or distributed.world().main)  # the sums are rank 0's
        loop.loss_sum = loop.extra.get("loss_sum", 0.0) if resumed_here else 0.0
        loop.loss_count = loop.extra.get("loss_count", 0) if resumed_here else 0
        # the objective's own logs (train_<name>): summed per step, carried in a mid-epoch checkpoint like the loss
        loop.logged = dict(loop.extra.get("logged", {})) if resumed_here else {}
        logged = loop.logged
        with progress_bar() as bar:
            task = bar.add_task(f"{phase.name} epoch {epoch + 1}/{phase.epochs}", total=steps, completed=position.step)
            for batch in phase.batches(epoch, position.step):
                n = batch_size_of(batch)
                whole = phase.global_batch(position.step) if shared else n
                if whole < ranks:  # an empty batch, or a shared one too small to split: every rank skips it
                    if shared:
                        position.step += 1
                        position.global_step += 1
                    continue
                objective.step = position.global_step
                loss, logs = loop.step(forward, objective, devices.move(batch, device), scale=ranks * n / whole)
                loop.schedule.step()
                loop.loss_sum += loss * n
                loop.loss_count += n
                for key, value in logs.items():
                    logged[key] = logged.get(key, 0.0) + value
                position.step += 1
                position.global_step += 1
                bar.advance(task)
                loop.emit("step_end")
                fault_point(f"step:{position.global_step}")
                _stop_if_asked(loop, shared, "stop")  # a SIGTERM / Ctrl-C: this step's checkpoint, then stop
        loop.emit("epoch_end")
        record = loop.validation_record({"epoch": epoch + 1})
        if shared:  # the epoch's loss over every rank's items
            loop.loss_sum, loop.loss_count = distributed.total(loop.loss_sum, loop.loss_count)
        record["train_loss"] = loop.loss_sum / max(loop.loss_count, 1)
        record.update({f"train_{key}": value / max(1, position.step) for key, value in logged.items()})
        if loop.parts > 1:
            record["micro_batches"] = loop.parts
        record["seconds"] = round(time.perf_counter() - started, 3)
        loop.emit("validated", record)
        log(record)
        position.history.append(record)
        position.epoch, position.step = epoch + 1, 0
        loop.emit("epoch_done")
        _stop_if_asked(loop, shared, None)  # asked during validation: the epoch's checkpoint is written
