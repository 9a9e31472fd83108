"""Multi-kernel maximum mean discrepancy (DAN, Long et al. 2015): the distance between source and target
feature distributions in the space of a sum of gaussian kernels. Bandwidths: the median pairwise squared
distance of the batch times 1/4, 1/2, 1, 2 and 4 — the median heuristic spread over a factor of 16, which
is what DAN's kernel family does without a bandwidth to tune."""

from __future__ import annotations

import torch

from visiontune.adapt.common import Adaptation
from visiontune.train.extra_methods import register_objective_method
from visiontune.train.objectives import register_objective

BANDWIDTH_FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)


def mmd2(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Biased estimate of squared MK-MMD between two samples of feature rows."""
    both = torch.cat([source, target])
    squared = torch.cdist(both, both).pow(2)
    median = squared.detach().median().clamp_min(1e-6)
    kernel = sum(torch.exp(-squared / (median * f)) for f in BANDWIDTH_FACTORS) / len(BANDWIDTH_FACTORS)
    n = len(source)
    return kernel[:n, :n].mean() + kernel[n:, n:].mean() - 2 * kernel[:n, n:].mean()


@register_objective("mmd")
class MMD(Adaptation):
    def discrepancy(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return mmd2(source, target)


register_objective_method("mmd", ("adapt",), order=40)
