"""Per-step and per-epoch extras of the epoch loop, attached as a short named list instead of wired in.

Events, in the order the loop emits them (fastai's callback events, trimmed to what is used):

=================  ==========================================================================
``phase_start``    optimizer and schedule exist; nothing trained yet (after a resume too)
``restore``        resuming: take your state back from the checkpoint (before the optimizer's)
``epoch_start``    before the epoch's first step
``step_end``       after each optimizer step and schedule step
``epoch_end``      after the epoch's last step, before it is validated
``validated``      the epoch's record is computed (may mark it, or stop the phase)
``epoch_done``     the record is logged and the position moved to the next epoch
``phase_end``      the loop is over
=================  ==========================================================================

A callback keeps its counters in ``loop.extra`` (saved with every checkpoint) and any tensors it needs
to resume in :meth:`Callback.tensors`. The defaults are :func:`default_callbacks`: weight averaging
(EMA/SWA), step-wise validation, early stopping, checkpoints — in that order, which is the order their
step_end and phase_end work must happen in.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from visiontune.train.averaging import Averager
from visiontune.train.checkpoint import Checkpoint, save_checkpoint
from visiontune.clock import expected_after_phase
from visiontune.errors import UsageError
from visiontune.progress import clock_text, console

if TYPE_CHECKING:  # the loop imports this module; the type is only for hints
    from visiontune.train.loop import Loop


def clone_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of a module's state (weights to come back to)."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


class Callback:
    """Override the events you need; every event receives the running :class:`~visiontune.train.loop.Loop`."""

    name = "callback"

    def phase_start(self, loop: Loop) -> None: ...
    def restore(self, loop: Loop, checkpoint: Checkpoint) -> None: ...
    def epoch_start(self, loop: Loop) -> None: ...
    def step_end(self, loop: Loop) -> None: ...
    def epoch_end(self, loop: Loop) -> None: ...
    def validated(self, loop: Loop, record: dict) -> None: ...
    def epoch_done(self, loop: Loop) -> None: ...
    def stop(self, loop: Loop) -> None: ...  # a signal asked the run to stop after this step (visiontune/stopping.py)
    def phase_end(self, loop: Loop) -> None: ...

    def tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        """Named state dicts to save with a checkpoint (restored by :meth:`restore`)."""
        return {}

    def replaces_weights(self, plan) -> str | None:
        """What this callback validates and leaves in the trained module's place at the end (an average, a
        teacher), named as the user asked for it; None if it leaves the trained weights. Two callbacks that
        do would overwrite each other's work: :func:`refuse_weight_clashes` stops the phase before it trains."""
        return None


def refuse_weight_clashes(callbacks: list[Callback], plan) -> None:
    """One line when two callbacks would each put their own weights in the module's place."""
    owners = [owner for owner in (cb.replaces_weights(plan) for cb in callbacks) if owner]
    if len(owners) > 1:
        raise UsageError(f"{' and '.join(owners)} each replace the trained weights with their own at the end, so one "
                         "would silently overwrite the other: keep one of them")


