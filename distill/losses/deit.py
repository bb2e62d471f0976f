"""DeiT token distillation: Touvron et al., "Training data-efficient image transformers & distillation through
attention", ICML 2021; official code facebookresearch/deit ``losses.py::DistillationLoss``.

A distilled DeiT (timm ``deit_*_distilled_*``) has a class token and a distillation token, each with its own head.
Cross-entropy (the recipe's ``ce`` term) trains the class head on the labels; this term trains the distillation
head on the teacher: ``hard`` (the paper's best, DeiT⚗ of Table 5): cross-entropy against the teacher's argmax;
``soft``: T² · KL(softmax(teacher / T) || softmax(student / T)), batch mean, as timm's ``TokenDistillationTask``
(the official code divides the summed KL by batch x classes instead: its soft term is this one / num_classes).
Defaults are the official ones (``--distillation-type hard``, ``--distillation-alpha 0.5``, ``--distillation-tau
1.0``): weight 0.5 with ``ce: 0.5``. The term puts the student in distilled training
(``set_distilled_training(True)``): while training it returns both heads, in eval mode their average, which is what
evaluation and the exported student compute (timm's inference). The teacher's logits are all it reads, so the
teacher cache and record/replay serve it.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import DistillError
from ..models.heads import DISTILLATION, has_distillation_head
from .base import LossTerm, Need, StepOutputs, fp32_loss, register_loss
from .kd import check_temperature

MODES = ('hard', 'soft')


@fp32_loss
def deit_loss(distillation_logits: torch.Tensor, teacher_logits: torch.Tensor, mode: str = 'hard',
              temperature: float = 1.0) -> torch.Tensor:
    """The distillation head's loss against the teacher: cross-entropy to its argmax (hard) or T² · KL, batch mean
    (soft)."""
    if mode == 'hard':
        return F.cross_entropy(distillation_logits, teacher_logits.argmax(dim=1))
    log_p_student = F.log_softmax(distillation_logits / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits / temperature, dim=1)
    return F.kl_div(log_p_student, log_p_teacher, reduction='batchmean', log_target=True) * temperature ** 2


@register_loss('deit')
class DeiTLoss(LossTerm):
    paper = 'Touvron et al., ICML 2021'
    default_weight = 0.5
    needs = frozenset({Need.TEACHER_LOGITS})
    pairs = 'a deit_*_distilled_* student (a distillation token), any teacher'
    student_head = DISTILLATION

    def __init__(self, mode: str = 'hard', temperature: float = 1.0):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
        check_temperature(temperature)
        self.mode, self.temperature = mode, temperature

    def configure_student(self, student: nn.Module) -> None:
        if not has_distillation_head(student):
            raise DistillError(f"losses.deit trains a distillation token, and the student ({type(student).__name__}) "
                               f"has none: use a distilled DeiT (timm's deit_*_distilled_*, e.g. "
                               f"deit_small_distilled_patch16_224), or another loss term")
        student.set_distilled_training(True)

    def forward(self, step: StepOutputs) -> torch.Tensor:
        return deit_loss(step.student_heads[DISTILLATION], step.teacher_logits, self.mode, self.temperature)
