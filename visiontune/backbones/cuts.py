"""Cut points: split a backbone into a frozen trunk (run once, cached) and a trainable tail.

The notes' medium-data recipe trains "the last blocks + head". Running the frozen trunk once and caching
its activations makes that recipe almost as cheap as training a head: each epoch then only runs the
tail. Cut names are the tail's first module: ``pooled`` (tail = classifier only) or ``blocks.K`` (tail =
blocks K.. + conv head + pooling + classifier). The tail shares its modules with the model, so training
it trains the classifier that gets saved.
"""

from __future__ import annotations

import torch
from torch import nn

from visiontune.errors import UsageError

POOLED = "pooled"


def supports_block_cuts(model: nn.Module) -> bool:
    """EfficientNet/MobileNet-style timm models: conv_stem, bn1, blocks, conv_head, bn2."""
    return all(hasattr(model, name) for name in ("conv_stem", "bn1", "blocks", "conv_head", "bn2"))


def cut_points(model: nn.Module) -> list[str]:
    """Available cuts from the top: `pooled`, then `blocks.<last>` down to `blocks.1`."""
    cuts = [POOLED]
    if supports_block_cuts(model):
        cuts += [f"blocks.{k}" for k in range(len(model.blocks) - 1, 0, -1)]
    return cuts


def _block_index(model: nn.Module, cut: str) -> int:
    if cut not in cut_points(model):
        raise UsageError(f"unknown cut {cut!r} for {type(model).__name__}; choose from {cut_points(model)}")
    return int(cut.split(".")[1])


class Trunk(nn.Module):
    """Images -> activations at the cut (what the cache stores)."""

    def __init__(self, model: nn.Module, cut: str):
        super().__init__()
        self.model = model
        self.cut = cut
        self.k = None if cut == POOLED else _block_index(model, cut)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        if self.k is None:
            return m.forward_head(m.forward_features(x), pre_logits=True)
        x = m.bn1(m.conv_stem(x))
        for block in m.blocks[: self.k]:
            x = block(x)
        return x


class Tail(nn.Module):
    """Activations at the cut -> logits, with dropout before the classifier (head-only regulariser)."""

    def __init__(self, model: nn.Module, cut: str, dropout: float = 0.0):
        super().__init__()
        self.model = model
        self.cut = cut
        self.dropout = dropout
        self.k = None if cut == POOLED else _block_index(model, cut)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Activations at the cut -> the pooled features the classifier reads (what domain adaptation aligns)."""
        m = self.model
        if self.k is not None:
            for block in m.blocks[self.k :]:
                x = block(x)
            x = m.forward_head(m.bn2(m.conv_head(x)), pre_logits=True)
        return x

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """Pooled features -> logits (dropout first while training)."""
        features = nn.functional.dropout(features, p=self.dropout, training=self.training)
        return self.model.get_classifier()(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(x))

    def tail_modules(self) -> list[nn.Module]:
        """The modules this tail runs (the trunk's stay frozen)."""
        m = self.model
        modules: list[nn.Module] = [m.get_classifier()]
        if self.k is not None:
            modules += [*m.blocks[self.k :], m.conv_head, m.bn2]
        return modules

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for module in self.tail_modules() for p in module.parameters()]

    def batchnorms(self) -> list[nn.Module]:
        return [
            sub
            for module in self.tail_modules()
            for sub in module.modules()
            if isinstance(sub, nn.modules.batchnorm._BatchNorm)
        ]
