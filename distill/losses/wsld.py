"""WSLD: Zhou et al., "Rethinking Soft Labels for Knowledge Distillation: A Bias-Variance Tradeoff Perspective",
ICLR 2021.

Weighted soft labels: the soft term is a per-sample cross-entropy between the teacher's and the student's
temperature-softened distributions (not a KL: the teacher's entropy stays in the value, not in the gradient),
weighted per sample by how much worse the student does on the label than the teacher, both at T = 1 and detached:

    w_i = 1 - exp(-max(ce_s,i / (ce_t,i + 1e-7), 0)),  ce_x,i = -log softmax(x_i)[y_i]  (no gradient)
    loss = T^2 * mean_i w_i * (-sum_c softmax(t_i / T)_c * log softmax(s_i / T)_c)

A sample the teacher gets as wrong as (or more wrong than) the student gets a small weight, since its soft label
carries more variance than bias reduction. Follows the official code (bellymonster/Weighted-Soft-Label-Distillation
``knowledge_distiller.py``, ``WSLDistiller.forward``: ``focal_weight``, the 1e-7 in its ratio, the clamp at 0 and the
T^2 batch mean); the label CE is the separate ``ce`` term (its ``hard_loss``). That code holds the ImageNet setting
(T 2, alpha 2.5, one-hot over 1000 classes; here the logits' width). Defaults are the CIFAR-100 setting of the paper
(section 5), which the authors confirm in the repository's issue #2 (the loss as on ImageNet, alpha 2.25, T 4, CRD
training settings): T = 4, WSLD weight 2.25 with CE 1.
"""
import torch
import torch.nn.functional as F

from .base import LossTerm, Need, StepOutputs, fp32_loss, register_loss
from .kd import check_temperature


def wsld_weights(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                 eps: float = 1e-7) -> torch.Tensor:
    """Per-sample weights 1 - exp(-ce_student / ce_teacher) at T = 1, from detached logits."""
    with torch.no_grad():
        ce_student = F.cross_entropy(student_logits.detach(), targets, reduction='none')
        ce_teacher = F.cross_entropy(teacher_logits.detach(), targets, reduction='none')
        return 1 - torch.exp(-(ce_student / (ce_teacher + eps)).clamp(min=0))


@fp32_loss
def wsld_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
              temperature: float = 4.0) -> torch.Tensor:
    """T^2 * batch mean of w_i * CE(softmax(t_i / T), softmax(s_i / T)), computed in float32."""
    soft_targets = F.softmax(teacher_logits / temperature, dim=1)
    soft_ce = -(soft_targets * F.log_softmax(student_logits / temperature, dim=1)).sum(dim=1)
    weights = wsld_weights(student_logits, teacher_logits, targets)
    return temperature ** 2 * (weights * soft_ce).mean()


@register_loss('wsld')
class WSLDLoss(LossTerm):
    paper = 'Zhou et al., ICLR 2021'
    default_weight = 2.25
    needs = frozenset({Need.TEACHER_LOGITS, Need.CLASS_LABELS})

    def __init__(self, temperature: float = 4.0):
        super().__init__()
        check_temperature(temperature)
        self.temperature = temperature

    def forward(self, step: StepOutputs) -> torch.Tensor:
        return wsld_loss(step.student_logits, step.teacher_logits, step.targets, self.temperature)
