"""Deep CORAL (Sun & Saenko 2016): align the second-order statistics of source and target features — the
squared Frobenius distance between their covariance matrices, divided by 4 d^2 as in the paper, so the
default weight 1 is on the scale of the classification loss."""

from __future__ import annotations

import torch

from visiontune.adapt.common import Adaptation
from visiontune.train.extra_methods import register_objective_method
from visiontune.train.objectives import register_objective


def coral_distance(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    d = source.shape[1]
    cs, ct = torch.cov(source.T), torch.cov(target.T)
    return ((cs - ct) ** 2).sum() / (4 * d * d)


@register_objective("coral")
class Coral(Adaptation):
    def discrepancy(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return coral_distance(source, target)


register_objective_method("coral", ("adapt",), order=10)
