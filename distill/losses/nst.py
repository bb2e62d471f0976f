"""NST: Huang & Wang, "Like What You Like: Knowledge Distill via Neuron Selectivity Transfer", arXiv 2017.

Each channel's spatial activation pattern, l2-normalised, is a sample; loss = squared MMD between student and
teacher channel distributions with the polynomial kernel k(x, y) = (x^T y)^2 (d = 2, c = 0):
mean k(t, t) + mean k(s, s) - 2 mean k(s, t), summed over stage pairs (larger map pooled to the smaller).
Follows RepDistiller ``distiller_zoo/NST.py`` (full loss, the teacher-teacher term detached): stages
``feat[1:-1]``. Default weight on CIFAR-100: 50 (with CE 1, KD 0).
"""
from typing import List

import torch
import torch.nn.functional as F

from .base import Need, PairedStagesLoss, StepOutputs, fp32_loss, register_loss, sum_over_pairs


def polynomial_kernel_mean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean over the batch and all channel pairs of (a_i . b_j)^2; a: (N, Ca, HW), b: (N, Cb, HW)."""
    return torch.bmm(b, a.transpose(1, 2)).pow(2).mean()


@fp32_loss
def nst_loss(student_features: List[torch.Tensor], teacher_features: List[torch.Tensor]) -> torch.Tensor:
    def squared_mmd(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        student, teacher = F.normalize(student.flatten(2), dim=2), F.normalize(teacher.flatten(2), dim=2)
        return (polynomial_kernel_mean(teacher, teacher).detach() + polynomial_kernel_mean(student, student)
                - 2 * polynomial_kernel_mean(student, teacher))

    return sum_over_pairs(student_features, teacher_features, squared_mmd)


@register_loss('nst')
class NSTLoss(PairedStagesLoss):
    paper = 'Huang & Wang, arXiv 2017'
    default_weight = 50.0
    needs = frozenset({Need.TEACHER_FEATURES})

    def forward(self, step: StepOutputs) -> torch.Tensor:
        return nst_loss(*self.feature_pairs(step))
