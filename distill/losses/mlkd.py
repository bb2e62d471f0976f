"""MLKD: Jin, Wang & Lin, "Multi-Level Logit Distillation", CVPR 2023.

Aligns teacher and student predictions at three levels, each at five temperatures (4, 3, 5, 2, 6), on a weak
(crop + flip) and a strong (+ RandAugment + Cutout) view of every batch: instance level (KD), batch level
(bc: the B x B Gram matrix of the batch's softmax vectors, squared error / B) and class level (cc: the C x C
Gram matrix, squared error / C). Low-confidence samples/classes (teacher confidence on the weak view at or below
the median) gate the weak-view terms.

Follows the official code (MLKD ``mdistiller/distillers/MLKD.py``, also in the logit-standardization repository),
including what it actually computes where it differs from the paper: the gates multiply batch-mean losses, so
each weak-view term is scaled by the *fraction* of samples (classes) at or below the median rather than masking
samples; the strong-view KD sum uses the weak-view logits at temperatures 2 and 6; the strong-view cc and bc
terms are computed there but not added to the loss, so they are omitted here. The official loss also adds the
student's cross-entropy on the strong view (``ce_weight``, like its weak-view cross-entropy, which is the recipe's
``ce`` term); this term owns it, so the term is ``kd_weight * MLKD + ce_weight * CE(strong view)`` with term weight
1. Defaults: KD weight 0.9, CE weight 0.1 on each view (the mdistiller KD defaults its configs inherit; the
official CIFAR-100 recipes train 480 epochs at lr 0.025).
``temperature`` is the first of the five (the official ``cfg.KD.TEMPERATURE``, 4; the others are fixed in the
official code). ``logit_standardization`` z-scores the logits of the KD terms, not of the bc/cc terms (Sun et al.,
CVPR 2024, sunshangquan/logit-standardization-KD ``distillers/MLKD.py``, run there with ``--base-temp 2``:
``temperature=2``).
"""
from typing import Sequence

import torch
import torch.nn.functional as F

from .base import LossTerm, Need, StepOutputs, fp32_loss, register_loss
from .ce import cross_entropy_loss
from .kd import check_temperature, kd_loss

TEMPERATURES = (4.0, 3.0, 5.0, 2.0, 6.0)


def class_consistency(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    p_student = F.softmax(student_logits / temperature, dim=1)
    p_teacher = F.softmax(teacher_logits / temperature, dim=1)
    return (p_teacher.t() @ p_teacher - p_student.t() @ p_student).pow(2).sum() / student_logits.shape[1]


def batch_consistency(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    p_student = F.softmax(student_logits / temperature, dim=1)
    p_teacher = F.softmax(teacher_logits / temperature, dim=1)
    return (p_teacher @ p_teacher.t() - p_student @ p_student.t()).pow(2).sum() / student_logits.shape[0]


def fraction_at_or_below_median(values: torch.Tensor) -> torch.Tensor:
    return (values <= torch.quantile(values, 0.5)).float().mean()


@fp32_loss
def mlkd_loss(student_weak: torch.Tensor, teacher_weak: torch.Tensor, student_strong: torch.Tensor,
              teacher_strong: torch.Tensor, temperatures: Sequence[float] = TEMPERATURES,
              logit_standardization: bool = False) -> torch.Tensor:
    p_teacher = F.softmax(teacher_weak.detach(), dim=1)
    sample_gate = fraction_at_or_below_median(p_teacher.max(dim=1).values)
    class_gate = fraction_at_or_below_median(p_teacher.sum(dim=0))

    def kd(student, teacher, temperature):
        return kd_loss(student, teacher, temperature, logit_standardization)

    kd_weak = sample_gate * sum(kd(student_weak, teacher_weak, t) for t in temperatures)
    kd_strong = (sum(kd(student_strong, teacher_strong, t) for t in temperatures[:3])
                 + sum(kd(student_weak, teacher_weak, t) for t in temperatures[3:]))
    cc_weak = class_gate * sum(class_consistency(student_weak, teacher_weak, t) for t in temperatures)
    bc_weak = sample_gate * sum(batch_consistency(student_weak, teacher_weak, t) for t in temperatures)
    return kd_weak + kd_strong + cc_weak + bc_weak


@register_loss('mlkd')
class MLKDLoss(LossTerm):
    paper = 'Jin et al., CVPR 2023'
    default_weight = 1.0  # the KD and strong-view CE weights are the term's own options
    needs = frozenset({Need.TEACHER_LOGITS, Need.STRONG_VIEW, Need.CLASS_LABELS})

    def __init__(self, kd_weight: float = 0.9, ce_weight: float = 0.1, temperature: float = 4.0,
                 logit_standardization: bool = False):
        super().__init__()
        if kd_weight < 0 or ce_weight < 0:
            raise ValueError(f'kd_weight and ce_weight must be >= 0, got {kd_weight} and {ce_weight}')
        check_temperature(temperature)
        self.kd_weight, self.ce_weight, self.logit_standardization = kd_weight, ce_weight, logit_standardization
        self.temperatures = (temperature, *TEMPERATURES[1:])

    def forward(self, step: StepOutputs) -> torch.Tensor:
        distillation = mlkd_loss(step.student_logits, step.teacher_logits, step.student_logits_strong,
                                 step.teacher_logits_strong, self.temperatures, self.logit_standardization)
        return self.kd_weight * distillation + self.ce_weight * cross_entropy_loss(step.student_logits_strong,
                                                                                   step.targets)
