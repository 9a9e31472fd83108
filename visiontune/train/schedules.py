"""Optimizers and learning-rate schedules, all torch's own, stepped once per optimizer step.

* ``onecycle`` (default): Smith's one-cycle, warm-up then cosine annealing (torch ``OneCycleLR``).
* ``cosine``: optional linear warm-up, then cosine annealing to zero (``LinearLR`` + ``CosineAnnealingLR``).
* ``sgdr``: cosine with warm restarts (``CosineAnnealingWarmRestarts``): first cycle ``sgdr_cycle`` epochs,
  each next one ``sgdr_mult`` times longer — the notes' SGDR with cycle_len / cycle_mult.
* ``constant``: optional warm-up, then flat.
"""

from __future__ import annotations

import torch
from torch.optim import lr_scheduler as L

from visiontune.errors import UsageError

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("onecycle", "cosine", "sgdr", "constant")


def make_optimizer(groups: list[dict], name: str, weight_decay: float, momentum: float = 0.9) -> torch.optim.Optimizer:
    """AdamW (decoupled weight decay), or SGD with Nesterov momentum and L2 weight decay."""
    if name == "adamw":
        return torch.optim.AdamW(groups, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=groups[0]["lr"], momentum=momentum, nesterov=True, weight_decay=weight_decay)
    raise UsageError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")


def make_schedule(
    optimizer: torch.optim.Optimizer,
    name: str,
    epochs: int,
    steps_per_epoch: int,
    warmup_epochs: float = 0.0,
    sgdr_cycle: int = 0,
    sgdr_mult: int = 2,
    pct_start: float = 0.3,
) -> L.LRScheduler:
    """A per-step scheduler over `epochs` x `steps_per_epoch` steps; peaks are the groups' `lr`."""
    total = max(1, epochs * steps_per_epoch)
    warmup = min(total - 1, int(round(warmup_epochs * steps_per_epoch)))
    if name == "onecycle":
        peaks = [g["lr"] for g in optimizer.param_groups]
        if abs(pct_start * total - 1) < 1e-9:  # torch divides by (pct_start * total - 1): 5 steps at 0.2 crashed
            pct_start += 0.5 / total
        return L.OneCycleLR(optimizer, max_lr=peaks, total_steps=total, pct_start=pct_start)
    if name == "cosine":
        main = L.CosineAnnealingLR(optimizer, T_max=total - warmup)
    elif name == "sgdr":
        cycle = (sgdr_cycle or max(1, epochs // 3)) * steps_per_epoch
        main = L.CosineAnnealingWarmRestarts(optimizer, T_0=max(1, cycle), T_mult=max(1, int(sgdr_mult)))
    elif name == "constant":
        main = L.ConstantLR(optimizer, factor=1.0, total_iters=0)
    else:
        raise UsageError(f"unknown schedule {name!r}; choose from {', '.join(SCHEDULES)}")
    if warmup <= 0:
        return main
    ramp = L.LinearLR(optimizer, start_factor=1e-3, end_factor=1.0, total_iters=warmup)
    return L.SequentialLR(optimizer, [ramp, main], milestones=[warmup])
