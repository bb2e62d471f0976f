"""CTKD: Li et al., "Curriculum Temperature for Knowledge Distillation", AAAI 2023.

Hinton KD whose temperature is learned adversarially: T = t_min + t_range * sigmoid(theta), and theta receives
the *reversed* gradient -lambda * dL/dtheta, so it moves to make distillation harder while the student makes it
easier. lambda follows a cosine curriculum from 0 to lambda_max over the first ``curriculum_epochs`` epochs:
lambda = lambda_max * (1 - cos(pi * min(e, N) / N)) / 2 with CTKD's 1-based epoch e. Follows the official code
(zhengli97/CTKD ``train_student.py``: ``CosineDecay(max_value=0, min_value=-1, num_loops=10)``, ``Global_T`` with
theta initialised to 1 and a gradient reversal layer, ``t_start 1``, ``t_end 20``; ``loops.py``: KD at that T,
T^2-scaled). The temperature parameter trains with the student (and its weight decay). Default weights on
CIFAR-100: CE 0.1, CTKD 0.9 (the ``-r 0.1 -a 0.9`` recipe).
"""
import math

import torch
import torch.nn as nn

from .base import LossTerm, Need, StepOutputs, register_loss
from .kd import kd_loss


class _ReverseGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return -ctx.scale * grad, None


def reverse_gradient(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Identity forward; the backward pass multiplies the gradient by -scale."""
    return _ReverseGradient.apply(x, scale)


def curriculum_lambda(epoch: int, curriculum_epochs: int = 10, lambda_max: float = 1.0) -> float:
    """CTKD's cosine curriculum at 0-based ``epoch`` (the official code counts from 1)."""
    step = min(epoch + 1, curriculum_epochs)
    return lambda_max * (1 - math.cos(math.pi * step / curriculum_epochs)) / 2


@register_loss('ctkd')
class CTKDLoss(LossTerm):
    paper = 'Li et al., AAAI 2023'
    default_weight = 0.9
    needs = frozenset({Need.TEACHER_LOGITS})

    def __init__(self, temperature_min: float = 1.0, temperature_range: float = 20.0, lambda_max: float = 1.0,
                 curriculum_epochs: int = 10, logit_standardization: bool = False):
        super().__init__()
        self.temperature_min, self.temperature_range = temperature_min, temperature_range
        self.lambda_max, self.curriculum_epochs = lambda_max, curriculum_epochs
        self.logit_standardization = logit_standardization
        self.theta = nn.Parameter(torch.ones(1))

    def temperature(self, epoch: int) -> torch.Tensor:
        theta = reverse_gradient(self.theta, curriculum_lambda(epoch, self.curriculum_epochs, self.lambda_max))
        return self.temperature_min + self.temperature_range * torch.sigmoid(theta)

    def forward(self, step: StepOutputs) -> torch.Tensor:
        return kd_loss(step.student_logits, step.teacher_logits, self.temperature(step.epoch)[0],
                       self.logit_standardization)
