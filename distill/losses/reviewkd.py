"""ReviewKD: Chen et al., "Distilling Knowledge via Knowledge Review", CVPR 2021.

The student's stage features and pooled feature (as a 1x1 map) are fused deepest-first by attention-based
fusion (ABF) modules: each maps a student feature to ``mid`` channels (1x1 conv + BN), fuses it with the
upsampled result of the deeper level through a 2-channel sigmoid attention, resizes to the teacher's map and
projects to the teacher's channels (3x3 conv + BN). The outputs match the teacher's pre-ReLU stage features and
pooled feature with the hierarchical context loss (HCL): MSE at full resolution plus MSE of 4x4, 2x2, 1x1
average-pooled maps (those smaller than the map), weights 1, 1/2, 1/4, 1/8, normalised by their sum.
Follows mdistiller ``distillers/ReviewKD.py``: student post-ReLU stages 1..n-1 (``STU_PREACT: False``), teacher
``preact_feats[1:]``, mid channels min(512, student pooled channels), loss ramped by min(epoch / 20, 1) with
1-based epochs. Default weight 1 with CE 1 (the CIFAR-100 recipes use 1 to 8 per pair, e.g. 5 for
resnet32x4 -> resnet8x4).
"""
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models.features import PRE_LOGITS, PREACT
from .base import LossTerm, Need, StepOutputs, deepest_stages, fp32_loss, register_loss


class AttentionFusion(nn.Module):
    """ABF: one level of the review path."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool):
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv2d(in_channels, mid_channels, 1, bias=False), nn.BatchNorm2d(mid_channels))
        self.project = nn.Sequential(nn.Conv2d(mid_channels, out_channels, 3, padding=1, bias=False),
                                     nn.BatchNorm2d(out_channels))
        self.attention = nn.Conv2d(2 * mid_channels, 2, 1) if fuse else None  # on [x, deeper], then a sigmoid
        nn.init.kaiming_uniform_(self.reduce[0].weight, a=1)
        nn.init.kaiming_uniform_(self.project[0].weight, a=1)

    def forward(self, x: torch.Tensor, deeper: Optional[torch.Tensor], out_size):
        x = self.reduce(x)
        if self.attention is not None:
            deeper = F.interpolate(deeper, x.shape[-2:], mode='nearest')
            weights = torch.sigmoid(self._attention_logits(x, deeper))
            x = x * weights[:, :1] + deeper * weights[:, 1:]
        if tuple(x.shape[-2:]) != tuple(out_size):
            x = F.interpolate(x, out_size, mode='nearest')
        return self.project(x), x

    def _attention_logits(self, x: torch.Tensor, deeper: torch.Tensor) -> torch.Tensor:
        """The 1x1 conv on cat([x, deeper]) as two matrix products on the NCHW tensors as they are: no
        concatenated copy, and GEMMs instead of a 2-output-channel convolution, whose CPU backward is slow."""
        weight = self.attention.weight.flatten(1)
        mid = x.shape[1]
        logits = weight[:, :mid] @ x.flatten(2) + weight[:, mid:] @ deeper.flatten(2)  # (B, 2, H*W), NCHW as is
        return (logits + self.attention.bias.view(1, -1, 1)).unflatten(2, x.shape[-2:])


@fp32_loss
def hcl_loss(student_features: List[torch.Tensor], teacher_features: List[torch.Tensor]) -> torch.Tensor:
    total = 0.0
    for student, teacher in zip(student_features, teacher_features):
        loss, weight, weights = F.mse_loss(student, teacher), 1.0, 1.0
        for size in (4, 2, 1):
            if size >= student.shape[2]:
                continue
            weight /= 2.0
            loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(student, size),
                                              F.adaptive_avg_pool2d(teacher, size))
            weights += weight
        total = total + loss / weights
    return total


@register_loss('reviewkd')
class ReviewKDLoss(LossTerm):
    paper = 'Chen et al., CVPR 2021'
    default_weight = 1.0
    needs = frozenset({Need.TEACHER_FEATURES})

    def __init__(self, warmup: int = 20, max_mid_channels: int = 512):
        super().__init__()
        self.warmup, self.max_mid_channels = warmup, max_mid_channels

    def resolve_layers(self, student, teacher) -> None:
        student_stages, teacher_stages = deepest_stages(student, teacher)
        self.student_layers = list(student_stages) + [PRE_LOGITS]
        self.teacher_layers = [f'{PREACT}{stage}' for stage in teacher_stages] + [PRE_LOGITS]

    def setup(self, context) -> None:
        student_shapes = [_as_map_shape(context.student_shapes[layer]) for layer in self.student_layers]
        self.teacher_sizes = [tuple(_as_map_shape(context.teacher_shapes[layer])[2:]) for layer in self.teacher_layers]
        teacher_channels = [_as_map_shape(context.teacher_shapes[layer])[1] for layer in self.teacher_layers]
        mid_channels = min(self.max_mid_channels, student_shapes[-1][1])
        last = len(student_shapes) - 1
        # deepest first, as the review path runs
        self.fusions = nn.ModuleList(
            AttentionFusion(student_shapes[i][1], mid_channels, teacher_channels[i], fuse=i < last)
            for i in reversed(range(len(student_shapes))))

    def forward(self, step: StepOutputs) -> torch.Tensor:
        students = [_as_map(step.student_features[layer]) for layer in self.student_layers][::-1]
        sizes = self.teacher_sizes[::-1]
        results, deeper = [], None
        for fusion, feature, size in zip(self.fusions, students, sizes):
            output, deeper = fusion(feature, deeper, size)
            results.insert(0, output)
        teachers = [_as_map(step.teacher_features[layer]) for layer in self.teacher_layers]
        ramp = min((step.epoch + 1) / self.warmup, 1.0) if self.warmup > 0 else 1.0
        return ramp * hcl_loss(results, teachers)


def _as_map(feature: torch.Tensor) -> torch.Tensor:
    """Pooled (N, C) features as (N, C, 1, 1) maps."""
    return feature[:, :, None, None] if feature.dim() == 2 else feature


def _as_map_shape(shape: torch.Size) -> torch.Size:
    return torch.Size([*shape, 1, 1]) if len(shape) == 2 else shape
