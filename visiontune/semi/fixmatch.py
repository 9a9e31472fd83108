"""FixMatch (Sohn et al. 2020): the prediction on a weakly augmented view (here the plain cached view,
flipped at random) becomes a hard pseudo-label when at least ``--threshold`` (0.95, the paper's) confident,
and the model is trained to give that label to a strongly augmented view (an augmented cached view plus
feature-space augmentation at full strength). The paper uses no ramp-up (the threshold does that job),
so none is applied unless ``--rampup`` asks; the mask rate is logged as ``pseudo_fraction``."""

from __future__ import annotations

import torch
from torch import nn

from visiontune.semi.common import SemiSupervised, confident_targets, feature_augment, masked_cross_entropy
from visiontune.train.extra_methods import register_objective_method
from visiontune.train.objectives import register_objective


@register_objective("fixmatch")
class FixMatch(SemiSupervised):
    default_rampup = 0.0  # the confidence threshold does the ramp-up's job

    def unlabelled_loss(self, module: nn.Module, plain: torch.Tensor, augmented: torch.Tensor):
        with torch.no_grad():
            weak = plain.flip(-1) if plain.dim() == 4 and bool(torch.rand(()) < 0.5) else plain
            labels, mask, logs = confident_targets(module(weak), self.threshold)
        return masked_cross_entropy(module(feature_augment(augmented, 1.0)), labels, mask), logs


register_objective_method("fixmatch", ("ssl",), order=40)
