"""OFA: Hao et al., "One-for-All: Bridge the Gap Between Heterogeneous Architectures in Knowledge Distillation",
NeurIPS 2023.

Built for heterogeneous pairs (CNN <-> ViT <-> MLP): instead of matching features, which live in
architecture-specific spaces, each chosen student stage gets a branch that maps it to class logits, and every
branch, like the student's own head, is trained on the teacher's logits with the target-enhanced loss
-sum_c ((p_t + y)^eps - y) * log p_s (y the one-hot label; eps > 1 strengthens the target class when the teacher
is unsure; temperature T on both softmaxes). Branches: for a CNN student, stride-2 separable convolutions down to
the last stage's resolution (channels doubling, the last one max(student, teacher) feature width; the deepest
stage a 1x1 conv), global pooling and a linear classifier; for a ViT student, patch merging down to a 7x7 grid
where the grid is larger, max(4 - stage, 1) transformer blocks (4 heads), token pooling and a linear classifier.

Follows the official code (Hao840/OFAKD ``distillers/ofa.py``, ``distillers/utils.py``): stages 1-4 (here the
last four stages after the stem, or four evenly spaced blocks of a ViT), eps 1 (1.5 in its ImageNet ResNet-18
recipe), T 1, branch and final-logit losses each weight 1 next to CE 1, the branch initialisation (Kaiming convs,
truncated-normal linears). Differences: the ViT branch pools patch tokens (the class token is not among timm's
``forward_intermediates`` maps) and uses timm's ``PatchMerging`` (same layers, another sub-patch order).
"""
import math
from typing import List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.swin_transformer import PatchMerging
from timm.models.vision_transformer import Block

from ..models._base import init_weights
from ..models.features import feature_info_list
from .base import LossTerm, Need, StepOutputs, fp32_loss, register_loss, stages_after_stem


@fp32_loss
def ofa_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor, eps: float = 1.0,
             temperature: float = 1.0) -> torch.Tensor:
    """Target-enhanced distillation: mean_i sum_c -((p_t + y)^eps - y) log p_s."""
    target_mask = F.one_hot(targets, student_logits.shape[1]).to(student_logits.dtype)
    log_p_student = F.log_softmax(student_logits / temperature, dim=1)
    p_teacher = F.softmax(teacher_logits / temperature, dim=1)
    weights = (p_teacher + target_mask) ** eps - target_mask
    return -(weights * log_p_student).sum(dim=1).mean()


def _separable_downsample(in_channels: int, out_channels: int) -> nn.Sequential:
    """OFA's SepConv: depthwise 3x3 stride 2 + pointwise, BN, ReLU, depthwise 3x3 + pointwise, BN, ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, in_channels, 3, stride=2, padding=1, groups=in_channels, bias=False),
        nn.Conv2d(in_channels, in_channels, 1, bias=False), nn.BatchNorm2d(in_channels), nn.ReLU(),
        nn.Conv2d(in_channels, in_channels, 3, padding=1, groups=in_channels, bias=False),
        nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU())


def cnn_branch(channels: int, downsamples: int, width: int, num_classes: int) -> nn.Sequential:
    if downsamples == 0:
        blocks: List[nn.Module] = [nn.Conv2d(channels, width, 1)]
    else:
        blocks = [_separable_downsample(channels * 2 ** i, width if i == downsamples - 1 else channels * 2 ** (i + 1))
                  for i in range(downsamples)]
    return nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))


class TokenBranch(nn.Module):
    """OFA's ViT branch on an NCHW token map: patch merging to 7x7, transformer blocks, token pooling, linear."""

    def __init__(self, channels: int, grid: int, width: int, blocks: int, num_classes: int):
        super().__init__()
        merges = max(int(math.log2(grid / 7)), 0)
        self.merge = nn.Sequential(*[PatchMerging(channels if i == 0 else width, width) for i in range(merges)])
        self.act = nn.GELU()
        self.blocks = nn.Sequential(*[Block(dim=width if merges else channels, num_heads=4) for _ in range(blocks)])
        self.head = nn.Linear(width if merges else channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)  # NHWC for patch merging
        for index, merge in enumerate(self.merge):
            x = merge(x)
            if index == 0 or index < len(self.merge) - 1:  # GELU after each merge but a later last one, as OFA
                x = self.act(x)
        return self.head(self.blocks(x.flatten(1, 2)).mean(1))


def _init_linear(linear: nn.Linear) -> None:
    trunc_normal_(linear.weight, std=.02)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)


def _init_branch(module: nn.Module) -> None:
    init_weights(module, _init_linear)


def is_token_model(model: nn.Module) -> bool:
    return hasattr(model, 'patch_embed') and hasattr(model, 'blocks')


def ofa_stages(model: nn.Module, count: int = 4) -> List[int]:
    """The last ``count`` stages after the stem of a CNN; ``count`` evenly spaced blocks of a ViT."""
    if is_token_model(model):
        depth = len(feature_info_list(model))
        return [depth * (k + 1) // count - 1 for k in range(count)]
    return stages_after_stem(model)[-count:]


@register_loss('ofa')
class OFALoss(LossTerm):
    paper = 'Hao et al., NeurIPS 2023'
    default_weight = 1.0
    needs = frozenset({Need.TEACHER_LOGITS, Need.CLASS_LABELS})

    def __init__(self, eps: float = 1.0, temperature: float = 1.0, logits_weight: float = 1.0,
                 student_layers: Optional[Sequence[int]] = None):
        super().__init__()
        self.eps, self.temperature, self.logits_weight = eps, temperature, logits_weight
        self.student_layers = student_layers

    def resolve_layers(self, student, teacher) -> None:
        self.student_layers = list(self.student_layers) if self.student_layers is not None else ofa_stages(student)

    def setup(self, context) -> None:
        width = max(context.student.num_features, context.teacher.num_features)
        num_classes = context.num_classes
        count, branches = len(self.student_layers), []
        for index, layer in enumerate(self.student_layers):
            _, channels, height, _ = context.student_shapes[layer]
            stage = 4 - (count - 1 - index)  # the deepest branch is OFA's stage 4
            if is_token_model(context.student):
                branches.append(TokenBranch(channels, height, context.student.num_features, max(4 - stage, 1),
                                            num_classes))
            else:
                branches.append(cnn_branch(channels, count - 1 - index, width, num_classes))
        self.branches = nn.ModuleList(branches)
        _init_branch(self.branches)

    def forward(self, step: StepOutputs) -> torch.Tensor:
        loss = self.logits_weight * ofa_loss(step.student_logits, step.teacher_logits, step.targets, self.eps,
                                             self.temperature)
        for branch, layer in zip(self.branches, self.student_layers):
            loss = loss + ofa_loss(branch(step.student_features[layer]), step.teacher_logits, step.targets,
                                   self.eps, self.temperature)
        return loss
