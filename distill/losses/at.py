"""AT: Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR 2017.

attention(f) = l2-normalise(mean_c f^p) over spatial positions; loss = sum over stage pairs of
mean((attention(s) - attention(t))^2), the larger map average-pooled to the smaller. Follows RepDistiller
``distiller_zoo/AT.py``: p = 2, stages ``feat[1:-1]`` of each model (every stage but the stem), paired in order
(zip truncates to the shorter list). Default weight on CIFAR-100: 1000 (with CE 1, KD 0).
"""
from typing import List, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .base import Need, PairedStagesLoss, StepOutputs, fp32_loss, register_loss, sum_over_pairs


def attention_map(feature: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    return F.normalize(feature.pow(p).mean(1).flatten(1))


@fp32_loss
def at_loss(student_features: List[torch.Tensor], teacher_features: List[torch.Tensor], p: float = 2.0) -> torch.Tensor:
    def squared_distance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return (attention_map(student, p) - attention_map(teacher, p)).pow(2).mean()
    return sum_over_pairs(student_features, teacher_features, squared_distance)


@register_loss('at')
class ATLoss(PairedStagesLoss):
    paper = 'Zagoruyko & Komodakis, ICLR 2017'
    default_weight = 1000.0
    needs = frozenset({Need.TEACHER_FEATURES})

    def __init__(self, p: float = 2.0, student_layers: Optional[Sequence[Union[int, str]]] = None,
                 teacher_layers: Optional[Sequence[Union[int, str]]] = None):
        super().__init__(student_layers, teacher_layers)
        self.p = p

    def forward(self, step: StepOutputs) -> torch.Tensor:
        return at_loss(*self.feature_pairs(step), self.p)
