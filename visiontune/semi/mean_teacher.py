"""Mean teacher (Tarvainen & Valpola 2017): a teacher whose weights are an exponential moving average of
the student's (decay ``--teacher-ema`` 0.99: the paper's value during ramp-up; averaging over ~100 steps
suits runs of hundreds of steps) gives the targets; the student is pulled towards the teacher's softmax
on a differently augmented version of each unlabelled image (squared error, ramped up). The teacher is
what is validated and kept: the paper reports it as the better model."""

from __future__ import annotations

import copy

import torch
from torch import nn

from visiontune.semi.common import SemiSupervised, feature_augment
from visiontune.train.callbacks import Callback
from visiontune.train.extra_methods import register_objective_method
from visiontune.train.objectives import ObjectiveSetup, register_objective


class TeacherUpdate(Callback):
    """After each step: teacher = decay x teacher + (1 - decay) x student (buffers copied); the teacher is
    validated, and it replaces the student at the end."""

    name = "mean-teacher"

    def __init__(self, objective: MeanTeacher):
        self.objective = objective

    def phase_start(self, loop) -> None:
        loop.evaluated = lambda: self.objective.teacher

    def step_end(self, loop) -> None:
        decay = self.objective.decay
        with torch.no_grad():
            for t, s in zip(self.objective.teacher.parameters(), loop.phase.module.parameters()):
                t.mul_(decay).add_(s.detach(), alpha=1 - decay)
            for t, s in zip(self.objective.teacher.buffers(), loop.phase.module.buffers()):
                t.copy_(s)

    def phase_end(self, loop) -> None:
        loop.phase.module.load_state_dict(self.objective.teacher.state_dict())

    def replaces_weights(self, plan) -> str | None:
        return "--ssl mean-teacher (its teacher, an average of the student)"


@register_objective("mean-teacher")
class MeanTeacher(SemiSupervised):
    def __init__(self, setup: ObjectiveSetup):
        super().__init__(setup)
        self.decay = float(getattr(setup.settings, "teacher_ema", 0.99))
        self.teacher = copy.deepcopy(setup.module).eval()  # no dropout, running BN statistics: stable targets
        for p in self.teacher.parameters():
            p.requires_grad_(False)

    def callbacks(self) -> list:
        return [TeacherUpdate(self)]

    def state_modules(self) -> dict[str, nn.Module]:
        return {"teacher": self.teacher}

    def unlabelled_loss(self, module: nn.Module, plain: torch.Tensor, augmented: torch.Tensor):
        with torch.no_grad():
            target = self.teacher(feature_augment(plain, 0.5)).float().softmax(-1)
        student = module(feature_augment(augmented, 1.0)).float().softmax(-1)
        return ((student - target) ** 2).sum(-1).mean(), {}


register_objective_method("mean-teacher", ("ssl",), order=30)
