"""The Pi-model (Laine & Aila 2017): two stochastic versions of each unlabelled image (two augmentations,
two dropout masks) should get the same prediction; the squared difference of the two softmax outputs is
the unlabelled loss, ramped up with the sigmoid schedule. Gradients flow through both branches, as in
the paper. Its weight is on the same scale as the other methods' (``--unlabeled-weight``), multiplied by
the number of classes as the paper's MSE over class probabilities is tiny otherwise."""

from __future__ import annotations

import torch
from torch import nn

from visiontune.semi.common import SemiSupervised, feature_augment
from visiontune.train.extra_methods import register_objective_method
from visiontune.train.objectives import register_objective


@register_objective("pi")
class PiModel(SemiSupervised):
    def unlabelled_loss(self, module: nn.Module, plain: torch.Tensor, augmented: torch.Tensor):
        first = module(feature_augment(plain, 1.0)).float().softmax(-1)
        second = module(feature_augment(augmented, 1.0)).float().softmax(-1)
        return ((first - second) ** 2).sum(-1).mean(), {}


register_objective_method("pi", ("ssl",), order=20)