class WeightAveraging(Callback):
    """EMA of the weights after every step, or SWA over the last epochs (see averaging.py). With EMA the
    averaged copy is what is validated and kept."""

    name = "weight-averaging"

    def phase_start(self, loop: Loop) -> None:
        plan, phase = loop.plan, loop.phase
        self.averager = Averager(phase.module, plan.ema, plan.swa, min(phase.epochs - 1, int(plan.swa_start * phase.epochs)))
        self.swa_lrs = [plan.swa_lr or g["lr"] * 0.1 for g in loop.optimizer.param_groups]
        loop.extra.setdefault("swa_schedule", False)
        loop.evaluated = lambda: self.averager.evaluated(phase.module)

    def _switch_to_swa(self, loop: Loop) -> None:
        loop.schedule = self.averager.swa_schedule(loop.optimizer, self.swa_lrs, loop.phase.steps_per_epoch)
        loop.extra["swa_schedule"] = True

    def restore(self, loop: Loop, checkpoint: Checkpoint) -> None:
        if loop.extra["swa_schedule"]:
            self._switch_to_swa(loop)
        if "averaged" in checkpoint.parts and self.averager.model is not None:
            self.averager.model.load_state_dict(checkpoint.parts["averaged"])

    def epoch_start(self, loop: Loop) -> None:
        if self.averager.swa_active(loop.position.epoch) and not loop.extra["swa_schedule"]:
            self._switch_to_swa(loop)

    def step_end(self, loop: Loop) -> None:
        self.averager.after_step(loop.phase.module)

    def epoch_end(self, loop: Loop) -> None:
        self.averager.after_epoch(loop.phase.module, loop.position.epoch)

    def phase_end(self, loop: Loop) -> None:
        phase = loop.phase
        if self.averager.finish(phase.module, phase.bn_batches, phase.batchnorms):
            loop.log(loop.validation_record({"epoch": loop.position.epoch, "kind": "averaged",
                                             "averaging": "ema" if loop.plan.ema else "swa"}))

    def tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        return {"averaged": self.averager.model.state_dict()} if self.averager.model is not None else {}

    def replaces_weights(self, plan) -> str | None:
        return f"--ema {plan.ema:g}" if plan.ema else "--swa" if plan.swa else None


class ObjectiveState(Callback):
    """Saves and restores the objective's own modules (a discriminator, a peer head, a teacher) with
    every checkpoint, so a method with state resumes exactly."""

    name = "objective-state"

    def __init__(self, objective):
        self.objective = objective

    def restore(self, loop: Loop, checkpoint: Checkpoint) -> None:
        for name, module in self.objective.state_modules().items():
            if f"objective.{name}" in checkpoint.parts:
                module.load_state_dict(checkpoint.parts[f"objective.{name}"])

    def tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        return {f"objective.{name}": module.state_dict() for name, module in self.objective.state_modules().items()}


class StepValidation(Callback):
    """Also validate every `every` optimizer steps (--eval-every): finer curves in metrics.jsonl and tb/."""

    name = "step-validation"

    def __init__(self, every: int):
        self.every = every

    def step_end(self, loop: Loop) -> None:
        position = loop.position
        if position.global_step % self.every == 0:
            steps = loop.phase.steps_per_epoch
            loop.log(loop.validation_record({"epoch": round(position.epoch + position.step / steps, 3), "kind": "step"}))
            loop.phase.module.train()
            loop.phase.prepare_epoch(position.epoch)


class EarlyStopping(Callback):
    """Stop after `patience` epochs without a better `monitor`, then restore the best epoch's weights."""

    name = "early-stopping"

    def __init__(self, patience: int, monitor: str):
        self.patience, self.monitor = patience, monitor
        self.best: dict[str, torch.Tensor] | None = None

    def phase_start(self, loop: Loop) -> None:
        loop.extra.setdefault("best_value", None)
        loop.extra.setdefault("bad_epochs", 0)

    def restore(self, loop: Loop, checkpoint: Checkpoint) -> None:
        self.best = checkpoint.parts.get("best")

    def _better(self, value: float, best: float | None) -> bool:
        if best is None:
            return True
        return value < best if self.monitor == "valid_loss" else value > best

    def watched(self, record: dict) -> str:
        """The selection images' metric (carved from the training data) when the run has them, so that
        the epoch kept is not chosen on the validation images it is reported on."""
        inner = "select_" + self.monitor.removeprefix("valid_")
        return inner if inner in record else self.monitor

    def validated(self, loop: Loop, record: dict) -> None:
        value = record[self.watched(record)]
        if self._better(value, loop.extra["best_value"]):
            loop.extra["best_value"], loop.extra["bad_epochs"] = value, 0
            self.best = clone_state(loop.evaluated())
        else:
            loop.extra["bad_epochs"] += 1
            if loop.extra["bad_epochs"] >= self.patience:
                loop.extra["stopped"] = True
                record["stopped_early"] = f"no better {self.watched(record)} for {self.patience} epochs"

    def phase_end(self, loop: Loop) -> None:
        if self.best is not None:
            loop.phase.module.load_state_dict(self.best)
            loop.log({"phase": loop.phase.name, "kind": "restored-best", "step": loop.position.global_step,
                      self.monitor: loop.extra["best_value"]})

    def tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        return {"best": self.best} if self.best else {}


