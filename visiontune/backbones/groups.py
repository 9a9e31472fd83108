"""Layer groups: the units that freezing, gradual unfreezing and differential learning rates act on.

Groups come from timm's ``group_matcher(coarse=True)`` (EfficientNet: stem, blocks.0 .. blocks.6 with the
conv head, classifier), ordered bottom to top; the classifier is always the top group on its own. Models
without a matcher fall back to two groups: everything else, classifier.
"""

from __future__ import annotations

import timm
from torch import nn

from visiontune.errors import UsageError


def layer_groups(model: nn.Module) -> list[list[str]]:
    """Parameter names per group, bottom (stem) to top (classifier)."""
    classifier = {f"{name}" for name, _ in _classifier_params(model)}
    if hasattr(model, "group_matcher"):
        grouped = timm.models.group_parameters(model, model.group_matcher(coarse=True))
        groups = [[n for n in grouped[k] if n not in classifier] for k in sorted(grouped)]
    else:
        groups = [[n for n, _ in model.named_parameters() if n not in classifier]]
    return [g for g in groups if g] + [sorted(classifier)]


def _classifier_params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    head = {id(p) for p in model.get_classifier().parameters()}
    return [(n, p) for n, p in model.named_parameters() if id(p) in head]


def group_index(model: nn.Module, name: str) -> int:
    """Index of the group holding the parameters of module `name` (e.g. ``blocks.5``), for --freeze-to."""
    for index, group in enumerate(layer_groups(model)):
        if any(p == name or p.startswith(name + ".") for p in group):
            return index
    raise UsageError(f"--freeze-to {name!r}: no such layer group; use a module name such as blocks.5 or conv_stem")


def group_learning_rates(n_groups: int, lr: float, lr_mult: float) -> list[float]:
    """Discriminative learning rates, bottom to top: the classifier (top) at `lr`, the body from
    lr/lr_mult (just below the head) down to lr/lr_mult**2 (the stem), geometrically.

    With lr=1e-2 and lr_mult=10 that is fast.ai's slice(1e-4, 1e-2): 1e-4 / ... / 1e-3 / 1e-2.
    """
    body = n_groups - 1
    if body <= 0:
        return [lr]
    if body == 1:
        return [lr / lr_mult, lr]
    return [lr / lr_mult ** (1 + (body - 1 - g) / (body - 1)) for g in range(body)] + [lr]


def param_groups(model: nn.Module, lr: float, lr_mult: float, trainable: set[str] | None = None) -> list[dict]:
    """Optimizer parameter groups with per-layer-group learning rates; only names in `trainable` (default all).

    Each entry carries its group index (`layer_group`) so gradual unfreezing can find it.
    """
    named = dict(model.named_parameters())
    groups = layer_groups(model)
    rates = group_learning_rates(len(groups), lr, lr_mult)
    result = []
    for index, (names, rate) in enumerate(zip(groups, rates)):
        params = [named[n] for n in names if trainable is None or n in trainable]
        if params:
            result.append({"params": params, "lr": rate, "layer_group": index})
    return result
