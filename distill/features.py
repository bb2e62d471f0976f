"""Feature taps: intermediate features of any timm model, recorded during its one forward pass.

A tap names a layer by stage index (``feature_info`` order, negative allowed), by any module path of the model,
or as ``'pre_logits'``: the pooled vector that enters the classifier (RepDistiller's ``feat[-1]``). When every tap of a model is a stage index and the model has timm's
``forward_intermediates``, that API is used (ViTs then give NCHW maps without class/distill tokens);
otherwise forward hooks record the named modules' outputs. Either way logits and features come from one pass.
"""
from typing import Dict, List, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .errors import DistillError
from .losses.base import nearest

TapLayer = Union[int, str]
PRE_LOGITS = 'pre_logits'


def feature_info_list(model: nn.Module) -> List[Dict]:
    info = getattr(model, 'feature_info', None)
    if info is None:
        return []
    return list(info.info) if hasattr(info, 'info') else list(info)


def resolve_module_path(model: nn.Module, layer: TapLayer) -> str:
    """The module path a tap records: stage ``layer`` of ``feature_info``, or ``layer`` as a module path."""
    info = feature_info_list(model)
    if isinstance(layer, int):
        if not -len(info) <= layer < len(info):
            raise DistillError(f"feature tap {layer} is out of range: {type(model).__name__} has {len(info)} "
                               f"stages in feature_info (0..{len(info) - 1}); use a stage index or a module path")
        return info[layer]['module']
    if layer == PRE_LOGITS:
        return layer
    modules = dict(model.named_modules())
    if layer not in modules:
        raise DistillError(f"feature tap '{layer}' is not a module of {type(model).__name__}"
                           f"{nearest(layer, modules)}; use a stage index (0..{len(info) - 1}) or a module path")
    return layer


class FeatureExtractor:
    """Runs ``model`` once and returns ``(logits, [features of each tap, in tap order])``."""

    def __init__(self, model: nn.Module, layers: Sequence[TapLayer]):
        self.model, self.layers = model, list(layers)
        self.module_paths = [resolve_module_path(model, layer) for layer in self.layers]
        info = feature_info_list(model)
        self.use_intermediates = (
            bool(self.layers) and all(isinstance(layer, int) for layer in self.layers)
            and hasattr(model, 'forward_intermediates') and hasattr(model, 'forward_head'))
        if self.use_intermediates:
            self.stage_indices = [layer % len(info) for layer in self.layers]
            self.unique_stages = sorted(set(self.stage_indices))

    def __call__(self, images: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        if not self.layers:
            return self.model(images), []
        if self.use_intermediates:
            final, intermediates = self.model.forward_intermediates(images, indices=self.unique_stages)
            by_stage = dict(zip(self.unique_stages, intermediates))
            return self.model.forward_head(final), [by_stage[i] for i in self.stage_indices]
        return self._forward_with_hooks(images)

    def _forward_with_hooks(self, images: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        recorded: Dict[str, Tuple[torch.Tensor, int]] = {}
        modules = dict(self.model.named_modules())
        handles = []
        for path in set(self.module_paths):
            if path == PRE_LOGITS:  # the classifier's input: pooled features, for any timm model
                def record_input(module, inputs):
                    recorded[PRE_LOGITS] = (inputs[0], inputs[0]._version)
                handles.append(self.model.get_classifier().register_forward_pre_hook(record_input))
                continue

            def record(module, inputs, output, path=path):
                output = output[0] if isinstance(output, (tuple, list)) else output
                recorded[path] = (output, output._version)
            handles.append(modules[path].register_forward_hook(record))
        try:
            logits = self.model(images)
        finally:
            for handle in handles:
                handle.remove()
        for path, (tensor, version) in recorded.items():
            if tensor._version != version:  # e.g. a BatchNorm output later overwritten by ReLU(inplace=True)
                raise DistillError(f"feature tap '{path}' of {type(self.model).__name__} is modified in place "
                                   f"later in the forward pass; tap the module that follows it instead")
        return logits, [recorded[path][0] for path in self.module_paths]


def probe_shapes(extractor: FeatureExtractor, input_size: Sequence[int]) -> List[torch.Size]:
    """Feature shapes from one dry run on a 2-sample dummy input (sizes adapters automatically)."""
    model = extractor.model
    was_training = model.training
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device('cpu')
    model.eval()
    with torch.no_grad():
        _, features = extractor(torch.zeros(2, *input_size, device=device))
    model.train(was_training)
    return [f.shape for f in features]
