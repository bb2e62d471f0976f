"""Feature taps: intermediate features of any timm model, recorded during its one forward pass.

A tap names a layer by stage index (``feature_info`` order, negative allowed), by any module path of the model,
as ``'pre_logits'``: the pooled vector that enters the classifier (RepDistiller's ``feat[-1]``), or as
``'preact:N'``: stage N before its final ReLU (RepDistiller's ``preact=True``, for OFD, AB and ReviewKD).
When every tap of a model is a stage index and the model has timm's
``forward_intermediates``, that API is used (ViTs then give NCHW maps without class/distill tokens);
otherwise forward hooks record the named modules' outputs. Either way logits and features come from one pass.
"""
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from ..errors import DistillError, nearest

TapLayer = Union[int, str]
PRE_LOGITS = 'pre_logits'
PREACT = 'preact:'
ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Hardswish, nn.ELU, nn.Mish)


def feature_info_list(model: nn.Module) -> List[Dict]:
    info = getattr(model, 'feature_info', None)
    if info is None:
        return []
    return list(info.info) if hasattr(info, 'info') else list(info)


def resolve_tap(model: nn.Module, layer: TapLayer) -> Tuple[str, str]:
    """``(module path, 'output' | 'input')``: the module whose output (or input) a tap records.

    Stage ``layer`` records ``feature_info``'s module output; ``'pre_logits'`` the classifier's input;
    ``'preact:N'`` stage N before its final activation: the model's own ``preact_tap(N)`` when it has one (the
    ``cifar_`` zoo, following RepDistiller's ``preact=True``), else the input of the last activation module inside
    that stage (timm ResNets: the last block's ``act2``/``act3``, i.e. after the residual sum, before the ReLU).
    """
    info = feature_info_list(model)
    if isinstance(layer, bool) or not isinstance(layer, (int, str)):
        raise DistillError(f"feature tap {layer!r} must be a stage index, a module path, 'pre_logits' or 'preact:N'")
    if isinstance(layer, int):
        _check_stage(model, info, layer)
        return info[layer]['module'], 'output'
    modules = dict(model.named_modules())
    if layer == PRE_LOGITS:
        classifier = model.get_classifier()
        path = next((name for name, module in modules.items() if module is classifier), None)
        if path is None or not path:
            raise DistillError(f"{type(model).__name__} has no classifier module to tap 'pre_logits' from")
        return path, 'input'
    if layer.startswith(PREACT):
        try:
            stage = int(layer[len(PREACT):])
        except ValueError:
            raise DistillError(f"feature tap '{layer}': write 'preact:N' with a stage index N") from None
        _check_stage(model, info, stage)
        if hasattr(model, 'preact_tap'):
            return model.preact_tap(stage % len(info))
        activation = _final_activation(model, info, stage)
        if activation is None:
            raise DistillError(f"feature tap '{layer}': stage {stage} of {type(model).__name__} has no activation "
                               f"module to tap before; tap a module path instead")
        return activation, 'input'
    if layer not in modules:
        raise DistillError(f"feature tap '{layer}' is not a module of {type(model).__name__}"
                           f"{nearest(layer, modules)}; use a stage index (0..{len(info) - 1}) or a module path")
    return layer, 'output'


def _final_activation(model: nn.Module, info: List[Dict], stage: int) -> Optional[str]:
    """The last activation module inside stage ``stage``, if a BatchNorm feeds it (a CNN's post-residual ReLU);
    None for stages without one, e.g. transformer blocks, whose GELU sits inside the MLP."""
    stage_path = info[stage]['module']
    modules = dict(model.named_modules())
    names = list(modules)
    activations = [name for name in names if isinstance(modules[name], ACTIVATIONS)
                   and (name == stage_path or name.startswith(stage_path + '.'))]
    if not activations:
        return None
    block = activations[-1].rsplit('.', 1)[0] if '.' in activations[-1] else ''
    has_norm = any(isinstance(modules[name], nn.BatchNorm2d) and name.startswith(block)
                   for name in names[:names.index(activations[-1])])
    return activations[-1] if has_norm else None


def tap_key(model: nn.Module, layer: TapLayer) -> TapLayer:
    """``'preact:N'`` becomes stage N for models without a pre-activation (a transformer's stage output is a
    residual sum that no activation follows); every other tap is kept."""
    if isinstance(layer, str) and layer.startswith(PREACT) and not hasattr(model, 'preact_tap'):
        info = feature_info_list(model)
        try:
            stage = int(layer[len(PREACT):])
        except ValueError:
            return layer
        if -len(info) <= stage < len(info) and _final_activation(model, info, stage) is None:
            return stage
    return layer


