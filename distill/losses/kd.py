"""Hinton KD: Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network", NIPS DL workshop 2015.

loss = T^2 * KL(softmax(teacher / T) || softmax(student / T)), batch mean. The T^2 factor keeps the gradient
magnitude comparable across temperatures (section 2 of the paper). Defaults of the CRD benchmark (RepDistiller
``--distill kd``): T = 4, KD weight 0.9 with cross-entropy weight 0.1.

Logit standardization (Sun et al., "Logit Standardization in Knowledge Distillation", CVPR 2024), option
``logit_standardization``: both logits become z-scores (mean 0, unbiased std 1 per sample, eps 1e-7 as in the
official code, ``mdistiller/distillers/KD.py::normalize``) before the temperature; the official CIFAR-100 recipes
then use T = 2 and KD weight 9 (CE 0.1).
"""
import torch
import torch.nn.functional as F

from .base import LossTerm, Need, StepOutputs, fp32_loss, register_loss


def standardize_logits(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Z-score of each sample's logits (Sun et al. 2024, eq. 9): the student need not match the teacher's
    logit range, only their relations."""
    return (logits - logits.mean(dim=1, keepdim=True)) / (logits.std(dim=1, keepdim=True) + eps)


@fp32_loss
def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0,
            logit_standardization: bool = False) -> torch.Tensor:
    """T^2 * KL(p_teacher || p_student) at temperature T, batch mean, computed in float32."""
    if logit_standardization:
        student_logits, teacher_logits = standardize_logits(student_logits), standardize_logits(teacher_logits)
    log_p_student = F.log_softmax(student_logits / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits / temperature, dim=1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction='batchmean', log_target=True)
    return kl * temperature ** 2


def check_temperature(temperature: float) -> None:
    if temperature <= 0:
        raise ValueError(f'temperature must be > 0, got {temperature}')


@register_loss('kd')
class KDLoss(LossTerm):
    paper = 'Hinton et al., NIPS-W 2015; logit standardization: Sun et al., CVPR 2024'
    default_weight = 0.9
    needs = frozenset({Need.TEACHER_LOGITS})

    def __init__(self, temperature: float = 4.0, logit_standardization: bool = False):
        super().__init__()
        check_temperature(temperature)
        self.temperature, self.logit_standardization = temperature, logit_standardization

    def forward(self, step: StepOutputs) -> torch.Tensor:
        return kd_loss(step.student_logits, step.teacher_logits, self.temperature, self.logit_standardization)
