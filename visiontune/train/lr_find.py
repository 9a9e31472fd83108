"""The learning-rate range test (Smith 2015; fast.ai's lr_find) on a training phase.

The rate grows exponentially from `start` to `end` over `steps` optimizer steps while the training loss
is recorded; the weights are restored afterwards. The suggestion rule ("min/10"): take the loss smoothed
by a bias-corrected exponential moving average, find its minimum, and suggest a tenth of the rate there
— the last rate still clearly on the falling slope. Smoothing keeps single noisy batches from making a
false minimum, and an early spike only *raises* the curve, so unlike the steepest-slope rule (which the
drop right after a spike fools) it cannot pull the suggestion down.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from visiontune.train.callbacks import clone_state
from visiontune.train.loop import Phase, phase_objective
from visiontune.train.objectives import batch_size_of, train_step
from visiontune.train.plan import Plan
from visiontune.train.schedules import make_optimizer

RULE = "min/10: a tenth of the rate at the minimum of the smoothed loss"


@dataclass
class LRFind:
    lrs: list[float]  # the head's rate at each step
    losses: list[float]  # raw batch losses
    smoothed: list[float]
    suggestion: float
    rule: str = RULE

    def to_dict(self) -> dict:
        return {"lrs": self.lrs, "losses": self.losses, "smoothed": self.smoothed, "suggestion": self.suggestion, "rule": self.rule}


def smooth(losses: list[float], beta: float = 0.9) -> list[float]:
    """Bias-corrected exponential moving average (as Adam corrects its moments)."""
    out, avg = [], 0.0
    for i, loss in enumerate(losses, start=1):
        avg = beta * avg + (1 - beta) * loss
        out.append(avg / (1 - beta**i))
    return out


def suggest_lr(lrs: list[float], losses: list[float], beta: float = 0.9) -> tuple[float, list[float]]:
    """(suggested rate, smoothed losses) by the min/10 rule."""
    smoothed = smooth(losses, beta)
    finite = [i for i, v in enumerate(smoothed) if math.isfinite(v)]
    best = min(finite, key=lambda i: smoothed[i])
    return lrs[best] / 10, smoothed


def lr_find(phase: Phase, plan: Plan, start: float = 1e-6, end: float = 10.0, steps: int = 100, diverge: float = 4.0) -> LRFind:
    """Run the range test on `phase` (the module's weights are left as they were)."""
    module = phase.module
    saved = clone_state(module)
    rng = torch.get_rng_state()
    top = phase.groups[-1]["lr"]
    groups = [{**g, "lr": g["lr"] * start / top} for g in phase.groups]
    optimizer = make_optimizer(groups, plan.optimizer, plan.weight_decay)
    growth = (end / start) ** (1 / max(1, steps - 1))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: growth**step)
    objective = phase_objective(phase, plan)  # the same step as training: mixup, the task's loss, ...
    lrs: list[float] = []
    losses: list[float] = []
    best = math.inf
    epoch = 0
    try:
        while len(losses) < steps:
            module.train()
            phase.prepare_epoch(epoch)
            for batch in phase.batches(epoch, 0):
                if batch_size_of(batch) == 0:
                    continue
                lr = optimizer.param_groups[-1]["lr"]
                value, _ = train_step(module, objective, batch, optimizer, plan.amp)
                schedule.step()
                lrs.append(lr)
                losses.append(value)
                current = smooth(losses)[-1]
                best = min(best, current)
                if len(losses) >= steps or not math.isfinite(current) or (len(losses) > 5 and current > diverge * best):
                    break
            else:
                epoch += 1
                continue
            break
    finally:
        module.load_state_dict(saved)
        torch.set_rng_state(rng)
    suggestion, smoothed = suggest_lr(lrs, losses)
    return LRFind(lrs, losses, smoothed, float(np.float64(suggestion)))
