"""Each model's input: the normalisation and size that its pretrained weights expect (timm's ``pretrained_cfg``).

A model that loads pretrained weights (``pretrained: true``: a timm tag, ``hf-hub:`` or ``local-dir:``) expects
the mean/std and input size of its ``pretrained_cfg``; a model trained from scratch or from a local checkpoint
expects what the data gives (the data's statistics, ``data.image_size``). A teacher that expects another input
than the student gets an adapter (``teaching.inputs``).
"""
import json
import os
from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn as nn

from ..config import Config
from ..errors import DistillError, first_line

DEFAULT_IMAGE_SIZE = 32  # without pretrained weights: the CIFAR benchmarks' size, as before


def pretrained_input(name: str, pretrained: bool) -> Optional[Dict[str, Any]]:
    """The ``pretrained_cfg`` of the weights the model ``name`` loads, read without building it (timm's registry,
    a ``local-dir:`` folder's ``config.json``, an ``hf-hub:`` repo's ``config.json``); None without weights."""
    if not pretrained:
        return None
    import timm
    source, model_id = timm.models.parse_model_name(name)
    if source == 'local-dir':
        path = os.path.join(os.path.expanduser(model_id), 'config.json')
        return json.load(open(path)).get('pretrained_cfg') if os.path.isfile(path) else None
    if source == 'hf-hub':
        from ..runs.export import quiet_hub
        try:
            with quiet_hub():
                return timm.models.load_model_config_from_hf(model_id)[0]
        except Exception as exc:  # noqa: BLE001 (offline, unknown repo, ...: the model fetch reports it in one line)
            reason = first_line(exc, 120)
            raise DistillError(f"could not fetch {name} ({reason}); without internet name a local-dir: folder, "
                               f"or set data.image_size and the model's pretrained=false") from None
    cfg = timm.models.get_pretrained_cfg(name)
    return cfg.to_dict() if cfg is not None else None


def default_image_size(name: str, pretrained: bool) -> int:
    """``data.image_size`` left unset: the student's pretrained input size, else 32."""
    cfg = pretrained_input(name, pretrained) if name else None
    return int(cfg['input_size'][-1]) if cfg and cfg.get('input_size') else DEFAULT_IMAGE_SIZE


def resolve_image_size(cfg: Config) -> Config:
    """``cfg`` (changed in place) with ``data.image_size`` set: a recipe that leaves it unset gets the student's
    pretrained input size. Done where the student is built, not when a recipe is parsed: an ``hf-hub:`` student's
    size is in its ``config.json`` on the Hub, and parsing (``distill grid --status``, ``table``) never goes online."""
    if cfg.data.image_size is None:
        cfg.data.image_size = default_image_size(cfg.student.name, cfg.student.pretrained)
    return cfg


def pretrained_stats(cfg: Optional[Dict[str, Any]]) -> Optional[Sequence[torch.Tensor]]:
    """(mean, std) of a ``pretrained_cfg``, or None."""
    if not cfg or cfg.get('mean') is None or cfg.get('std') is None:
        return None
    return torch.tensor(cfg['mean'], dtype=torch.float32), torch.tensor(cfg['std'], dtype=torch.float32)


def expected_size(model: nn.Module, pretrained: bool, image_size: int) -> int:
    """The input size a model is run at: its pretrained weights' (``pretrained_cfg``), else the data's."""
    cfg = getattr(model, 'pretrained_cfg', None) if pretrained else None
    return int(cfg['input_size'][-1]) if cfg and cfg.get('input_size') else image_size
