"""SP: Tung & Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019.

G = row-l2-normalised (f f^T) of the flattened features of a batch; loss = ||G_t - G_s||_F^2 / b^2. Follows
RepDistiller ``distiller_zoo/SP.py`` (verified there by the original author): the last stage's feature map
(``feat[-2]``). Default weight on CIFAR-100: 3000 (with CE 1, KD 0).
"""
from typing import Union

import torch
import torch.nn.functional as F

from .base import LossTerm, Need, StepOutputs, fp32_loss, register_loss


def similarity_matrix(feature: torch.Tensor) -> torch.Tensor:
    flat = feature.flatten(1)
    return F.normalize(flat @ flat.t())


@fp32_loss
def sp_loss(student_feature: torch.Tensor, teacher_feature: torch.Tensor) -> torch.Tensor:
    batch = student_feature.shape[0]
    diff = similarity_matrix(teacher_feature) - similarity_matrix(student_feature)
    return diff.pow(2).sum() / (batch * batch)


@register_loss('sp')
class SPLoss(LossTerm):
    paper = 'Tung & Mori, ICCV 2019'
    default_weight = 3000.0
    needs = frozenset({Need.TEACHER_FEATURES})

    def __init__(self, student_layer: Union[int, str] = -1, teacher_layer: Union[int, str] = -1):
        super().__init__()
        self.student_layers, self.teacher_layers = [student_layer], [teacher_layer]

    def forward(self, step: StepOutputs) -> torch.Tensor:
        return sp_loss(step.student_features[self.student_layers[0]], step.teacher_features[self.teacher_layers[0]])
