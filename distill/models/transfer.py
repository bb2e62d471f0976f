"""Transfer learning for the model being trained: a new head, frozen stages, per-stage learning rates.

Stages come from the model's timm ``group_matcher`` (coarse groups: stem, then each stage or block, then the
head) or, for models without one, timm's automatic layer grouping, so nothing is hard-coded per architecture.
``freeze: linear_probe`` trains only the head, ``partial`` freezes the stem and the first ``frozen_stages``
stages, ``full`` trains everything; frozen BatchNorm layers stay in eval mode (their statistics are part of the
pretrained features). ``unfreeze_every: K`` unfreezes one more stage, deepest first, every K epochs; the state is a
function of the epoch, so a resumed run freezes exactly what the uninterrupted one did. Learning rates: the head
at the recipe's lr, everything else times ``backbone_lr_scale`` and, with ``layer_decay``, times
decay^(layers between it and the head) (timm's BEiT-style layer decay, fine-grained groups).
"""
import math
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn
from timm.models import group_parameters
from timm.optim import auto_group_layers

from ..config import OptimizerConfig, TransferConfig
from ..errors import DistillError


def layer_groups(model: nn.Module, coarse: bool) -> List[List[str]]:
    """Parameter names by layer, input to output; the last group holds the classifier."""
    if hasattr(model, 'group_matcher'):
        groups = group_parameters(model, model.group_matcher(coarse=coarse))
        return [list(names) for _, names in sorted(groups.items())]
    layer_map = auto_group_layers(model)
    ordered: Dict[int, List[str]] = {}
    for name, layer in layer_map.items():
        ordered.setdefault(layer, []).append(name)
    return [ordered[layer] for layer in sorted(ordered)]


def replace_head(model: nn.Module, num_classes: int, hidden: Optional[int] = None, dropout: float = 0.0) -> None:
    """A fresh classifier via timm's ``reset_classifier`` (CNNs and ViTs alike), optionally dropout and one
    hidden ReLU layer in front of it."""
    model.reset_classifier(num_classes)
    if hidden is None and dropout == 0.0:
        return
    classifier = model.get_classifier()
    in_features = classifier.in_features
    layers: List[nn.Module] = [nn.Dropout(dropout)] if dropout > 0 else []
    if hidden is not None:
        layers += [nn.Linear(in_features, hidden), nn.ReLU(inplace=True)]
        layers += [nn.Dropout(dropout)] if dropout > 0 else []
    layers.append(nn.Linear(hidden or in_features, num_classes))
    path = next(name for name, module in model.named_modules() if module is classifier)
    model.set_submodule(path, nn.Sequential(*layers))


