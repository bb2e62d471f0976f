"""DIST: Huang et al., "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022.

Matches relations instead of exact probabilities: with p = softmax(logits / tau), inter-class loss =
1 - mean over samples of the Pearson correlation between student and teacher class distributions; intra-class
loss = the same over classes (columns of the batch). loss = tau^2 * (beta * inter + gamma * intra). Follows the
official code (hunto/image_classification_sota ``lib/models/losses/dist_kd.py``; eps 1e-8 in the cosine). Defaults:
weight 2 with beta = gamma = 1 and CE 1, as in every official config (hunto/DIST_KD ``resnet_dist.yaml``,
``dist_cifar.yaml``: KD loss weight 2); tau = 1 on ImageNet, 4 in the CIFAR-100 runs (the CIFAR recipe sets it).
"""
import torch
import torch.nn.functional as F

from .base import LossTerm, Need, StepOutputs, fp32_loss, register_loss
from .kd import check_temperature


def pearson_correlation(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Row-wise Pearson correlation: the cosine of the mean-centred rows."""
    a, b = a - a.mean(dim=1, keepdim=True), b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


@fp32_loss
def dist_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float = 1.0, gamma: float = 1.0,
              temperature: float = 1.0) -> torch.Tensor:
    p_student = F.softmax(student_logits / temperature, dim=1)
    p_teacher = F.softmax(teacher_logits / temperature, dim=1)
    inter = 1 - pearson_correlation(p_student, p_teacher).mean()
    intra = 1 - pearson_correlation(p_student.t(), p_teacher.t()).mean()
    return temperature ** 2 * (beta * inter + gamma * intra)


@register_loss('dist')
class DISTLoss(LossTerm):
    paper = 'Huang et al., NeurIPS 2022'
    default_weight = 2.0
    needs = frozenset({Need.TEACHER_LOGITS})

    def __init__(self, beta: float = 1.0, gamma: float = 1.0, temperature: float = 1.0):
        super().__init__()
        check_temperature(temperature)
        self.beta, self.gamma, self.temperature = beta, gamma, temperature

    def forward(self, step: StepOutputs) -> torch.Tensor:
        return dist_loss(step.student_logits, step.teacher_logits, self.beta, self.gamma, self.temperature)
