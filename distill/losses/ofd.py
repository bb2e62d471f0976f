"""OFD: Heo et al., "A Comprehensive Overhaul of Feature Distillation", ICCV 2019.

Student pre-ReLU features go through a connector (1x1 conv + BN) and are matched to the teacher's pre-ReLU
features (average-pooled to the student's size) with the partial L2 distance: no penalty where the student is
below the teacher's margin and the teacher is too, (s - t)^2 where the teacher is positive or where the student
exceeds a negative teacher value, (s - margin)^2 where the student exceeds the margin while the teacher is below
it. The per-channel margin is E[x | x < 0] for x ~ N(beta, gamma^2) of the teacher BN before the ReLU (or -3 gamma
when P(x < 0) <= 0.001). Per stage: mean over the batch, sum over the rest, divided by 2^(n - 1 - i).
Follows mdistiller ``distillers/OFD.py``: stages ``preact_feats[1:]`` of both models aligned from the deepest,
feature weight 0.001 with CE 1. Difference by default: mdistiller's ``OFD.train()`` (like the authors' code,
clovaai/overhaul-distillation, ``t_net.train()``) puts the teacher in train mode, so its BatchNorm normalises each
batch with that batch's statistics; here the teacher stays in eval mode (its trained statistics), as for every
method. ``teacher_batch_statistics=True`` reproduces the reference (the teacher's features then depend on the
batch; its running statistics, used only by eval mode, are updated as in the reference and never saved).
"""
import math
from typing import List

import torch
import torch.nn as nn

from ..errors import DistillError
from ..models.features import PREACT, preact_norm
from .base import LossTerm, Need, StepOutputs, deepest_stages, fp32_loss, register_loss


def bn_margin(norm: nn.BatchNorm2d) -> torch.Tensor:
    """E[x | x < 0] per channel for x ~ N(bias, weight^2), or -3 |weight| where P(x < 0) <= 0.001."""
    std, mean = norm.weight.detach().double().abs().clamp(min=1e-12), norm.bias.detach().double()
    below = torch.special.ndtr(-mean / std)
    expected = -std * torch.exp(-(mean / std) ** 2 / 2) / math.sqrt(2 * math.pi) / below.clamp(min=1e-300) + mean
    return torch.where(below > 0.001, expected, -3 * std).float()


@fp32_loss
def ofd_loss(student_features: List[torch.Tensor], teacher_features: List[torch.Tensor],
             margins: List[torch.Tensor]) -> torch.Tensor:
    total, count = 0.0, len(student_features)
    for index, (source, target, margin) in enumerate(zip(student_features, teacher_features, margins)):
        target = nn.functional.adaptive_avg_pool2d(target, source.shape[-2:])
        margin = margin.view(1, -1, 1, 1)
        distance = ((source - margin) ** 2 * ((source > margin) & (target <= margin)).float()
                    + (source - target) ** 2 * ((source > target) & (target > margin) & (target <= 0)).float()
                    + (source - target) ** 2 * (target > 0).float())
        total = total + distance.abs().mean(dim=0).sum() / 2 ** (count - index - 1)
    return total


def _connector(in_channels: int, out_channels: int) -> nn.Sequential:
    conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
    nn.init.normal_(conv.weight, 0, math.sqrt(2.0 / out_channels))
    return nn.Sequential(conv, nn.BatchNorm2d(out_channels))


@register_loss('ofd')
class OFDLoss(LossTerm):
    paper = 'Heo et al., ICCV 2019'
    default_weight = 0.001
    needs = frozenset({Need.TEACHER_FEATURES})
    pairs = 'CNN teacher (BN + ReLU stages)'

    def __init__(self, teacher_batch_statistics: bool = False):
        super().__init__()
        if teacher_batch_statistics:
            self.needs = self.needs | {Need.TEACHER_BATCH_STATISTICS}

    def resolve_layers(self, student, teacher) -> None:
        self.student_stages, self.teacher_stages = deepest_stages(student, teacher)
        self.student_layers = [f'{PREACT}{stage}' for stage in self.student_stages]
        self.teacher_layers = [f'{PREACT}{stage}' for stage in self.teacher_stages]

    def setup(self, context) -> None:
        self.connectors = nn.ModuleList(
            _connector(context.student_shapes[s][1], context.teacher_shapes[t][1])
            for s, t in zip(self.student_layers, self.teacher_layers))
        for index, stage in enumerate(self.teacher_stages):
            try:
                norm = preact_norm(context.teacher, stage)
            except DistillError:
                raise DistillError(f"loss 'ofd' needs a teacher whose stages end in BatchNorm + ReLU (its margins "
                                   f"come from that BatchNorm); {type(context.teacher).__name__} has none at stage "
                                   f"{stage}; use another method for this pair") from None
            self.register_buffer(f'margin{index}', bn_margin(norm))

    def forward(self, step: StepOutputs) -> torch.Tensor:
        students = [connector(step.student_features[layer])
                    for connector, layer in zip(self.connectors, self.student_layers)]
        teachers = [step.teacher_features[layer] for layer in self.teacher_layers]
        return ofd_loss(students, teachers, [getattr(self, f'margin{i}') for i in range(len(teachers))])
