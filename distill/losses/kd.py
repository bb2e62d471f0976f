"""Hinton KD: Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network", NIPS-W 2015.

loss = T^2 * KL(softmax(teacher/T) || softmax(student/T)), summed over classes and averaged over the batch
(RepDistiller ``distiller_zoo/KD.py`` and mdistiller ``distillers/KD.py``). The T^2 factor keeps the gradient
magnitude independent of T. Defaults of the CRD benchmark (Tian et al., ICLR 2020): T = 4, weight 0.9 with
cross-entropy weight 0.1.
"""
import torch
import torch.nn.functional as F

from .base import LossTerm, StepOutputs, fp32_loss, register_loss


@fp32_loss
def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """T^2 * KL(p_teacher || p_student) at temperature T, batch mean, computed in float32."""
    log_p_student = F.log_softmax(student_logits / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits / temperature, dim=1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction='batchmean', log_target=True)
    return kl * temperature ** 2


@register_loss('kd')
class KDLoss(LossTerm):
    requires_teacher = True

    def __init__(self, temperature: float = 4.0):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f'temperature must be > 0, got {temperature}')
        self.temperature = temperature

    def forward(self, step: StepOutputs) -> torch.Tensor:
        return kd_loss(step.student_logits, step.teacher_logits, self.temperature)
