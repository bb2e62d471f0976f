"""CC: Peng et al., "Correlation Congruence for Knowledge Distillation", ICCV 2019.

Follows RepDistiller ``distiller_zoo/CC.py`` (the implementation behind the CRD benchmark's CC row), which
keeps the correlation term in its cheap first-order form: both pooled pre-logits features are embedded by a
linear layer + l2 normalisation (128-d, both embeddings trained with the student), and with
delta = |e_s - e_t|, loss = mean_i sum_d delta_i,d * delta_i+1,d (consecutive samples of the batch).
Default weight on CIFAR-100: 0.02 (with CE 1, KD 0).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models.features import PRE_LOGITS
from .base import LossTerm, Need, StepOutputs, fp32_loss, register_loss


class Embed(nn.Module):
    """Linear projection to ``dim`` then l2 normalisation (RepDistiller ``Embed``)."""

    def __init__(self, in_features: int, dim: int = 128):
        super().__init__()
        self.linear = nn.Linear(in_features, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.linear(x.flatten(1)), dim=1)


@fp32_loss
def cc_loss(student_embedding: torch.Tensor, teacher_embedding: torch.Tensor) -> torch.Tensor:
    delta = (student_embedding - teacher_embedding).abs()
    return (delta[:-1] * delta[1:]).sum(1).mean()


@register_loss('cc')
class CCLoss(LossTerm):
    paper = 'Peng et al., ICCV 2019'
    default_weight = 0.02
    needs = frozenset({Need.TEACHER_FEATURES})
    student_layers = teacher_layers = (PRE_LOGITS,)

    def __init__(self, embed_dim: int = 128):
        super().__init__()
        self.embed_dim = embed_dim

    def setup(self, context) -> None:
        self.embed_student = Embed(context.student_shapes[PRE_LOGITS][1], self.embed_dim)
        self.embed_teacher = Embed(context.teacher_shapes[PRE_LOGITS][1], self.embed_dim)

    def forward(self, step: StepOutputs) -> torch.Tensor:
        return cc_loss(self.embed_student(step.student_features[PRE_LOGITS]),
                       self.embed_teacher(step.teacher_features[PRE_LOGITS]))
