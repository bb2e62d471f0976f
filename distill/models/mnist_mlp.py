"""The MNIST nets of Hinton, Vinyals & Dean (2015, "Distilling the Knowledge in a Neural Network", §3), registered in
timm's registry under ``mnist_mlp_*``: fully connected ReLU nets on the 784 pixels of a 28x28 image.

The paper's teacher is 784-1200-1200-10 (``mnist_mlp_1200``), trained with dropout as in Hinton et al. (2012,
arXiv 1207.0580): 20% of the input pixels and 50% of the hidden units (``input_drop_rate`` 0.2, ``drop_rate`` 0.5);
its student 784-800-800-10 (``mnist_mlp_800``) without dropout; the temperature study's small students have 300 and
30 units per layer. ``drop_rate`` drops each hidden layer's units (the last one's are the classifier's input, as
timm's ``drop_rate`` is). The max-norm bound of the 2012 paper is a training option (``trainer.max_norm``).

timm's model API: ``forward_features`` gives the last hidden layer (N x width), ``forward_head`` the logits,
``feature_info`` / ``forward_intermediates`` every hidden layer (after its ReLU), so feature methods and export work.
"""
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.models import generate_default_cfgs, register_model

from ._base import build_variant, take_indices_of

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)  # the 60,000 training images' pixel statistics (scaled to [0, 1])


class MnistMLP(nn.Module):
    def __init__(self, hidden: Sequence[int] = (800, 800), num_classes: int = 10, in_chans: int = 1,
                 img_size: int = 28, drop_rate: float = 0.0, input_drop_rate: float = 0.0, global_pool: str = ''):
        super().__init__()
        if global_pool:
            raise ValueError(f"an MLP has no spatial pooling; global_pool must be '', got {global_pool!r}")
        self.num_classes, self.in_chans, self.img_size = num_classes, in_chans, img_size
        self.input_drop = nn.Dropout(input_drop_rate)
        widths = [in_chans * img_size * img_size] + list(hidden)
        self.blocks = nn.Sequential(*[
            nn.Sequential(nn.Linear(fan_in, fan_out), nn.ReLU(inplace=True), nn.Dropout(drop_rate))
            for fan_in, fan_out in zip(widths[:-1], widths[1:])])
        self.num_features = self.head_hidden_size = widths[-1]
        self.feature_info = [dict(num_chs=width, reduction=1, module=f'blocks.{index}')
                             for index, width in enumerate(hidden)]
        self.fc = self._classifier(num_classes)

    def _classifier(self, num_classes: int) -> nn.Module:
        return nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        self.fc = self._classifier(num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.input_drop(x.flatten(1)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = 'NCHW',
                              intermediates_only: bool = False
                              ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """timm's feature API over the hidden layers (``indices`` as in timm; there is no final norm)."""
        take_indices, max_index = take_indices_of(len(self.blocks), indices)
        blocks = self.blocks[:max_index + 1] if stop_early else self.blocks
        x, intermediates = self.input_drop(x.flatten(1)), []
        for index, block in enumerate(blocks):
            x = block(x)
            if index in take_indices:
                intermediates.append(x)
        return intermediates if intermediates_only else (x, intermediates)


VARIANTS = {'mnist_mlp': (800, 800), 'mnist_mlp_1200': (1200, 1200), 'mnist_mlp_800': (800, 800),
            'mnist_mlp_300': (300, 300), 'mnist_mlp_30': (30, 30)}
default_cfgs = generate_default_cfgs({name: {
    'url': '', 'num_classes': 10, 'input_size': (1, 28, 28), 'pool_size': None, 'crop_pct': 1.0,
    'interpolation': 'bilinear', 'mean': MNIST_MEAN, 'std': MNIST_STD, 'first_conv': 'blocks.0.0',
    'classifier': 'fc', 'license': 'apache-2.0'} for name in VARIANTS})


def _entrypoint(variant: str, hidden: Tuple[int, ...]):
    def entrypoint(pretrained: bool = False, **kwargs) -> MnistMLP:
        kwargs.setdefault('hidden', hidden)
        out_indices = kwargs.pop('out_indices', tuple(range(len(kwargs['hidden']))))
        return build_variant(MnistMLP, variant, pretrained, dict(feature_cls='getter', out_indices=out_indices),
                             **kwargs)
    entrypoint.__name__ = entrypoint.__qualname__ = variant
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f'{variant}: MnistMLP(hidden={hidden}), Hinton et al. 2015 §3'
    return entrypoint


for _variant, _hidden in VARIANTS.items():
    globals()[_variant] = register_model(_entrypoint(_variant, _hidden))
