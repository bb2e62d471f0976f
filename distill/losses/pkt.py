"""PKT: Passalis & Tefas, "Learning Deep Representations with Probabilistic Knowledge Transfer", ECCV 2018.

Cosine similarities of the batch's embeddings, shifted to [0, 1] and row-normalised into conditional
probabilities; loss = mean(p_t * log((p_t + eps) / (p_s + eps))) with eps = 1e-7. Follows RepDistiller
``distiller_zoo/PKT.py`` (code from the authors): the pooled pre-logits features (``feat[-1]``). Default weight on
CIFAR-100: 30000 (with CE 1, KD 0).
"""
import torch

from .base import LossTerm, Need, StepOutputs, fp32_loss, register_loss

EPS = 1e-7


def conditional_probabilities(embedding: torch.Tensor) -> torch.Tensor:
    unit = embedding / (embedding.norm(dim=1, keepdim=True) + EPS)
    unit = torch.nan_to_num(unit, nan=0.0)
    similarity = (unit @ unit.t() + 1.0) / 2.0
    return similarity / similarity.sum(dim=1, keepdim=True)


@fp32_loss
def pkt_loss(student_embedding: torch.Tensor, teacher_embedding: torch.Tensor) -> torch.Tensor:
    p_student = conditional_probabilities(student_embedding.flatten(1))
    p_teacher = conditional_probabilities(teacher_embedding.flatten(1))
    return (p_teacher * torch.log((p_teacher + EPS) / (p_student + EPS))).mean()


@register_loss('pkt')
class PKTLoss(LossTerm):
    paper = 'Passalis & Tefas, ECCV 2018'
    default_weight = 30000.0
    needs = frozenset({Need.TEACHER_FEATURES})
    student_layers = teacher_layers = ('pre_logits',)

    def forward(self, step: StepOutputs) -> torch.Tensor:
        return pkt_loss(step.student_features['pre_logits'], step.teacher_features['pre_logits'])
