"""Pseudo-labelling (Lee 2013): the model's own confident predictions on unlabelled images become their
labels. Here the prediction comes from the plain cached view without gradient and the loss is taken on
an augmented version, so the model learns invariance rather than to repeat itself; only predictions of
at least ``--threshold`` (0.95) count, and the term ramps up over the first ``--rampup`` (30 %) of the
steps (Lee's schedule was a ramp too: early pseudo-labels are mostly wrong)."""

from __future__ import annotations

import torch
from torch import nn

from visiontune.semi.common import SemiSupervised, confident_targets, feature_augment, masked_cross_entropy
from visiontune.train.extra_methods import register_objective_method
from visiontune.train.objectives import register_objective


@register_objective("pseudo")
class PseudoLabel(SemiSupervised):
    def unlabelled_loss(self, module: nn.Module, plain: torch.Tensor, augmented: torch.Tensor):
        with torch.no_grad():
            labels, mask, logs = confident_targets(module(plain), self.threshold)
        return masked_cross_entropy(module(feature_augment(augmented, 0.5)), labels, mask), logs


register_objective_method("pseudo", ("ssl",), order=10)
