"""Pooled-feature MSE: timm's ``FeatureDistillationTask`` (timm/task/distillation.py, ``train.py
--kd-distill-type feature``). The student's pooled pre-logits (the classifier's input), through a linear projection
to the teacher's width when the widths differ, matched to the teacher's pooled pre-logits by mean squared error.
timm ships no paper for it (it is FitNets' hint on the penultimate layer, Romero et al. 2015, with a linear
regressor); its default is equal weights (``ce: 1``, this term 1). The projection trains with the student and is
checkpointed, not exported.
"""
import torch
import torch.nn as nn

from ..models.features import PRE_LOGITS
from .base import LossTerm, Need, SetupContext, StepOutputs, register_loss
from .fitnet import fitnet_loss


# the mean squared error (over every element) of FitNets' hint, here of (batch, width) pooled features
pooled_mse_loss = fitnet_loss


@register_loss('pooled_mse')
class PooledMSELoss(LossTerm):
    paper = "timm's FeatureDistillationTask (FitNets' hint on pooled pre-logits, Romero et al., ICLR 2015)"
    default_weight = 1.0
    needs = frozenset({Need.TEACHER_FEATURES})
    student_layers = (PRE_LOGITS,)
    teacher_layers = (PRE_LOGITS,)

    def setup(self, context: SetupContext) -> None:
        student_width = context.student_shapes[PRE_LOGITS][-1]
        teacher_width = context.teacher_shapes[PRE_LOGITS][-1]
        # timm: an nn.Linear (its default init) only when the widths differ
        self.projection = nn.Linear(student_width, teacher_width) if student_width != teacher_width else \
            nn.Identity()

    def forward(self, step: StepOutputs) -> torch.Tensor:
        return pooled_mse_loss(self.projection(step.student_features[PRE_LOGITS]), step.teacher_features[PRE_LOGITS])
