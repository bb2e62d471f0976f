"""MobileNetV2 for CIFAR as the CRD/DKD cross-architecture students use it (RepDistiller ``mobile_half``).

Architecture, module names and initialisation follow RepDistiller ``models/mobilenetv2.py`` (after Sandler et al.,
"MobileNetV2: Inverted Residuals and Linear Bottlenecks", CVPR 2018, as adapted by "Knowledge Distillation via Route
Constrained Optimization"): expansion 6, width 0.5, a stride-2 3x3 stem, seven inverted-residual groups ``blocks``
(strides 1, 1, 2, 2, 1, 2, 1), a 1x1 conv to 1280 channels (``conv2``), global pooling and ``classifier.0``.
Its four feature stages are RepDistiller's f1..f4: after ``blocks.1``, ``blocks.2``, ``blocks.4`` and ``blocks.6``
(each ends in a BatchNorm without ReLU, so the stage output is its own pre-activation).
Reference parameter count at 100 classes: 812,836 (the "0.81M" of the DKD/ReviewKD tables).
"""
from typing import List

import torch
import torch.nn as nn

from ._base import CifarNet, init_weights, small_normal, register_variants


def conv_bn_relu(in_chans: int, out_chans: int, kernel_size: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_chans, out_chans, kernel_size, stride, kernel_size // 2, bias=False),
                         nn.BatchNorm2d(out_chans), nn.ReLU(inplace=True))


class InvertedResidual(nn.Module):
    def __init__(self, in_chans: int, out_chans: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = in_chans * expand_ratio
        self.use_residual = stride == 1 and in_chans == out_chans
        self.conv = nn.Sequential(
            nn.Conv2d(in_chans, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),  # expand
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),  # depthwise
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, out_chans, 1, bias=False), nn.BatchNorm2d(out_chans))  # linear projection

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class CifarMobileNetV2(CifarNet):
    classifier_name = 'classifier'
    # (expansion, channels, blocks, stride) at width 1, as in the paper's Table 2 with CIFAR strides
    SETTINGS = [(1, 16, 1, 1), (None, 24, 2, 1), (None, 32, 3, 2), (None, 64, 4, 2), (None, 96, 3, 1),
                (None, 160, 3, 2), (None, 320, 1, 1)]
    STAGE_ENDS = (1, 2, 4, 6)  # the group that closes each feature stage (RepDistiller's f1..f4)

    def __init__(self, expand_ratio: int = 6, width_mult: float = 0.5, num_classes: int = 100, in_chans: int = 3,
                 global_pool: str = 'avg'):
        super().__init__()
        channels = int(32 * width_mult)
        self.conv1 = conv_bn_relu(in_chans, channels, 3, 2)
        groups: List[nn.Module] = []
        for expansion, width, count, stride in self.SETTINGS:
            out_chans = int(width * width_mult)
            blocks = []
            for i in range(count):
                blocks.append(InvertedResidual(channels, out_chans, stride if i == 0 else 1, expansion or expand_ratio))
                channels = out_chans
            groups.append(nn.Sequential(*blocks))
        self.blocks = nn.ModuleList(groups)
        last_channels = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = conv_bn_relu(channels, last_channels, 1, 1)
        widths = [int(32 * width_mult)] + [int(self.SETTINGS[end][1] * width_mult) for end in self.STAGE_ENDS]
        modules = ['conv1'] + [f'blocks.{end}' for end in self.STAGE_ENDS]
        feature_info = [dict(num_chs=w, reduction=r, module=m) for w, r, m in zip(widths, (2, 2, 4, 8, 16), modules)]
        self._init_head(num_classes, last_channels, feature_info, global_pool)
        init_weights(self, small_normal)

    def make_classifier(self, num_features: int, num_classes: int) -> nn.Module:
        # a Sequential, as the reference (its checkpoints hold classifier.0.weight)
        return nn.Sequential(nn.Linear(num_features, num_classes)) if num_classes > 0 else nn.Identity()

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.classifier[0] if isinstance(self.classifier, nn.Sequential) else self.classifier

    def stage_forwards(self):
        starts = (0,) + tuple(end + 1 for end in self.STAGE_ENDS[:-1])
        return [self.conv1] + [nn.Sequential(*self.blocks[start:end + 1])
                               for start, end in zip(starts, self.STAGE_ENDS)]

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(x)

    def preact_tap(self, stage: int):
        """Stage outputs as they are: each closes with a BatchNorm and no ReLU (RepDistiller ignores preact)."""
        return (['conv1'] + [f'blocks.{end}' for end in self.STAGE_ENDS])[stage], 'output'

    def preact_norm(self, stage: int) -> str:
        """The BatchNorm closing the stage (RepDistiller ``get_bn_before_relu``)."""
        if stage == 0:
            return 'conv1.1'
        end = self.STAGE_ENDS[stage - 1]
        return f'blocks.{end}.{len(self.blocks[end]) - 1}.conv.7'

    def group_matcher(self, coarse: bool = False):
        return dict(stem=r'^conv1', blocks=r'^blocks\.(\d+)' if coarse else r'^blocks\.(\d+)\.(\d+)',
                    head_norm=r'^conv2')


register_variants(__name__, CifarMobileNetV2, {
    'cifar_mobilenetv2': dict(expand_ratio=6, width_mult=0.5),
}, first_conv='conv1.0', classifier='classifier.0', pool_size=(2, 2))
