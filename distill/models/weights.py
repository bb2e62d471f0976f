"""Loading weights from local files: safetensors, plain state_dicts, ``distill`` checkpoints and the
RepDistiller/mdistiller teacher checkpoints (``ckpt_epoch_240.pth``: weights under key ``model``)."""
import os
from typing import Dict

import torch
import torch.nn as nn

from ..errors import DistillError

# Keys under which known checkpoint formats nest their weights: distill and RepDistiller/mdistiller use
# 'model', timm's train.py and many others 'state_dict'.
_NESTED_KEYS = ('model', 'state_dict')


def load_state_dict_file(path: str) -> Dict[str, torch.Tensor]:
    """Read a state_dict from ``path`` (``.safetensors`` or a torch file), unwrapping known checkpoint formats
    and DataParallel's ``module.`` prefix. Torch files are read with ``weights_only=True``."""
    if not os.path.isfile(path):
        raise DistillError(f"weights file not found: {path} (check the path)")
    try:
        if path.endswith('.safetensors'):
            from safetensors.torch import load_file
            state = load_file(path)
        else:
            state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as exc:  # any decoding failure means the file is damaged or not a weights file
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DistillError(f"cannot read weights file {path}: corrupt, truncated or not a checkpoint "
                           f"({first_line[:200]}); re-download or re-export it") from None
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


def load_weights(model: nn.Module, path: str, strict: bool = True) -> nn.Module:
    """Load the weights in ``path`` into ``model`` (strict by default); a mismatch is a one-line error."""
    state = load_state_dict_file(path)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong_shape = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
                   for k in own if k in state and state[k].shape != own[k].shape]
    head = getattr(model, 'pretrained_cfg', {}).get('classifier')
    head_key = f'{head}.weight' if head else None
    if head_key in state and head_key in own and state[head_key].shape[0] != own[head_key].shape[0]:
        raise DistillError(f"{path}: its classifier has {state[head_key].shape[0]} classes but the data has "
                           f"{own[head_key].shape[0]}; use weights trained on this data's classes")
    if wrong_shape:
        raise DistillError(f"{path} does not fit {type(model).__name__}: shape mismatch for "
                           f"{', '.join(wrong_shape[:3])}{' ...' if len(wrong_shape) > 3 else ''} "
                           f"(wrong model name or class count?)")
    if strict and (missing or unexpected):
        raise DistillError(f"{path} does not fit {type(model).__name__}: {len(missing)} missing keys "
                           f"{missing[:3]}, {len(unexpected)} unexpected keys {unexpected[:3]} "
                           f"(wrong model name for this checkpoint?)")
    model.load_state_dict(state, strict=strict)
    return model
