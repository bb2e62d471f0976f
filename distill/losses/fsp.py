"""FSP: Yim et al., "A Gift from Knowledge Distillation: Fast Optimization, Network Minimization and Transfer
Learning", CVPR 2017.

The FSP matrix of two consecutive feature maps (the larger pooled to the smaller), G[i, j] = mean over positions
of f1_i * f2_j, is the "flow of solution procedure"; loss = sum over consecutive pairs of mean((G_s - G_t)^2).
Follows RepDistiller ``distiller_zoo/FSP.py`` and ``helper/pretrain.py``: every feature map but the pooled one
(``feat[:-1]``: stem and all stages), student and teacher channel counts must match; the loss trains the
student's body (all but the classifier, in train mode) for 30 pre-stage epochs at the recipe's learning rate,
after which the main training uses cross-entropy alone (RepDistiller sets the FSP term to 0 there).
"""
from typing import List

import torch
import torch.nn.functional as F

from ..errors import DistillError
from ..models.features import feature_info_list
from .base import LossTerm, Need, StepOutputs, fp32_loss, register_loss, student_body


def fsp_matrices(features: List[torch.Tensor]) -> List[torch.Tensor]:
    matrices = []
    for lower, upper in zip(features[:-1], features[1:]):
        lower, upper = _pool_pair(lower, upper)
        matrices.append(torch.bmm(upper.flatten(2), lower.flatten(2).transpose(1, 2)) / lower[0, 0].numel())
    return matrices


def _pool_pair(lower: torch.Tensor, upper: torch.Tensor):
    if lower.shape[2] > upper.shape[2]:
        lower = F.adaptive_avg_pool2d(lower, upper.shape[2:])
    elif lower.shape[2] < upper.shape[2]:
        upper = F.adaptive_avg_pool2d(upper, lower.shape[2:])
    return lower, upper


@fp32_loss
def fsp_loss(student_features: List[torch.Tensor], teacher_features: List[torch.Tensor]) -> torch.Tensor:
    return sum((s - t).pow(2).mean() for s, t in zip(fsp_matrices(student_features), fsp_matrices(teacher_features)))


@register_loss('fsp')
class FSPLoss(LossTerm):
    paper = 'Yim et al., CVPR 2017'
    default_weight = 50.0
    needs = frozenset({Need.TEACHER_FEATURES, Need.PRE_STAGE})
    pairs = 'equal channels per stage'
    main_stage = False

    def __init__(self, pre_stage_epochs: int = 30):
        super().__init__()
        self.pre_stage_epochs = pre_stage_epochs

    def resolve_layers(self, student, teacher) -> None:
        self.student_layers = list(range(len(feature_info_list(student))))
        self.teacher_layers = list(range(len(feature_info_list(teacher))))

    def setup(self, context) -> None:
        student_channels = [context.student_shapes[layer][1] for layer in self.student_layers]
        teacher_channels = [context.teacher_shapes[layer][1] for layer in self.teacher_layers]
        if student_channels != teacher_channels:
            raise DistillError(f"loss 'fsp' needs equal channels at every stage, but the student has "
                               f"{student_channels} and the teacher {teacher_channels}; pick a pair of one width "
                               f"(e.g. cifar_resnet32x4 -> cifar_resnet8x4) or another method")

    def pre_stage_modules(self, student):
        return [student_body(student)]

    def pre_stage_loss(self, step: StepOutputs) -> torch.Tensor:
        return fsp_loss([step.student_features[layer] for layer in self.student_layers],
                        [step.teacher_features[layer] for layer in self.teacher_layers])

    def forward(self, step: StepOutputs) -> torch.Tensor:
        raise RuntimeError('FSP acts only in the pre-stage')
