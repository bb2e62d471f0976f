"""Wide ResNets for CIFAR (wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2) of the CRD/DKD benchmark.

Architecture, module names and initialisation follow RepDistiller ``models/wrn.py`` (after Zagoruyko &
Komodakis, "Wide Residual Networks", BMVC 2016): pre-activation blocks, widths (16, 16k, 32k, 64k), depth 6n+4,
a closing BN-ReLU (``bn1``) before global pooling and ``fc``. Reference parameter counts at 100 classes:
wrn_16_2 703,284; wrn_40_1 569,780; wrn_40_2 2,255,156.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._base import CifarNet, init_weights, zero_bias, register_variants


class PreActBlock(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.equal_in_out = in_planes == out_planes
        self.convShortcut = None if self.equal_in_out else nn.Conv2d(
            in_planes, out_planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = self.relu1(self.bn1(x))
        # As in the reference, a widening block's shortcut starts from the activated input.
        shortcut = x if self.equal_in_out else self.convShortcut(activated)
        out = self.relu2(self.bn2(self.conv1(activated)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return self.conv2(out) + shortcut


class NetworkBlock(nn.Module):
    def __init__(self, num_blocks: int, in_planes: int, out_planes: int, stride: int, drop_rate: float):
        super().__init__()
        self.layer = nn.Sequential(*[
            PreActBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, drop_rate)
            for i in range(num_blocks)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class CifarWideResNet(CifarNet):
    def __init__(self, depth: int, widen_factor: int, num_classes: int = 100, in_chans: int = 3,
                 drop_rate: float = 0.0, global_pool: str = 'avg'):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f'WRN depth must be 6n+4 (e.g. 16, 40), got {depth}')
        blocks_per_stage = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, padding=1, bias=False)
        self.block1 = NetworkBlock(blocks_per_stage, widths[0], widths[1], 1, drop_rate)
        self.block2 = NetworkBlock(blocks_per_stage, widths[1], widths[2], 2, drop_rate)
        self.block3 = NetworkBlock(blocks_per_stage, widths[2], widths[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU(inplace=True)
        feature_info = [dict(num_chs=w, reduction=r, module=m) for w, r, m in zip(
            widths, (1, 1, 2, 4), ('conv1', 'block1', 'block2', 'block3'))]
        self._init_head(num_classes, widths[3], feature_info, global_pool)
        init_weights(self, zero_bias)

    def stage_forwards(self):
        return [self.conv1, self.block1, self.block2, self.block3]

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn1(x))

    def preact_tap(self, stage: int):
        """RepDistiller ``preact=True``: a pre-activation WRN's stage output normalised by the BN that precedes
        the next ReLU (the next stage's first ``bn1``, or the final ``bn1``); the stem conv as is."""
        if stage == 0:
            return 'conv1', 'output'
        return (f'block{stage + 1}.layer.0.relu1', 'input') if stage < 3 else ('relu', 'input')

    def preact_norm(self, stage: int) -> str:
        """The BatchNorm before the ReLU that follows the stage (RepDistiller ``get_bn_before_relu``)."""
        if stage == 0:
            return 'block1.layer.0.bn1'
        return f'block{stage + 1}.layer.0.bn1' if stage < 3 else 'bn1'

    def group_matcher(self, coarse: bool = False):
        return dict(stem=r'^conv1', blocks=r'^block(\d+)' if coarse else r'^block(\d+)\.layer\.(\d+)',
                    head_norm=r'^bn1')


register_variants(__name__, CifarWideResNet, {
    'cifar_wrn_16_1': dict(depth=16, widen_factor=1),
    'cifar_wrn_16_2': dict(depth=16, widen_factor=2),
    'cifar_wrn_40_1': dict(depth=40, widen_factor=1),
    'cifar_wrn_40_2': dict(depth=40, widen_factor=2),
})
