"""Domain-adversarial training (DANN, Ganin et al. 2016): a domain discriminator learns to tell source
from target features while a gradient-reversal layer makes the feature layers fool it. The reversal's
strength follows the paper's schedule 2 / (1 + exp(-10 p)) - 1 over training progress p, which keeps the
noisy early discriminator from wrecking the features; the discriminator is the paper's small MLP
(features -> 256 -> 1, ReLU, dropout 0.5). On cached activations the features come from the trained
tail, so the adversary shapes the retrained last block; at the ``pooled`` cut, where the features are fixed,
the discriminator reads the classifier's outputs instead."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from visiontune.adapt.common import Adaptation, aligned_layer_is_features
from visiontune.train.extra_methods import register_objective_method
from visiontune.train.objectives import ObjectiveSetup, register_objective


class GradientReversal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, strength: float) -> torch.Tensor:
        ctx.strength = strength
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return -ctx.strength * grad, None


@register_objective("dann")
class DANN(Adaptation):
    def __init__(self, setup: ObjectiveSetup):
        super().__init__(setup)
        if aligned_layer_is_features(setup.module):
            width = int(setup.module.model.num_features) if hasattr(setup.module, "model") else int(setup.module.num_features)
        else:
            width = setup.n_classes
        self.discriminator = nn.Sequential(nn.Linear(width, 256), nn.ReLU(), nn.Dropout(0.5), nn.Linear(256, 1))
        self.rampup = 0.0  # the reversal strength has its own schedule

    def modules(self) -> dict[str, nn.Module]:
        return {"discriminator": self.discriminator}

    def discrepancy(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        progress = min(1.0, self.step / max(1, self.setup.total_steps))
        strength = 2.0 / (1.0 + math.exp(-10 * progress)) - 1.0
        features = GradientReversal.apply(torch.cat([source, target]), strength)
        domains = torch.cat([torch.zeros(len(source)), torch.ones(len(target))]).to(features.device)
        return F.binary_cross_entropy_with_logits(self.discriminator(features).squeeze(-1), domains)


register_objective_method("dann", ("adapt",), order=70)
