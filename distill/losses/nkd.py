"""NKD: Yang et al., "From Knowledge Distillation to Self-Knowledge Distillation: A Unified Approach with
Normalized Loss and Customized Soft Labels", ICCV 2023. Official code: yzd-v/cls_KD, ``mmcls/models/dis_losses/nkd.py``
(``NKDLoss``, branch 1.0; the same file as ``mmcls/distillation/losses/nkd.py`` on master).

KD's loss splits into a target term and a non-target term whose two distributions have different sums
(1 - p_t of each model), so they can never match. NKD renormalises the non-target classes of each model on their own
(a softmax over the C - 1 non-target logits) and keeps the target term at temperature 1:

    loss = -mean_i T_t log S_t
           - gamma * tau^2 * mean_i sum_{j != t} softmax_{-t}(z_t / tau)_j log softmax_{-t}(z_s / tau)_j

with T_t, S_t the teacher's (detached) and the student's softmax probability of the target class t at temperature 1,
and softmax_{-t} the softmax over the non-target logits only. Added to the student's cross-entropy (weight 1).

The non-target mask must drop the target class. Both branches had a bug from July to October 2023
(``ones_like(...).scatter_(1, label, 1)`` keeps every class; yzd-v/cls_KD issue #16, fixed in commits 9466b3f (1.0) and
ad4876f (master)), and copies made in that window (e.g. shicaiwei123/SDD-CVPR2024) still softmax over all classes. We
follow the fixed code; the earlier versions (-1000 masking, then division by 1 - p_t) compute the same quantity.

Defaults: tau = 3, gamma = 3.5, weight 1 with CE 1: the official repository's only CIFAR-100 teacher-student config
(``configs/distillers/cifar100/res34_distill_res18_cifar.py``: ``temp=3.0, gamma=3.5``, the loss added unweighted
to the student head's cross-entropy). Its ImageNet configs (and the loss class's own defaults) use tau = 1, gamma = 1.5
(``configs/distillers/imagenet/res34_distill_res18_img.py``, ``res50_distill_mv1_img.py``). Soft (one-hot) targets use
their argmax as the target class, as the official code does; mixed batches are refused (it declares
``Need.CLASS_LABELS``: a mixed image has two classes).
"""
import torch
import torch.nn.functional as F

from .base import LossTerm, Need, StepOutputs, fp32_loss, register_loss
from .kd import check_temperature


def hard_targets(targets: torch.Tensor) -> torch.Tensor:
    """Class indices: soft (N, C) targets give their argmax."""
    return targets.argmax(dim=1) if targets.dim() > 1 else targets


def non_target_logits(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(N, C) logits without each row's target column: (N, C - 1), classes kept in order."""
    keep = torch.ones_like(logits, dtype=torch.bool).scatter_(1, targets[:, None], False)
    return logits[keep].view(logits.shape[0], logits.shape[1] - 1)


@fp32_loss
def nkd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
             temperature: float = 3.0, gamma: float = 3.5) -> torch.Tensor:
    """Normalized KD: target term at temperature 1 plus gamma * tau^2 times the cross-entropy between the
    renormalised non-target distributions at temperature tau; batch mean, float32."""
    targets = hard_targets(targets)
    teacher_logits = teacher_logits.detach()
    log_p_student = F.log_softmax(student_logits, dim=1).gather(1, targets[:, None]).squeeze(1)
    p_teacher = F.softmax(teacher_logits, dim=1).gather(1, targets[:, None]).squeeze(1)
    target_term = -(p_teacher * log_p_student).mean()
    log_q_student = F.log_softmax(non_target_logits(student_logits, targets) / temperature, dim=1)
    q_teacher = F.softmax(non_target_logits(teacher_logits, targets) / temperature, dim=1)
    non_target_term = -(q_teacher * log_q_student).sum(dim=1).mean()
    return target_term + gamma * temperature ** 2 * non_target_term


@register_loss('nkd')
class NKDLoss(LossTerm):
    paper = 'Yang et al., ICCV 2023'
    default_weight = 1.0
    needs = frozenset({Need.TEACHER_LOGITS, Need.CLASS_LABELS})  # the target class's probability
    pairs = 'any'

    def __init__(self, temperature: float = 3.0, gamma: float = 3.5):
        super().__init__()
        check_temperature(temperature)
        if gamma < 0:
            raise ValueError(f'gamma must be >= 0, got {gamma}')
        self.temperature, self.gamma = temperature, gamma

    def forward(self, step: StepOutputs) -> torch.Tensor:
        return nkd_loss(step.student_logits, step.teacher_logits, step.targets, self.temperature, self.gamma)
