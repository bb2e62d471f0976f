"""Loading weights from local files: safetensors, plain state_dicts, ``distill`` checkpoints and the
RepDistiller/mdistiller teacher checkpoints (``ckpt_epoch_240.pth``: weights under key ``model``)."""
import os
from typing import Dict, List, Optional

import torch
import torch.nn as nn

from ..errors import DistillError, first_line
from ..runs.checkpoint import torch_load

# Keys under which known checkpoint formats nest their weights: distill and RepDistiller/mdistiller use
# 'model', timm's train.py and many others 'state_dict'; a distill run with ``ema`` keeps the averaged student, the
# one it evaluated and exported, under 'model_ema' (None without).
_NESTED_KEYS = ('model_ema', 'model', 'state_dict')


def load_state_dict_file(path: str) -> Dict[str, torch.Tensor]:
    """Read a state_dict from ``path`` (``.safetensors`` or a torch file), unwrapping known checkpoint formats
    and DataParallel's ``module.`` prefix. Torch files are read with ``weights_only=True``."""
    if not os.path.isfile(path):
        raise DistillError(f"weights file not found: {path} (check the path)")
    if path.endswith('.safetensors'):
        from safetensors.torch import load_file
        try:
            state = load_file(path)
        except Exception as exc:  # any decoding failure means the file is damaged
            raise DistillError(f"weights file {path} is corrupt or truncated ({first_line(exc, 200)}); re-download or "
                               f"re-export it") from None
    else:
        state = torch_load(path, 'weights file')
    for key in _NESTED_KEYS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DistillError(f"{path} holds no state_dict (expected tensors by name, or a checkpoint with "
                           f"weights under one of {list(_NESTED_KEYS)})")
    if state and all(k.startswith('module.') for k in state):
        state = {k[len('module.'):]: v for k, v in state.items()}
    return state


def classifier_path(model: nn.Module) -> str:
    """Module path of the model's classifier (timm ``get_classifier``), e.g. 'fc' or 'head'."""
    classifier = model.get_classifier()
    return next((name for name, module in model.named_modules() if module is classifier), '')


def load_weights(model: nn.Module, path: str, strict: bool = True, head_fix: Optional[str] = None) -> nn.Module:
    """Load the weights in ``path`` into ``model`` (strict by default); a mismatch is a one-line error (a classifier
    for other classes suggests ``head_fix``)."""
    _load(model, path, strict, skip_head=False, head_fix=head_fix)
    return model


def load_backbone_weights(model: nn.Module, path: str) -> List[str]:
    """Load every weight of ``path`` but its classifier into ``model`` (which has a new head, e.g. for other
    classes); the rest must fit strictly. Returns the skipped keys as ``'name (shape)'``, for the run log."""
    return _load(model, path, strict=True, skip_head=True)


def _load(model: nn.Module, path: str, strict: bool, skip_head: bool, head_fix: Optional[str] = None) -> List[str]:
    state = load_state_dict_file(path)
    own = model.state_dict()
    skipped: List[str] = []
    if skip_head:
        head = classifier_path(model)
        is_head = (lambda key: key.startswith(head + '.')) if head else (lambda key: False)
        skipped = sorted(f"{k} {tuple(v.shape)}" for k, v in state.items() if is_head(k))
        state = {k: v for k, v in state.items() if not is_head(k)}
        own = {k: v for k, v in own.items() if not is_head(k)}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong_shape = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
                   for k in own if k in state and state[k].shape != own[k].shape]
    head_cfg = getattr(model, 'pretrained_cfg', {}).get('classifier')
    head_key = f'{head_cfg}.weight' if head_cfg else None
    if head_key in state and head_key in own and state[head_key].shape[0] != own[head_key].shape[0]:
        raise DistillError(f"{path}: its classifier has {state[head_key].shape[0]} classes but the data has "
                           f"{own[head_key].shape[0]}; " + (head_fix or "use weights trained on this data's classes, "
                           "or set transfer.new_head=true to fine-tune them with a new classifier"))
    if wrong_shape:
        raise DistillError(f"{path} does not fit {type(model).__name__}: shape mismatch for "
                           f"{', '.join(wrong_shape[:3])}{' ...' if len(wrong_shape) > 3 else ''} "
                           f"(wrong model name or class count?)")
    if strict and (missing or unexpected):
        raise DistillError(f"{path} does not fit {type(model).__name__}: {len(missing)} missing keys "
                           f"{missing[:3]}, {len(unexpected)} unexpected keys {unexpected[:3]} "
                           f"(wrong model name for this checkpoint?)")
    model.load_state_dict(state, strict=strict and not skip_head)
    return skipped
