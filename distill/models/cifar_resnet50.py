"""ResNet50 for CIFAR, the teacher of the CRD/DKD cross-architecture pairs (RepDistiller ``ResNet50``).

Architecture, module names and initialisation follow RepDistiller ``models/resnetv2.py`` (He et al., "Deep
Residual Learning for Image Recognition", CVPR 2016, with a 3x3 stride-1 stem and no max-pool for 32x32 inputs):
bottleneck stages of 3, 4, 6, 3 blocks at widths 64-512 (x4 expansion), strides 1, 2, 2, 2, global pooling and
``linear``. Reference parameter count at 100 classes: 23,705,252 (the "23.71M" of the DKD/ReviewKD tables).
"""
import torch
import torch.nn as nn

from ._base import CifarNet, init_weights, register_variants


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.Sequential()  # identity; the reference's empty Sequential (no checkpoint keys)
        if stride != 1 or in_planes != out_planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(out_planes))
        self.relu = nn.ReLU(inplace=True)
        self.act_out = nn.ReLU()  # its input, bn3 + shortcut, is the block's pre-activation (the 'preact:N' tap)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))))
        return self.act_out(self.bn3(self.conv3(out)) + self.shortcut(x))


class CifarBottleneckResNet(CifarNet):
    classifier_name = 'linear'

    def __init__(self, num_blocks=(3, 4, 6, 3), num_classes: int = 100, in_chans: int = 3, global_pool: str = 'avg'):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, 64, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        in_planes, widths = 64, []
        for index, (planes, count, stride) in enumerate(zip((64, 128, 256, 512), num_blocks, (1, 2, 2, 2)), start=1):
            blocks = []
            for i in range(count):
                blocks.append(Bottleneck(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes * Bottleneck.expansion
            self.add_module(f'layer{index}', nn.Sequential(*blocks))
            widths.append(in_planes)
        feature_info = [dict(num_chs=64, reduction=1, module='relu')] + [
            dict(num_chs=w, reduction=r, module=f'layer{i}') for i, (w, r) in enumerate(zip(widths, (1, 2, 4, 8)), 1)]
        self._init_head(num_classes, in_planes, feature_info, global_pool)
        init_weights(self)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn1(self.conv1(x)))

    def stage_forwards(self):
        return [self.stem, self.layer1, self.layer2, self.layer3, self.layer4]

    def _last_block(self, stage: int) -> str:
        return f'layer{stage}.{len(getattr(self, f"layer{stage}")) - 1}'

    def preact_tap(self, stage: int):
        """RepDistiller ``preact=True``: the stem as is, each stage before its last block's final ReLU."""
        return ('relu', 'output') if stage == 0 else (f'{self._last_block(stage)}.act_out', 'input')

    def preact_norm(self, stage: int) -> str:
        """The BatchNorm before the stage's final ReLU (RepDistiller ``get_bn_before_relu``)."""
        return 'bn1' if stage == 0 else f'{self._last_block(stage)}.bn3'

    def group_matcher(self, coarse: bool = False):
        return dict(stem=r'^conv1|^bn1', blocks=r'^layer(\d+)' if coarse else r'^layer(\d+)\.(\d+)')


register_variants(__name__, CifarBottleneckResNet, {
    'cifar_resnet50': dict(num_blocks=(3, 4, 6, 3)),
}, classifier='linear', pool_size=(4, 4))
