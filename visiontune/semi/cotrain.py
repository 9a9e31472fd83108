"""Co-training (Blum & Mitchell 1998; deep co-training, Qiao et al. 2018): two classifiers that see an
image differently teach each other. Here the second one is a linear *peer* head on the cut's own input
activations (average-pooled maps, or the pooled vector itself) — a different view of the image than the
trained tail's output. Each labels the unlabelled images it is confident about (``--threshold``) for the
other; both learn from the labelled images. The peer trains with the tail and is saved in checkpoints;
only the tail is kept as the classifier."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from visiontune.semi.common import SemiSupervised, confident_targets, feature_augment, masked_cross_entropy
from visiontune.train.extra_methods import register_objective_method
from visiontune.train.objectives import Batch, ObjectiveSetup, register_objective


class PeerHead(nn.Module):
    """Linear classifier on globally average-pooled activations (maps) or on the vector itself."""

    def __init__(self, in_features: int, n_classes: int):
        super().__init__()
        self.linear = nn.Linear(in_features, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.mean((-2, -1)) if x.dim() == 4 else x)


@register_objective("cotrain")
class CoTraining(SemiSupervised):
    def __init__(self, setup: ObjectiveSetup):
        super().__init__(setup)
        if not setup.input_shape:
            raise ValueError("co-training needs the shape of the cached activations (a cached phase)")
        self.peer = PeerHead(setup.input_shape[0], setup.n_classes)

    def modules(self) -> dict[str, nn.Module]:
        return {"peer": self.peer}

    def loss(self, module: nn.Module, batch: Batch):
        total, logs = super().loss(module, batch)
        peer_loss = F.cross_entropy(self.peer(batch["x"]).float(), batch["y"]) if batch["y"].dim() == 1 else 0.0
        return total + peer_loss, logs

    def unlabelled_loss(self, module: nn.Module, plain: torch.Tensor, augmented: torch.Tensor):
        with torch.no_grad():
            from_peer, peer_mask, peer_logs = confident_targets(self.peer(plain), self.threshold)
            from_main, main_mask, main_logs = confident_targets(module(plain), self.threshold)
        view = feature_augment(augmented, 0.5)
        loss = masked_cross_entropy(module(view), from_peer, peer_mask) + masked_cross_entropy(self.peer(view), from_main, main_mask)
        return loss, {"pseudo_fraction": peer_logs["pseudo_fraction"], "peer_pseudo_fraction": main_logs["pseudo_fraction"]}


register_objective_method("cotrain", ("ssl",), order=50)
