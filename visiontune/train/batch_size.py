"""Choosing the batch size: the notes' search by validation result, and a memory-fit search.

* :func:`search_batch_size` — "start at 128; halve or double while the validation result improves":
  try 128, then its neighbours, and keep walking towards the better one until it stops improving.
* :func:`memory_fit_batch_size` — the largest power of two whose training step fits a memory budget.
  On a CPU there is no allocator counter to ask, so the activation memory autograd keeps for the
  backward pass is measured exactly with saved-tensor hooks at two small batch sizes; parameters,
  gradients and optimizer moments add a fixed part.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import nn


def search_batch_size(score: Callable[[int], float], start: int = 128, smallest: int = 8, largest: int = 1024) -> tuple[int, dict[int, float]]:
    """(best batch size, every score tried); `score(bs)` is a validation result, higher is better."""
    tried: dict[int, float] = {}

    def value(bs: int) -> float:
        if bs not in tried:
            tried[bs] = score(bs)
        return tried[bs]

    best = start
    down, up = start // 2, start * 2
    candidates = [b for b in (down, up) if smallest <= b <= largest]
    if not candidates:
        return start, {start: value(start)}
    value(start)
    direction = max(candidates, key=value)
    if value(direction) <= value(start):
        return start, tried
    step = (lambda b: b // 2) if direction < start else (lambda b: b * 2)
    best = direction
    while smallest <= step(best) <= largest and value(step(best)) > value(best):
        best = step(best)
    return best, tried


def activation_bytes(model: nn.Module, batch: torch.Tensor) -> int:
    """Bytes of tensors autograd saves for backward during one forward pass on `batch`."""
    total = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(batch).sum()
    return total


def available_memory() -> int:
    """Bytes of physical memory currently available (Linux sysconf)."""
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def memory_fit_batch_size(
    model: nn.Module, input_size: int, budget_bytes: int | None = None, largest: int = 1024
) -> tuple[int, dict]:
    """Largest power-of-two batch whose fine-tuning step fits `budget_bytes` (default: half the free RAM)."""
    budget = budget_bytes if budget_bytes is not None else available_memory() // 2
    was_training = model.training
    model.train()
    a2 = activation_bytes(model, torch.randn(2, 3, input_size, input_size))
    a4 = activation_bytes(model, torch.randn(4, 3, input_size, input_size))
    model.train(was_training)
    per_image = max(1, (a4 - a2) // 2)
    trained = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    fixed = 3 * trained + max(0, a2 - 2 * per_image)  # gradients + two AdamW moments, per-batch constants
    size = 1
    while size * 2 <= largest and fixed + size * 2 * per_image <= budget:
        size *= 2
    return size, {"per_image_bytes": per_image, "fixed_bytes": fixed, "budget_bytes": budget}
