"""DKD: Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022.

KD split into target-class KD (TCKD: binary KL between [p_gt, 1 - p_gt] of teacher and student) and
non-target-class KD (NCKD: KL between the distributions over the other classes), each times T^2, batch mean:
loss = alpha * TCKD + beta * NCKD. Follows mdistiller ``distillers/DKD.py`` (the official code): NCKD masks the
target logit by subtracting 1000 before the softmax, and the loss is scaled by min(epoch / warmup, 1) with
mdistiller's 1-based epochs, i.e. (epoch + 1) / warmup with ours. Defaults on CIFAR-100: alpha 1, beta 8 (2 for
resnet56/110 teachers, 6 for WRN and VGG pairs), T = 4, warm-up 20 epochs, weight 1 with CE 1. Option
``logit_standardization`` z-scores both logits first (Sun et al., CVPR 2024; see ``kd.py``).
"""
import torch
import torch.nn.functional as F

from .base import LossTerm, Need, StepOutputs, fp32_loss, register_loss
from .kd import check_temperature, standardize_logits


@fp32_loss
def dkd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
             alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0,
             logit_standardization: bool = False) -> torch.Tensor:
    if logit_standardization:
        student_logits, teacher_logits = standardize_logits(student_logits), standardize_logits(teacher_logits)
    batch = targets.shape[0]
    gt_mask = F.one_hot(targets, student_logits.shape[1]).to(student_logits.dtype)
    p_student = F.softmax(student_logits / temperature, dim=1)
    p_teacher = F.softmax(teacher_logits / temperature, dim=1)
    # binary [target, non-target] probabilities
    b_student = torch.stack([(p_student * gt_mask).sum(1), (p_student * (1 - gt_mask)).sum(1)], dim=1)
    b_teacher = torch.stack([(p_teacher * gt_mask).sum(1), (p_teacher * (1 - gt_mask)).sum(1)], dim=1)
    tckd = F.kl_div(torch.log(b_student), b_teacher, reduction='sum') * temperature ** 2 / batch
    log_q_student = F.log_softmax(student_logits / temperature - 1000.0 * gt_mask, dim=1)
    q_teacher = F.softmax(teacher_logits / temperature - 1000.0 * gt_mask, dim=1)
    nckd = F.kl_div(log_q_student, q_teacher, reduction='sum') * temperature ** 2 / batch
    return alpha * tckd + beta * nckd


@register_loss('dkd')
class DKDLoss(LossTerm):
    paper = 'Zhao et al., CVPR 2022'
    default_weight = 1.0
    needs = frozenset({Need.TEACHER_LOGITS, Need.CLASS_LABELS})

    def __init__(self, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0, warmup: int = 20,
                 logit_standardization: bool = False):
        super().__init__()
        check_temperature(temperature)
        self.alpha, self.beta, self.temperature, self.warmup = alpha, beta, temperature, warmup
        self.logit_standardization = logit_standardization

    def forward(self, step: StepOutputs) -> torch.Tensor:
        ramp = min((step.epoch + 1) / self.warmup, 1.0) if self.warmup > 0 else 1.0
        return ramp * dkd_loss(step.student_logits, step.teacher_logits, step.targets, self.alpha, self.beta,
                               self.temperature, self.logit_standardization)
