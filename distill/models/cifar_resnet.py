"""CIFAR ResNets of the CRD/DKD benchmark (resnet8 ... resnet110, resnet8x4, resnet32x4).

Architecture, module names and initialisation follow RepDistiller ``models/resnet.py`` (itself after
fb.resnet.torch): a 3x3 stem, three stages of basic blocks at strides 1, 2, 2, global average pooling and a
linear ``fc``. The ``x4`` variants use widths (32, 64, 128, 256) instead of (16, 16, 32, 64).
Reference parameter counts at 100 classes: resnet8x4 1,233,540; resnet32x4 7,433,860.
"""
from typing import List

import torch
import torch.nn as nn
from ._base import CifarNet, init_weights, register_variants


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes))
        self.act_out = nn.ReLU()  # its input, bn2 + shortcut, is the block's pre-activation (the 'preact:N' tap)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.act_out(self.bn2(self.conv2(out)) + shortcut)


class CifarResNet(CifarNet):
    def __init__(self, depth: int, widths: List[int], num_classes: int = 100, in_chans: int = 3,
                 global_pool: str = 'avg'):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f'CIFAR ResNet depth must be 6n+2 (e.g. 20, 32, 56, 110), got {depth}')
        blocks_per_stage = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        in_planes = widths[0]
        for stage_index, (planes, stride) in enumerate(zip(widths[1:], (1, 2, 2)), start=1):
            blocks = [BasicBlock(in_planes if i == 0 else planes, planes, stride if i == 0 else 1)
                      for i in range(blocks_per_stage)]
            self.add_module(f'layer{stage_index}', nn.Sequential(*blocks))
            in_planes = planes
        feature_info = [dict(num_chs=widths[0], reduction=1, module='relu')] + [
            dict(num_chs=w, reduction=r, module=f'layer{i}')
            for i, (w, r) in enumerate(zip(widths[1:], (1, 2, 4)), start=1)]
        self._init_head(num_classes, widths[3], feature_info, global_pool)
        init_weights(self)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn1(self.conv1(x)))

    def stage_forwards(self):
        return [self.stem, self.layer1, self.layer2, self.layer3]

    def preact_tap(self, stage: int):
        """RepDistiller ``preact=True``: the stem as is, each stage before its last block's final ReLU."""
        if stage == 0:
            return 'relu', 'output'
        return f'layer{stage}.{len(getattr(self, f"layer{stage}")) - 1}.act_out', 'input'

    def preact_norm(self, stage: int) -> str:
        """The BatchNorm before the stage's final ReLU (RepDistiller ``get_bn_before_relu``; OFD's margins)."""
        return 'bn1' if stage == 0 else f'layer{stage}.{len(getattr(self, f"layer{stage}")) - 1}.bn2'

    def group_matcher(self, coarse: bool = False):
        return dict(stem=r'^conv1|^bn1', blocks=r'^layer(\d+)' if coarse else r'^layer(\d+)\.(\d+)')


register_variants(__name__, CifarResNet, {
    'cifar_resnet8': dict(depth=8, widths=[16, 16, 32, 64]),
    'cifar_resnet14': dict(depth=14, widths=[16, 16, 32, 64]),
    'cifar_resnet20': dict(depth=20, widths=[16, 16, 32, 64]),
    'cifar_resnet32': dict(depth=32, widths=[16, 16, 32, 64]),
    'cifar_resnet44': dict(depth=44, widths=[16, 16, 32, 64]),
    'cifar_resnet56': dict(depth=56, widths=[16, 16, 32, 64]),
    'cifar_resnet110': dict(depth=110, widths=[16, 16, 32, 64]),
    'cifar_resnet8x4': dict(depth=8, widths=[32, 64, 128, 256]),
    'cifar_resnet32x4': dict(depth=32, widths=[32, 64, 128, 256]),
})