def preact_norm(model: nn.Module, stage: int) -> nn.BatchNorm2d:
    """The BatchNorm whose output feeds stage ``stage``'s final activation: the model's ``preact_norm(stage)``
    (the ``cifar_`` zoo), else the last BatchNorm registered before that activation in the same block."""
    info = feature_info_list(model)
    _check_stage(model, info, stage)
    modules = dict(model.named_modules())
    if hasattr(model, 'preact_norm'):
        return modules[model.preact_norm(stage % len(info))]
    activation = _final_activation(model, info, stage)
    if activation is None:
        raise DistillError(f"stage {stage} of {type(model).__name__} has no BatchNorm + activation to read")
    block = activation.rsplit('.', 1)[0] if '.' in activation else ''
    names = list(modules)
    norms = [name for name in names[:names.index(activation)] if isinstance(modules[name], nn.BatchNorm2d)
             and name.startswith(block) and 'downsample' not in name]
    if not norms:
        raise DistillError(f"no BatchNorm before the final activation of stage {stage} of {type(model).__name__}")
    return modules[norms[-1]]


def _check_stage(model: nn.Module, info: List[Dict], stage: int) -> None:
    if not -len(info) <= stage < len(info):
        raise DistillError(f"feature tap {stage} is out of range: {type(model).__name__} has {len(info)} "
                           f"stages in feature_info (0..{len(info) - 1}); use a stage index or a module path")


class FeatureExtractor:
    """Runs ``model`` once and returns ``(logits, [features of each tap, in tap order])``."""

    def __init__(self, model: nn.Module, layers: Sequence[TapLayer]):
        self.model, self.keys = model, list(layers)
        self.layers = [tap_key(model, layer) for layer in self.keys]  # what is recorded for each key
        self.taps = [resolve_tap(model, layer) for layer in self.layers]
        info = feature_info_list(model)
        # Stage taps come from forward_intermediates where the model has it (its stage semantics, e.g. ViT maps
        # without prefix tokens); every other tap is a hook that fires during that same pass.
        self.use_intermediates = (any(isinstance(layer, int) for layer in self.layers)
                                  and hasattr(model, 'forward_intermediates') and hasattr(model, 'forward_head'))
        self.stage_indices = {layer: layer % len(info) for layer in self.layers if isinstance(layer, int)}
        self.unique_stages = sorted(set(self.stage_indices.values()))
        self.hooked = [tap for layer, tap in zip(self.layers, self.taps)
                       if not (self.use_intermediates and isinstance(layer, int))]

    def __call__(self, images: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        if not self.layers:
            return self.model(images), []
        recorded: Dict[Tuple[str, str], Tuple[torch.Tensor, int]] = {}
        handles = self._register_hooks(recorded)
        try:
            if self.use_intermediates:
                final, intermediates = self.model.forward_intermediates(images, indices=self.unique_stages)
                logits = self.model.forward_head(final)
                by_stage = dict(zip(self.unique_stages, intermediates))
            else:
                logits, by_stage = self.model(images), {}
        finally:
            for handle in handles:
                handle.remove()
        for (path, mode), (tensor, version) in recorded.items():
            if tensor._version != version:  # e.g. a BatchNorm output later overwritten by ReLU(inplace=True)
                raise DistillError(f"feature tap '{path}' of {type(self.model).__name__} is modified in place "
                                   f"later in the forward pass; tap the module that follows it instead")
        return logits, [by_stage[self.stage_indices[layer]] if self.use_intermediates and isinstance(layer, int)
                        else recorded[tap][0] for layer, tap in zip(self.layers, self.taps)]

    def _register_hooks(self, recorded: Dict[Tuple[str, str], Tuple[torch.Tensor, int]]) -> list:
        modules = dict(self.model.named_modules())
        handles = []
        for path, mode in set(self.hooked):
            if mode == 'input':
                def record_input(module, inputs, key=(path, mode)):
                    # cloned: an in-place activation (ReLU(inplace=True)) would overwrite its input
                    tensor = inputs[0].clone() if module is not self.model.get_classifier() else inputs[0]
                    recorded[key] = (tensor, tensor._version)
                handles.append(modules[path].register_forward_pre_hook(record_input))
            else:
                def record_output(module, inputs, output, key=(path, mode)):
                    output = output[0] if isinstance(output, (tuple, list)) else output
                    recorded[key] = (output, output._version)
                handles.append(modules[path].register_forward_hook(record_output))
        return handles


def probe_shapes(extractor: FeatureExtractor, input_size: Sequence[int]) -> List[torch.Size]:
    """Feature shapes from one dry run on a 2-sample dummy input (sizes adapters automatically)."""
    model = extractor.model
    was_training = model.training
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device('cpu')
    dtype = parameter.dtype if parameter is not None else torch.float32  # e.g. a float64 model
    model.eval()
    with torch.no_grad():
        _, features = extractor(torch.zeros(2, *input_size, device=device, dtype=dtype))
    model.train(was_training)
    return [f.shape for f in features]
