"""Models of a run: a timm model for the data's classes with hub or local weights, checked before anything slow
runs, and a student initialised from another model's weights (``transfer.init_from``)."""
import os
from typing import List, Optional

import timm
import torch.nn as nn

from ..config import ModelConfig, TransferConfig
from ..errors import DistillError, nearest
from ..transfer import replace_head, transfer_parameters
from .weights import load_backbone_weights, load_state_dict_file, load_weights


def check_model_config(model_cfg: ModelConfig, role: str) -> None:
    if not timm.is_model(model_cfg.name):
        raise DistillError(f"unknown model '{model_cfg.name}' for {role}.name"
                           f"{nearest(model_cfg.name, timm.list_models())}; see `distill models '*'`")
    if model_cfg.checkpoint and not os.path.isfile(os.path.expanduser(model_cfg.checkpoint)):
        raise DistillError(f"{role}.checkpoint not found: {model_cfg.checkpoint}; set "
                           f"{role}.checkpoint=<path to its weights>")


def create_model(model_cfg: ModelConfig, num_classes: int, role: str, transfer: Optional[TransferConfig] = None,
                 notes: Optional[List[str]] = None) -> nn.Module:
    """A timm model for ``num_classes``, with hub weights (``pretrained``) or local weights (``checkpoint``).

    With ``transfer.new_head`` the model gets a fresh classifier (timm ``reset_classifier``, optionally with a
    hidden layer and dropout) and the weights' own classifier is skipped; what was skipped goes to ``notes``."""
    check_model_config(model_cfg, role)
    try:
        model = timm.create_model(model_cfg.name, pretrained=model_cfg.pretrained, num_classes=num_classes,
                                  **model_cfg.kwargs)
    except TypeError as exc:
        raise DistillError(f"{role}.kwargs do not fit {model_cfg.name}: {exc}") from None
    except (OSError, RuntimeError) as exc:
        if not model_cfg.pretrained:
            raise
        raise DistillError(f"could not fetch pretrained weights for {model_cfg.name} ({str(exc)[:120]}); "
                           f"without internet set {role}.pretrained=false {role}.checkpoint=<local file>") from None
    new_head = transfer is not None and transfer.new_head
    if new_head:
        replace_head(model, num_classes, transfer.head_hidden, transfer.head_dropout)
    if model_cfg.checkpoint and new_head:
        skipped = load_backbone_weights(model, os.path.expanduser(model_cfg.checkpoint))
        if notes is not None:
            notes.append(f"{role}: loaded {model_cfg.checkpoint} except its classifier "
                         f"({', '.join(skipped) or 'none in the file'}); new head for {num_classes} classes")
    elif model_cfg.checkpoint:
        load_weights(model, os.path.expanduser(model_cfg.checkpoint))
    return model


def check_input_size(model: nn.Module, image_size: int, role: str, name: str) -> None:
    """One eval-mode forward of a 2-image batch at ``image_size``: a model that cannot take that size (a ViT's fixed
    patch grid, say) fails here with one line, before any run directory exists."""
    import torch
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(2, 3, image_size, image_size))
    except Exception as exc:  # noqa: BLE001 (AssertionError, RuntimeError, ...: what a model says about its input)
        expected = getattr(model, 'pretrained_cfg', {}).get('input_size')
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
        raise DistillError(f"{role} {name} cannot take {image_size}x{image_size} images ({type(exc).__name__}: "
                           f"{reason}); set data.image_size={expected[-1] if expected else '<its size>'} or give "
                           f"the model that size, e.g. {role}.kwargs={{img_size: {image_size}}}") from None
    finally:
        model.train(was_training)


def init_from(student: nn.Module, transfer: TransferConfig, student_name: str, notes: List[str]) -> None:
    """Copy ``transfer.init_from``'s weights into ``student`` wherever names (mapped by ``init_map``) and shapes
    fit; what was copied, resized and left goes to ``notes``."""
    path = os.path.expanduser(transfer.init_from)
    if not os.path.isfile(path):
        raise DistillError(f"transfer.init_from not found: {transfer.init_from}; point it at the weights to "
                           f"initialise the student from (e.g. the teacher's student_best.safetensors)")
    report = transfer_parameters(student, load_state_dict_file(path), transfer.init_map)
    count = sum(student.state_dict()[name].numel() for name in report['copied'])
    notes.append(
        f"student initialised from {transfer.init_from}: copied {len(report['copied'])} tensors ({count:,} "
        f"values), resized {len(report['resized'])} {report['resized'][:3]}, not copied "
        f"{len(report['not_copied'])} {report['not_copied'][:5]}{' ...' if len(report['not_copied']) > 5 else ''}")
    if not report['copied'] and not report['resized']:
        raise DistillError(f"transfer.init_from {transfer.init_from}: no tensor fits {student_name} "
                           f"(names or shapes differ everywhere); map prefixes with transfer.init_map")
