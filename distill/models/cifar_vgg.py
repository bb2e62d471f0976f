"""VGG with batch norm for CIFAR (vgg8, vgg11, vgg13, vgg16, vgg19) of the CRD/DKD benchmark.

Architecture, module names and initialisation follow RepDistiller ``models/vgg.py`` (whose ``vgg8``/``vgg13``
entries are the ``_bn`` variants): five conv blocks ``block0``..``block4`` each ending in a BatchNorm whose
ReLU is applied in ``forward`` (so the pre-activation is available), max-pooling between blocks, global
average pooling and a single linear ``classifier``. ``pool3`` is applied only when the map entering it is
larger than 4x4, which reproduces the reference's rule (used only for 64x64 inputs) at 32 and 64 pixels.
Reference parameter counts at 100 classes: vgg8 3,965,028; vgg13 9,462,180.
"""
from typing import List, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._base import CifarNet, init_weights, small_normal, register_variants

_CONFIGS = {
    'S': [[64], [128], [256], [512], [512]],
    'A': [[64], [128], [256, 256], [512, 512], [512, 512]],
    'B': [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    'D': [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    'E': [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
}


def _conv_block(widths: List[int], in_chans: int) -> nn.Sequential:
    layers: List[nn.Module] = []
    for width in widths:
        layers += [nn.Conv2d(in_chans, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        in_chans = width
    return nn.Sequential(*layers[:-1])  # the block's last ReLU is applied in forward


class CifarVGG(CifarNet):
    classifier_name = 'classifier'

    def __init__(self, config: Union[str, List[List[int]]], num_classes: int = 100, in_chans: int = 3,
                 global_pool: str = 'avg'):
        super().__init__()
        blocks = _CONFIGS[config] if isinstance(config, str) else config
        prev = in_chans
        for index, widths in enumerate(blocks):
            self.add_module(f'block{index}', _conv_block(widths, prev))
            prev = widths[-1]
        for index in range(4):
            self.add_module(f'pool{index}', nn.MaxPool2d(kernel_size=2, stride=2))
        feature_info = [dict(num_chs=w[-1], reduction=r, module=f'block{i}')
                        for i, (w, r) in enumerate(zip(blocks, (1, 2, 4, 8, 8)))]
        self._init_head(num_classes, blocks[-1][-1], feature_info, global_pool)
        init_weights(self, small_normal)

    def _stage(self, index: int):
        block = getattr(self, f'block{index}')
        pool = getattr(self, f'pool{index - 1}') if index > 0 else None

        def forward(x: torch.Tensor) -> torch.Tensor:
            if pool is not None and (index < 4 or x.shape[-1] > 4):
                x = pool(x)
            return F.relu(block(x))
        return forward

    def stage_forwards(self):
        return [self._stage(i) for i in range(5)]

    def preact_tap(self, stage: int):
        """RepDistiller ``preact=True``: each block's output before the ReLU applied in ``_stage``."""
        return f'block{stage}', 'output'

    def preact_norm(self, stage: int) -> str:
        """The block's closing BatchNorm (RepDistiller ``get_bn_before_relu``)."""
        return f'block{stage}.{len(getattr(self, f"block{stage}")) - 1}'

    def group_matcher(self, coarse: bool = False):
        return dict(stem=r'^block0', blocks=r'^block(\d+)' if coarse else r'^block(\d+)\.(\d+)')


register_variants(__name__, CifarVGG, {
    'cifar_vgg8': dict(config='S'),
    'cifar_vgg11': dict(config='A'),
    'cifar_vgg13': dict(config='B'),
    'cifar_vgg16': dict(config='D'),
    'cifar_vgg19': dict(config='E'),
}, classifier='classifier', first_conv='block0.0')
