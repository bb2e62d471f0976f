"""AB: Heo et al., "Knowledge Transfer via Distillation of Activation Boundaries Formed by Hidden Neurons",
AAAI 2019.

A pre-stage transfers the teacher's activation boundaries: with pre-ReLU features s (student, through a
connector) and t (teacher), the alternative L2 loss (s + m)^2 [s > -m and t <= 0] + (s - m)^2 [s <= m and t > 0]
with margin m = 1, summed, divided by the batch size, times 3/1000, weighted 2^(i - n + 1) for stage i of n.
Follows RepDistiller ``distiller_zoo/AB.py``, ``models/util.py::Connector`` (identity when shapes agree, else a
conv + BN regressor) and ``helper/pretrain.py``: pre-activation stages ``feat[1:-1]``, 30 pre-stage epochs
training the connectors and the student's body; the main training then uses cross-entropy alone (RepDistiller
sets the AB term to 0 there).
"""
from typing import List

import torch
import torch.nn as nn

from ..models.features import PREACT
from .base import Need, PairedStagesLoss, StepOutputs, fp32_loss, register_loss, stages_after_stem, student_body
from .fitnet import ConvRegressor


@fp32_loss
def ab_loss(student_features: List[torch.Tensor], teacher_features: List[torch.Tensor],
            margin: float = 1.0) -> torch.Tensor:
    count, batch = len(student_features), student_features[0].shape[0]
    total = 0.0
    for index, (source, target) in enumerate(zip(student_features, teacher_features)):
        loss = ((source + margin) ** 2 * ((source > -margin) & (target <= 0)).float()
                + (source - margin) ** 2 * ((source <= margin) & (target > 0)).float())
        total = total + 2.0 ** (index - count + 1) * loss.abs().sum() / batch / 1000 * 3
    return total


@register_loss('ab')
class ABLoss(PairedStagesLoss):
    paper = 'Heo et al., AAAI 2019'
    default_weight = 1.0
    needs = frozenset({Need.TEACHER_FEATURES, Need.PRE_STAGE})
    main_stage = False

    def __init__(self, margin: float = 1.0, pre_stage_epochs: int = 30):
        super().__init__()
        self.margin, self.pre_stage_epochs = margin, pre_stage_epochs

    def resolve_layers(self, student, teacher) -> None:
        pairs = min(len(stages_after_stem(student)), len(stages_after_stem(teacher)))
        self.student_layers = [f'{PREACT}{stage}' for stage in stages_after_stem(student)[:pairs]]
        self.teacher_layers = [f'{PREACT}{stage}' for stage in stages_after_stem(teacher)[:pairs]]

    def setup(self, context) -> None:
        self.connectors = nn.ModuleList(
            nn.Identity() if s[1:3] == t[1:3] else ConvRegressor(s, t, use_relu=False)
            for s, t in ((context.student_shapes[a], context.teacher_shapes[b])
                         for a, b in zip(self.student_layers, self.teacher_layers)))

    def pre_stage_modules(self, student):
        return [self.connectors, student_body(student)]

    def pre_stage_loss(self, step: StepOutputs) -> torch.Tensor:
        students, teachers = self.feature_pairs(step)
        return ab_loss([connector(s) for connector, s in zip(self.connectors, students)], teachers, self.margin)

    def forward(self, step: StepOutputs) -> torch.Tensor:
        raise RuntimeError('AB acts only in the pre-stage')
