"""ShuffleNetV1 and ShuffleNetV2 for CIFAR, the cross-architecture students of the CRD/DKD benchmark.

Architectures, module names and initialisation (PyTorch defaults) follow RepDistiller ``models/ShuffleNetv1.py``
(Zhang et al., "ShuffleNet", CVPR 2018: groups 3, widths 240/480/960, 4/8/4 blocks) and ``models/ShuffleNetv2.py``
(Ma et al., "ShuffleNet V2", ECCV 2018: net size 1, widths 116/232/464, 3/7/3 blocks, a 1x1 conv to 1024): a 1x1
stem of 24 channels, three stride-2 stages, global pooling and ``linear``. Where the reference applies
``F.relu``, these models use ``nn.ReLU`` modules (no parameters) so that ``'preact:N'`` taps can hook the input
of each stage's last activation, RepDistiller's ``preact=True`` features. Reference parameter counts at 100
classes: ShuffleNetV1 949,258; ShuffleNetV2 1,355,528 (the "0.95M" / "1.36M" of the DKD/ReviewKD tables).
"""
import torch
import torch.nn as nn
from einops import rearrange

from ._base import CifarNet, register_variants


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Channel g * (C / groups) + i moves to i * groups + g (ShuffleNet's shuffle)."""
    return rearrange(x, 'n (g c) h w -> n (c g) h w', g=groups)


class ShuffleV1Block(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, stride: int, groups: int):
        super().__init__()
        mid_planes = out_planes // 4
        self.first_groups = 1 if in_planes == 24 else groups  # the stem's 24 channels are not grouped
        self.stride = stride
        self.conv1 = nn.Conv2d(in_planes, mid_planes, 1, groups=self.first_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_planes)
        self.conv2 = nn.Conv2d(mid_planes, mid_planes, 3, stride=stride, padding=1, groups=mid_planes, bias=False)
        self.bn2 = nn.BatchNorm2d(mid_planes)
        self.conv3 = nn.Conv2d(mid_planes, out_planes, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.AvgPool2d(3, stride=2, padding=1) if stride == 2 else nn.Identity()
        self.relu = nn.ReLU()
        self.act_out = nn.ReLU()  # its input is the block's pre-activation (the 'preact:N' tap)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = channel_shuffle(self.relu(self.bn1(self.conv1(x))), self.first_groups)
        out = self.bn3(self.conv3(self.relu(self.bn2(self.conv2(out)))))
        shortcut = self.shortcut(x)
        # a stride-2 block concatenates its pooled input instead of adding it
        return self.act_out(torch.cat([out, shortcut], 1) if self.stride == 2 else out + shortcut)


class ShuffleV2Block(nn.Module):
    """The stride-1 unit: half the channels pass, the other half goes through 1x1 - depthwise 3x3 - 1x1."""

    def __init__(self, channels: int):
        super().__init__()
        half = channels // 2
        self.conv1 = nn.Conv2d(half, half, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(half)
        self.conv2 = nn.Conv2d(half, half, 3, padding=1, groups=half, bias=False)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv3 = nn.Conv2d(half, half, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(half)
        self.relu = nn.ReLU()
        self.act_out = nn.ReLU()  # its input, [passed half, bn3's output], is RepDistiller's preact feature

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        passed, branch = x.chunk(2, dim=1)
        branch = self.bn3(self.conv3(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(branch)))))))
        # The reference activates the branch only; the passed half is already >= 0 (every unit ends in a ReLU),
        # so activating the concatenation computes the same thing and exposes the pre-activation to a hook.
        return channel_shuffle(self.act_out(torch.cat([passed, branch], 1)), 2)


class ShuffleV2DownBlock(nn.Module):
    """The stride-2 unit: both halves of the output come from the whole input."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        mid = out_channels // 2
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, stride=2, padding=1, groups=in_channels, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, 3, stride=2, padding=1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left = self.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = self.bn4(self.conv4(self.relu(self.bn3(self.conv3(x)))))
        right = self.relu(self.bn5(self.conv5(right)))
        return channel_shuffle(torch.cat([left, right], 1), 2)


class CifarShuffleNet(CifarNet):
    classifier_name = 'linear'

    def __init__(self, version: int, widths, num_blocks, groups: int = 3, last_channels: int = 0,
                 num_classes: int = 100, in_chans: int = 3, global_pool: str = 'avg'):
        super().__init__()
        self.version = version
        self.conv1 = nn.Conv2d(in_chans, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.relu = nn.ReLU()
        in_planes = 24
        for index, (width, count) in enumerate(zip(widths, num_blocks), start=1):
            if version == 1:  # the first block concatenates its input: it adds width - in_planes channels
                blocks = [ShuffleV1Block(in_planes if i == 0 else width, width - in_planes if i == 0 else width,
                                         2 if i == 0 else 1, groups) for i in range(count)]
            else:
                blocks = [ShuffleV2DownBlock(in_planes, width)] + [ShuffleV2Block(width) for _ in range(count)]
            self.add_module(f'layer{index}', nn.Sequential(*blocks))
            in_planes = width
        num_features = in_planes
        if last_channels:
            self.conv2 = nn.Conv2d(in_planes, last_channels, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(last_channels)
            self.act2 = nn.ReLU()  # not the stem's: a hook on 'relu' must see the stem alone
            num_features = last_channels
        feature_info = [dict(num_chs=24, reduction=1, module='relu')] + [
            dict(num_chs=w, reduction=2 ** i, module=f'layer{i}') for i, w in enumerate(widths, start=1)]
        self._init_head(num_classes, num_features, feature_info, global_pool)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn1(self.conv1(x)))

    def stage_forwards(self):
        return [self.stem, self.layer1, self.layer2, self.layer3]

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.act2(self.bn2(self.conv2(x))) if hasattr(self, 'conv2') else x

    def preact_tap(self, stage: int):
        """RepDistiller ``preact=True``: the stem as is; for each stage, the input of its last block's final
        activation."""
        if stage == 0:
            return 'relu', 'output'
        return f'layer{stage}.{len(getattr(self, f"layer{stage}")) - 1}.act_out', 'input'

    def group_matcher(self, coarse: bool = False):
        return dict(stem=r'^conv1|^bn1', blocks=r'^layer(\d+)' if coarse else r'^layer(\d+)\.(\d+)',
                    head_norm=r'^conv2|^bn2')


register_variants(__name__, CifarShuffleNet, {
    'cifar_shufflenetv1': dict(version=1, widths=(240, 480, 960), num_blocks=(4, 8, 4), groups=3),
    'cifar_shufflenetv2': dict(version=2, widths=(116, 232, 464), num_blocks=(3, 7, 3), last_channels=1024),
}, classifier='linear', pool_size=(4, 4))