class StageFreezer:
    """Which leading stages of ``model`` are frozen at each epoch, and the logging of what trains."""

    def __init__(self, model: nn.Module, cfg: TransferConfig):
        self.model, self.cfg = model, cfg
        self.groups = layer_groups(model, coarse=True)
        stages = len(self.groups) - 2  # stem and head are not stages
        if cfg.freeze == 'partial' and cfg.frozen_stages > stages:
            raise DistillError(f"transfer.frozen_stages={cfg.frozen_stages} but {type(model).__name__} has "
                               f"{stages} stages after its stem; use 0..{stages}")
        if cfg.freeze == 'linear_probe':
            self.initially_frozen = len(self.groups) - 1
        elif cfg.freeze == 'partial':
            self.initially_frozen = 1 + cfg.frozen_stages
        else:
            self.initially_frozen = 0

    def frozen_groups(self, epoch: int) -> int:
        if self.cfg.unfreeze_every > 0:
            return max(0, self.initially_frozen - epoch // self.cfg.unfreeze_every)
        return self.initially_frozen

    def apply(self, epoch: int) -> None:
        frozen = {name for group in self.groups[:self.frozen_groups(epoch)] for name in group}
        for name, param in self.model.named_parameters():
            param.requires_grad_(name not in frozen)

    def set_eval_modes(self) -> None:
        """Keep BatchNorm layers whose parameters are all frozen in eval mode (running statistics fixed)."""
        for module in self.model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                params = list(module.parameters())
                if params and not any(p.requires_grad for p in params):
                    module.eval()

    def describe(self) -> List[str]:
        params = dict(self.model.named_parameters())
        lines = []
        for index, group in enumerate(self.groups):
            label = 'stem' if index == 0 else 'head' if index == len(self.groups) - 1 else f'stage {index}'
            trainable = sum(params[n].numel() for n in group if params[n].requires_grad)
            frozen = sum(params[n].numel() for n in group if not params[n].requires_grad)
            lines.append(f"{label} ({group[0].split('.')[0]}...): {trainable:,} trainable, {frozen:,} frozen")
        return lines


def param_groups(student: nn.Module, extra: Sequence[nn.Module], opt: OptimizerConfig,
                 cfg: TransferConfig) -> List[Dict]:
    """Optimizer groups over *all* student parameters (frozen ones too, so that unfreezing needs no new
    optimizer), with ``lr_scale`` per layer and weight decay as configured. timm schedulers multiply each
    group's lr by its ``lr_scale``; without a scheduler, call ``apply_lr_scales``."""
    layers = layer_groups(student, coarse=False)
    head = len(layers) - 1
    params = dict(student.named_parameters())
    groups: Dict[tuple, Dict] = {}

    def add(param: torch.Tensor, scale: float) -> None:
        decay = 0.0 if opt.filter_bias_and_bn and param.ndim <= 1 else opt.weight_decay
        group = groups.setdefault((scale, decay), {'params': [], 'lr_scale': scale, 'weight_decay': decay})
        group['params'].append(param)

    for layer, names in enumerate(layers):
        scale = 1.0
        if layer != head:
            scale = cfg.backbone_lr_scale * (cfg.layer_decay ** (head - layer) if cfg.layer_decay else 1.0)
        for name in names:
            add(params[name], scale)
    for module in extra:  # adapters of loss terms train at the full rate
        for param in module.parameters():
            add(param, 1.0)
    return list(groups.values())


def uses_transfer(cfg: TransferConfig) -> bool:
    return (cfg.new_head or cfg.freeze != 'full' or cfg.backbone_lr_scale != 1.0 or cfg.layer_decay is not None
            or cfg.unfreeze_every > 0)


def apply_lr_scales(optimizer: torch.optim.Optimizer) -> None:
    """Scale each group's lr once (what a timm scheduler does at every update) for runs without a scheduler."""
    for group in optimizer.param_groups:
        group['lr'] = group['lr'] * group.get('lr_scale', 1.0)


def transfer_parameters(student: nn.Module, source: Dict[str, torch.Tensor],
                        prefix_map: Optional[Dict[str, str]] = None) -> Dict[str, List[str]]:
    """Initialise ``student`` from another model's state_dict wherever it fits, and say what happened.

    A student tensor ``name`` takes ``source[name]`` (after ``prefix_map``: ``{'layer3.4.': 'layer3.0.'}`` reads
    the student's ``layer3.0.*`` from the source's ``layer3.4.*``) when the shapes agree. ViT position embeddings
    and patch-embedding kernels of another size are resampled with timm's ``resample_abs_pos_embed`` /
    ``resample_patch_embed``. Returns ``{'copied', 'resized', 'not_copied'}`` lists of names (with reasons).
    """
    from timm.layers import resample_abs_pos_embed, resample_patch_embed
    prefix_map = prefix_map or {}
    own = student.state_dict()
    report: Dict[str, List[str]] = {'copied': [], 'resized': [], 'not_copied': []}
    updates = {}
    for name, tensor in own.items():
        source_name = name
        for source_prefix, student_prefix in prefix_map.items():
            if name.startswith(student_prefix):
                source_name = source_prefix + name[len(student_prefix):]
                break
        if source_name not in source:
            report['not_copied'].append(f"{name} (absent)")
            continue
        value = source[source_name]
        if value.shape == tensor.shape:
            updates[name] = value
            report['copied'].append(name)
        elif name.endswith('pos_embed') and value.dim() == 3 and value.shape[-1] == tensor.shape[-1]:
            prefix_tokens = getattr(student, 'num_prefix_tokens', 1)
            grid = int(math.sqrt(tensor.shape[1] - prefix_tokens))
            updates[name] = resample_abs_pos_embed(value, [grid, grid], num_prefix_tokens=prefix_tokens)
            report['resized'].append(f"{name} {tuple(value.shape)} -> {tuple(tensor.shape)}")
        elif name.endswith('patch_embed.proj.weight') and value.shape[:2] == tensor.shape[:2]:
            updates[name] = resample_patch_embed(value, list(tensor.shape[-2:]))
            report['resized'].append(f"{name} {tuple(value.shape)} -> {tuple(tensor.shape)}")
        else:
            report['not_copied'].append(f"{name} ({tuple(value.shape)} vs {tuple(tensor.shape)})")
    student.load_state_dict({**own, **{k: v.to(own[k].dtype) for k, v in updates.items()}})
    return report
