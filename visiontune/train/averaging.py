"""Weight averaging: EMA of the weights after every step, or SWA over the last epochs.

Both use torch's ``torch.optim.swa_utils`` (AveragedModel, SWALR, update_bn). EMA evaluates and ends with
the averaged weights; SWA (Izmailov et al. 2018) switches the learning rate to a constant ``swa_lr`` from
``swa_start`` (a fraction of the epochs), averages the weights at the end of each of those epochs, and
recomputes the BatchNorm statistics for the averaged weights — unless BatchNorm is frozen, where the
pretrained statistics are kept on purpose.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from visiontune.device import device_of, move
from torch import nn
from torch.optim.swa_utils import SWALR, AveragedModel, get_ema_multi_avg_fn


class Averager:
    """One of: nothing, EMA (decay in (0, 1)), SWA (from epoch `swa_start_epoch`)."""

    def __init__(self, module: nn.Module, ema: float = 0.0, swa: bool = False, swa_start_epoch: int = 0):
        self.ema, self.swa, self.swa_start_epoch = ema, swa, swa_start_epoch
        self.model: AveragedModel | None = None
        if ema > 0:
            self.model = AveragedModel(module, multi_avg_fn=get_ema_multi_avg_fn(ema), use_buffers=True)
        elif swa:
            self.model = AveragedModel(module)

    def swa_active(self, epoch: int) -> bool:
        """Whether epoch (0-based) is in the SWA part (constant SWA learning rate, averaged at its end)."""
        return self.swa and epoch >= self.swa_start_epoch

    def swa_schedule(self, optimizer: torch.optim.Optimizer, swa_lrs: list[float], steps: int) -> SWALR:
        """Anneal from the current rates to the SWA rates over `steps` steps, then hold them."""
        return SWALR(optimizer, swa_lr=swa_lrs, anneal_epochs=max(1, steps), anneal_strategy="cos")

    def after_step(self, module: nn.Module) -> None:
        if self.ema > 0:
            self.model.update_parameters(module)

    def after_epoch(self, module: nn.Module, epoch: int) -> None:
        if self.swa_active(epoch):
            self.model.update_parameters(module)

    def evaluated(self, module: nn.Module) -> nn.Module:
        """The weights to validate: the EMA copy (what will be kept), else the live module."""
        return self.model.module if self.ema > 0 else module

    def finish(
        self,
        module: nn.Module,
        bn_batches: Callable[[], Iterable[torch.Tensor]] | None = None,
        batchnorms: Callable[[nn.Module], list[nn.Module]] | None = None,
    ) -> bool:
        """Copy the averaged weights into `module`; for SWA first recompute the statistics of the BatchNorm
        layers `batchnorms(averaged copy)` lists (the trained ones; None = skip). True if anything changed."""
        if self.model is None or int(self.model.n_averaged) == 0:
            return False
        if self.swa and bn_batches is not None and batchnorms is not None:
            recompute_batchnorm(batchnorms(self.model.module), self.model.module, bn_batches())
        source = self.model.module
        with torch.no_grad():
            for live, averaged in zip(module.state_dict().values(), source.state_dict().values()):
                live.copy_(averaged)
        return True


def recompute_batchnorm(bns: list[nn.Module], module: nn.Module, batches: Iterable[torch.Tensor]) -> None:
    """torch's update_bn restricted to `bns`: the other (frozen, pretrained) BatchNorm layers keep their
    statistics, which update_bn would reset."""
    if not bns:
        return
    momenta = {bn: bn.momentum for bn in bns}
    was_training = {m: m.training for m in module.modules()}
    module.eval()
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over all batches
        bn.train()
    device = device_of(module)
    with torch.no_grad():
        for inputs in batches:
            module(move(inputs, device))
    for bn, momentum in momenta.items():
        bn.momentum = momentum
    for m, training in was_training.items():
        m.train(training)
