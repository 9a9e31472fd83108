"""What the domain-adaptation methods share: the pooled features of source and target batches, and the
labelled source loss every method keeps.

Target-domain images arrive as cached activations under the batch key ``xt`` (and ``xt_aug``); their
labels, when the user has any, are never in a batch: they are read only by evaluation afterwards.
"""

from __future__ import annotations

import torch
from torch import nn

from visiontune.semi.common import LabelledPlus
from visiontune.train.objectives import Batch


def classifier_inputs(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The features the classifier reads: a Tail's `features`, or a timm model's pre-logits."""
    if hasattr(module, "features"):
        return module.features(x)
    return module.forward_head(module.forward_features(x), pre_logits=True)


def aligned_layer_is_features(module: nn.Module) -> bool:
    """Whether the pooled features have trainable layers below them (a block cut, or fine-tuning); at the
    ``pooled`` cut they are fixed inputs, so the methods align the classifier's outputs instead — as Deep
    CORAL aligned the last layer (fc8) and DAN the last three."""
    return getattr(module, "k", 0) is not None


class Adaptation(LabelledPlus):
    """Base of the feature-alignment methods: the task's loss on labelled source images plus a ramped-up
    discrepancy between source and target representations from :meth:`discrepancy` — the pooled features,
    or the logits where the features have nothing trainable below them."""

    def loss(self, module: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        if "xt" not in batch:
            return self.supervised.loss(module, batch)
        n = len(batch["x"])
        features = classifier_inputs(module, torch.cat([batch["x"], batch["xt_aug"]]))
        logits = module.classify(features) if hasattr(module, "classify") else module.get_classifier()(features)
        labelled = self.supervised.criterion(logits[:n], batch["y"])
        aligned = features if aligned_layer_is_features(module) else logits
        gap = self.discrepancy(aligned[:n].float(), aligned[n:].float())
        weight = self.ramp()
        return labelled + weight * gap, {"discrepancy": float(gap.detach()), "weight": weight}

    def discrepancy(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError
