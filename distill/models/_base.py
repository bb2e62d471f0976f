"""Shared timm interface for the CIFAR architectures of the KD literature.

Each architecture keeps the module names of the RepDistiller/mdistiller reference code (so their public
teacher checkpoints load with ``strict=True``) and describes itself as a list of stages; this base class turns
that description into timm's model API: ``forward_features``, ``forward_head``, ``reset_classifier``,
``feature_info`` and ``forward_intermediates``.
"""
import inspect
import sys
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import SelectAdaptivePool2d
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

# CIFAR-100 statistics used by the CRD benchmark (RepDistiller dataset/cifar100.py).
CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)


def take_indices_of(count: int, indices: Optional[Union[int, List[int]]]) -> Tuple[List[int], int]:
    """timm's ``forward_intermediates`` contract for ``indices`` (None: every stage, n: the last n, a list: those,
    negatives from the end): the absolute indices and the largest (written here: timm keeps its helper private)."""
    if indices is None or isinstance(indices, int):
        last_n = count if indices is None else indices
        if not 0 < last_n <= count:
            raise ValueError(f'last-n ({last_n}) is out of range (1 to {count})')
        taken = list(range(count - last_n, count))
    else:
        taken = [count + i if i < 0 else i for i in indices]
        if not all(0 <= i < count for i in taken):
            raise ValueError(f'feature indices {list(indices)} are out of range (0 to {count - 1})')
    return taken, max(taken)


def cifar_cfg(**kwargs: Any) -> Dict[str, Any]:
    """timm pretrained cfg for an untrained CIFAR model (no weights are hosted for these architectures)."""
    return {
        'url': '', 'num_classes': 100, 'input_size': (3, 32, 32), 'pool_size': (8, 8),
        'crop_pct': 1.0, 'interpolation': 'bilinear', 'mean': CIFAR100_MEAN, 'std': CIFAR100_STD,
        'first_conv': 'conv1', 'classifier': 'fc', 'license': 'bsd-2-clause', **kwargs,
    }


def init_weights(model: nn.Module, linear_init: Optional[Callable[[nn.Linear], None]] = None) -> None:
    """The reference initialisation of the KD zoo (after fb.resnet.torch): every conv He-normal on its fan-out,
    i.e. normal(0, sqrt(2 / (k * k * out_channels))) (RepDistiller writes it out; ``kaiming_normal_`` draws the
    same numbers), conv biases 0, BatchNorm weight 1 and bias 0; linear layers ``linear_init`` (None: PyTorch's
    default)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and linear_init is not None:
            linear_init(m)


def zero_bias(linear: nn.Linear) -> None:
    nn.init.zeros_(linear.bias)


def small_normal(linear: nn.Linear) -> None:
    """normal(0, 0.01) weights and zero bias (RepDistiller's VGG and MobileNetV2 classifiers)."""
    nn.init.normal_(linear.weight, 0, 0.01)
    nn.init.zeros_(linear.bias)


class CifarNet(nn.Module):
    """Base of the ``cifar_*`` models: subclasses build their layers, then call ``_init_head``.

    Subclasses implement ``stage_forwards()`` (one callable per feature stage, applied in order) and may
    override ``final_norm`` (applied after the last stage, e.g. the pre-activation WRN's closing BN-ReLU).
    """

    classifier_name = 'fc'
    head_drop_rate = 0.0  # timm's drop_rate: dropout on the pooled features, before the classifier

    def _init_head(self, num_classes: int, num_features: int, feature_info: List[Dict[str, Any]],
                   global_pool: str = 'avg') -> None:
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = num_features
        self.feature_info = feature_info
        self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=True)
        self.grad_checkpointing = False
        setattr(self, self.classifier_name, self.make_classifier(num_features, num_classes))

    def make_classifier(self, num_features: int, num_classes: int) -> nn.Module:
        return nn.Linear(num_features, num_classes) if num_classes > 0 else nn.Identity()

    def stage_forwards(self) -> List[Callable[[torch.Tensor], torch.Tensor]]:
        raise NotImplementedError

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return x

    # --- timm model API -------------------------------------------------------------------------------
    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return getattr(self, self.classifier_name)

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=True)
        setattr(self, self.classifier_name, self.make_classifier(self.num_features, num_classes))

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stage_forwards():
            x = stage(x)
        return self.final_norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.head_drop_rate:
            x = F.dropout(x, p=self.head_drop_rate, training=self.training)
        return x if pre_logits else self.get_classifier()(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """timm's feature API: outputs of the stages in ``feature_info`` (``indices``: last n if int, else a
        list, negative allowed). ``norm`` applies the model's final norm to the last stage's output."""
        if output_fmt != 'NCHW':
            raise ValueError(f"output_fmt must be 'NCHW' for {type(self).__name__}, got {output_fmt!r}")
        stages = self.stage_forwards()
        take_indices, max_index = take_indices_of(len(stages), indices)
        if stop_early:
            stages = stages[:max_index + 1]
        intermediates = []
        last = len(self.feature_info) - 1
        for index, stage in enumerate(stages):
            x = stage(x)
            if index in take_indices:
                intermediates.append(self.final_norm(x) if norm and index == last else x)
        if intermediates_only:
            return intermediates
        return self.final_norm(x), intermediates


def build_variant(model_cls: type, variant: str, pretrained: bool, feature_cfg: Dict[str, Any],
                  **kwargs: Any) -> nn.Module:
    """``build_model_with_cfg``, taking the model arguments every timm model takes (so timm's ``train.py`` and
    ``create_model(..., device=, dtype=)`` build these models too): ``device`` and ``dtype`` (the model is moved
    there once built), ``drop_rate`` (dropout before the classifier; an architecture whose reference code defines
    its own ``drop_rate``, WRN's dropout between convolutions, the MLPs' hidden dropout, keeps that meaning) and
    ``drop_path_rate`` (none of these reference architectures has stochastic depth: only 0 is accepted); the model
    carries ``in_chans`` as timm's do."""
    device, dtype = kwargs.pop('device', None), kwargs.pop('dtype', None)
    if kwargs.pop('drop_path_rate', 0.0):
        raise ValueError(f"{variant} has no stochastic depth (the reference architecture has none): drop_path_rate "
                         f"must be 0")
    parameters = inspect.signature(model_cls.__init__).parameters
    head_drop_rate = 0.0 if 'drop_rate' in parameters else kwargs.pop('drop_rate', 0.0)
    model = build_model_with_cfg(model_cls, variant, pretrained, feature_cfg=feature_cfg, **kwargs)
    model.in_chans = kwargs.get('in_chans', parameters['in_chans'].default)  # timm's attribute (its tasks read it)
    if head_drop_rate:
        model.head_drop_rate = head_drop_rate
    return model.to(device=device, dtype=dtype) if device is not None or dtype is not None else model


def register_variants(module_name: str, model_cls: type, archs: Dict[str, Dict[str, Any]],
                      **cfg_overrides: Any) -> None:
    """Register one timm entrypoint per variant (``archs``: name -> constructor kwargs), built through
    ``build_model_with_cfg`` so pretrained cfgs, ``pretrained_cfg_overlay=dict(file=...)`` and
    ``features_only=True`` (via ``forward_intermediates``) behave as for timm's own models."""
    module = sys.modules[module_name]
    module.default_cfgs = generate_default_cfgs({name: cifar_cfg(**cfg_overrides) for name in archs})

    def make_entrypoint(variant: str, arch_kwargs: Dict[str, Any]) -> Callable[..., nn.Module]:
        def entrypoint(pretrained: bool = False, **kwargs: Any) -> nn.Module:
            return build_variant(model_cls, variant, pretrained,
                                 dict(feature_cls='getter', out_indices=kwargs.pop('out_indices', None)),
                                 **arch_kwargs, **kwargs)
        entrypoint.__name__ = entrypoint.__qualname__ = variant
        entrypoint.__module__ = module_name
        entrypoint.__doc__ = f'{variant}: {model_cls.__name__}({arch_kwargs})'
        return entrypoint

    for variant, arch_kwargs in archs.items():
        entrypoint = make_entrypoint(variant, arch_kwargs)
        setattr(module, variant, entrypoint)
        register_model(entrypoint)
