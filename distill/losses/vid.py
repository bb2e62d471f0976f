"""VID: Ahn et al., "Variational Information Distillation for Knowledge Transfer", CVPR 2019.

Per stage pair, a regressor (1x1 conv, ReLU, 1x1 conv, ReLU, 1x1 conv; hidden width = teacher channels) predicts
the mean of a Gaussian over the teacher feature with a learned per-channel variance softplus(log_scale) + eps;
loss = mean of the negative log-likelihood 0.5 * ((mu - t)^2 / var + log var), summed over stage pairs (larger
map pooled to the smaller). Follows RepDistiller ``distiller_zoo/VID.py``: stages ``feat[1:-1]``, initial
variance 5, eps 1e-5. Default weight on CIFAR-100: 1 (with CE 1, KD 0).
"""
import math
from typing import List

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import Need, PairedStagesLoss, StepOutputs, fp32_loss, pool_to_smaller, register_loss


class VariationalRegressor(nn.Module):
    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, initial_variance: float = 5.0,
                 eps: float = 1e-5):
        super().__init__()
        self.mean = nn.Sequential(
            nn.Conv2d(in_channels, mid_channels, 1, bias=False), nn.ReLU(),
            nn.Conv2d(mid_channels, mid_channels, 1, bias=False), nn.ReLU(),
            nn.Conv2d(mid_channels, out_channels, 1, bias=False))
        # softplus(log_scale) + eps starts at initial_variance
        self.log_scale = nn.Parameter(torch.full((out_channels,), math.log(math.expm1(initial_variance - eps))))
        self.eps = eps

    def variance(self) -> torch.Tensor:
        return F.softplus(self.log_scale) + self.eps


@fp32_loss
def vid_loss(predicted_means: List[torch.Tensor], variances: List[torch.Tensor],
             teacher_features: List[torch.Tensor]) -> torch.Tensor:
    """Gaussian negative log-likelihood (without the constant) of each teacher feature, averaged, summed."""
    total = 0.0
    for mean, variance, teacher in zip(predicted_means, variances, teacher_features):
        variance = variance.view(1, -1, 1, 1)
        total = total + (0.5 * ((mean - teacher) ** 2 / variance + torch.log(variance))).mean()
    return total


@register_loss('vid')
class VIDLoss(PairedStagesLoss):
    paper = 'Ahn et al., CVPR 2019'
    default_weight = 1.0
    needs = frozenset({Need.TEACHER_FEATURES})

    def setup(self, context) -> None:
        self.regressors = nn.ModuleList(
            VariationalRegressor(context.student_shapes[s][1], context.teacher_shapes[t][1],
                                 context.teacher_shapes[t][1])
            for s, t in zip(self.student_layers, self.teacher_layers))

    def forward(self, step: StepOutputs) -> torch.Tensor:
        means, variances, targets = [], [], []
        for regressor, student, teacher in zip(self.regressors, *self.feature_pairs(step)):
            student, teacher = pool_to_smaller(student, teacher)
            means.append(regressor.mean(student))
            variances.append(regressor.variance())
            targets.append(teacher)
        return vid_loss(means, variances, targets)
