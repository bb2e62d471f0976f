"""AT: Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR 2017.

attention(f) = l2-normalise(mean_c f^p) over spatial positions; loss = sum over stage pairs of
mean((attention(s) - attention(t))^2), the larger map average-pooled to the smaller. Follows RepDistiller
``distiller_zoo/AT.py``: p = 2, stages ``feat[1:-1]`` of each model (every stage but the stem), paired in order
(zip truncates to the shorter list). Default weight on CIFAR-100: 1000 (with CE 1, KD 0).
"""
from typing import List, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .base import LossTerm, StepOutputs, fp32_loss, register_loss, stages_after_stem


def attention_map(feature: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    return F.normalize(feature.pow(p).mean(1).flatten(1))


@fp32_loss
def at_loss(student_features: List[torch.Tensor], teacher_features: List[torch.Tensor], p: float = 2.0) -> torch.Tensor:
    total = 0.0
    for student, teacher in zip(student_features, teacher_features):
        s_h, t_h = student.shape[2], teacher.shape[2]
        if s_h > t_h:
            student = F.adaptive_avg_pool2d(student, (t_h, t_h))
        elif s_h < t_h:
            teacher = F.adaptive_avg_pool2d(teacher, (s_h, s_h))
        total = total + (attention_map(student, p) - attention_map(teacher, p)).pow(2).mean()
    return total


@register_loss('at')
class ATLoss(LossTerm):
    requires_teacher = True

    def __init__(self, p: float = 2.0, student_layers: Optional[Sequence[Union[int, str]]] = None,
                 teacher_layers: Optional[Sequence[Union[int, str]]] = None):
        super().__init__()
        self.p = p
        self.student_layers, self.teacher_layers = student_layers, teacher_layers

    def resolve_layers(self, student, teacher) -> None:
        student_layers = list(self.student_layers) if self.student_layers is not None else stages_after_stem(student)
        teacher_layers = list(self.teacher_layers) if self.teacher_layers is not None else stages_after_stem(teacher)
        pairs = min(len(student_layers), len(teacher_layers))
        self.student_layers, self.teacher_layers = student_layers[:pairs], teacher_layers[:pairs]

    def forward(self, step: StepOutputs) -> torch.Tensor:
        return at_loss([step.student_features[layer] for layer in self.student_layers],
                       [step.teacher_features[layer] for layer in self.teacher_layers], self.p)