class Checkpointing(Callback):
    """Exact-resume checkpoints into `folder` after every epoch and, with `every`, every N steps."""

    name = "checkpoints"

    def __init__(self, folder: Path, every: int = 0):
        self.folder, self.every = folder, every

    def save(self, loop: Loop) -> None:
        position = loop.position
        position.extra = dict(loop.extra)
        position.metrics_lines = loop.metrics_lines()
        parts = {name: state for cb in loop.callbacks for name, state in cb.tensors().items()}
        save_checkpoint(self.folder, position, loop.phase.module, loop.optimizer, loop.schedule, parts)

    def step_end(self, loop: Loop) -> None:
        if self.every and loop.position.global_step % self.every == 0:
            self.save_mid_epoch(loop)

    def stop(self, loop: Loop) -> None:
        self.save_mid_epoch(loop)

    def save_mid_epoch(self, loop: Loop) -> None:
        """A checkpoint between two steps of an epoch: with the epoch's running sums, so a resume logs the same."""
        loop.extra["loss_sum"], loop.extra["loss_count"] = loop.loss_sum, loop.loss_count
        loop.extra["logged"] = dict(loop.logged)
        self.save(loop)

    def epoch_done(self, loop: Loop) -> None:
        self.save(loop)


#: Phases named "trial:..." are fits an automatic choice throws away (train/head_choice.py).
TRIAL = "trial:"


class EpochLine(Callback):
    """One compact line per epoch (losses, validation metrics, time) with the phase's and the run's ETA.

    The run's ETA adds :func:`visiontune.clock.expected_after_phase` (what the run predicted for the work
    after this phase: fine-tuning, evaluation, the report) to this phase's remaining epochs at the pace
    measured so far."""

    SHOWN = ("valid_loss", "valid_accuracy", "valid_balanced_accuracy", "valid_macro_f1", "valid_map")

    def phase_start(self, loop: Loop) -> None:
        self.seconds: list[float] = []

    def validated(self, loop: Loop, record: dict) -> None:
        if "epoch" not in record:  # a mid-epoch validation (--eval-every) is logged, not printed
            return
        self.seconds.append(float(record.get("seconds", 0.0)))
        epochs = loop.phase.epochs
        if loop.phase.name.startswith(TRIAL):  # a fit an automatic choice throws away: one line when done
            if record["epoch"] == epochs:
                console.print(f"{loop.phase.name}: {epochs} epochs in {sum(self.seconds):.1f}s", highlight=False)
            return
        left = (epochs - record["epoch"]) * sum(self.seconds) / len(self.seconds)
        parts = [f"{loop.phase.name} epoch {record['epoch']:>{len(str(epochs))}}/{epochs}",
                 f"train_loss {record.get('train_loss', float('nan')):.4f}"]
        parts += [f"{key} {record[key]:.4f}" for key in self.SHOWN if isinstance(record.get(key), float)]
        parts.append(f"{record.get('seconds', 0.0):.1f}s")
        eta = f"eta {clock_text(left)}"
        after = expected_after_phase()
        if after:
            eta += f" (run {clock_text(left + after)})"
        console.print("  ".join(parts + [eta]), highlight=False, soft_wrap=True)


def default_callbacks(plan, checkpoints: Path | None, method: list[Callback] | None = None) -> list[Callback]:
    """The playbook's extras the plan asks for, with the objective's own (`method`) after weight
    averaging and before validation, early stopping and checkpoints, which must see their work; the
    epoch line last, after early stopping has had its say."""
    callbacks: list[Callback] = [WeightAveraging(), *(method or [])]
    if plan.eval_every:
        callbacks.append(StepValidation(plan.eval_every))
    if plan.early_stop:
        callbacks.append(EarlyStopping(plan.early_stop, plan.monitor))
    if checkpoints is not None:
        callbacks.append(Checkpointing(checkpoints, plan.checkpoint_every))
    callbacks.append(EpochLine())
    refuse_weight_clashes(callbacks, plan)
    return callbacks
