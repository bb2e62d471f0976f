"""Models of a run: a timm model for the data's classes with hub or local weights, checked before anything slow
runs, and a student initialised from another model's weights (``transfer.init_from``)."""
import os
from typing import List, Optional

import timm
import torch.nn as nn

from ..config import ModelConfig, TransferConfig
from ..errors import DistillError, first_line, nearest
from ..runs.export import quiet_hub
from .transfer import replace_head, transfer_parameters
from .weights import load_backbone_weights, load_state_dict_file, load_weights


def check_model_config(model_cfg: ModelConfig, role: str) -> None:
    """Every name ``timm.create_model`` takes, checked without a download: a registry name (with a pretrained tag
    that exists), ``hf-hub:org/repo`` (fetched later) or ``local-dir:FOLDER`` (a folder with ``config.json``)."""
    name = model_cfg.name
    try:
        source, model_id = timm.models.parse_model_name(name)
    except ValueError as exc:
        raise DistillError(f"{role}.name {name!r}: {exc}") from None
    if source == 'local-dir':
        folder = os.path.expanduser(model_id)
        if not os.path.isfile(os.path.join(folder, 'config.json')):
            raise DistillError(f"{role}.name {name}: {folder} holds no config.json; point it at a folder written "
                               f"by timm's save_for_hf (or a distill run's student/ export)")
    elif source == 'hf-hub':
        if model_id.count('/') != 1 or not all(model_id.split('/')):
            raise DistillError(f"{role}.name {name}: a Hub model is named hf-hub:<org>/<repo>, e.g. "
                               f"hf-hub:timm/resnet18.a1_in1k")
    elif not timm.is_model(name):
        raise DistillError(f"unknown model '{name}' for {role}.name{nearest(name, timm.list_models())}; see "
                           f"`distill models '*'`")
    elif '.' in name and model_cfg.pretrained and name not in timm.list_pretrained(name.split('.')[0] + '.*'):
        tags = timm.list_pretrained(name.split('.')[0] + '.*')
        raise DistillError(f"{name} has no pretrained weights with that tag for {role}.name{nearest(name, tags)}; "
                           f"its tags: {', '.join(tag.split('.', 1)[1] for tag in tags) or 'none'}")
    if model_cfg.checkpoint and not os.path.isfile(os.path.expanduser(model_cfg.checkpoint)):
        raise DistillError(f"{role}.checkpoint not found: {model_cfg.checkpoint}; set "
                           f"{role}.checkpoint=<path to its weights>")


HEAD_FIXES = {'teacher': "set teacher_finetune to fit a new head on this data first, or train on data with the "
                         "teacher's classes (e.g. ImageNet)",
              'student': "set transfer.new_head=true to train a new head for this data's classes"}


def create_model(model_cfg: ModelConfig, num_classes: int, role: str, transfer: Optional[TransferConfig] = None,
                 notes: Optional[List[str]] = None) -> nn.Module:
    """A timm model for ``num_classes``, with hub weights (``pretrained``) or local weights (``checkpoint``).

    A pretrained teacher must already classify ``num_classes`` classes (its head is the knowledge); a pretrained
    student gets a new head (said in ``notes``). With ``transfer.new_head`` the model gets a fresh classifier
    (timm ``reset_classifier``, optionally with a hidden layer and dropout) and the weights' own classifier is
    skipped; what was skipped goes to ``notes``."""
    check_model_config(model_cfg, role)
    remote = model_cfg.pretrained or not timm.is_model(model_cfg.name)  # hf-hub:/local-dir: read a config
    try:
        with quiet_hub():
            model = timm.create_model(model_cfg.name, pretrained=model_cfg.pretrained, num_classes=num_classes,
                                      **model_cfg.kwargs)
    except TypeError as exc:
        raise DistillError(f"{role}.kwargs do not fit {model_cfg.name}: {exc}") from None
    except (OSError, RuntimeError) as exc:
        if not remote:
            raise
        reason = first_line(exc, 120)
        raise DistillError(f"could not fetch {model_cfg.name} ({reason}); without internet set "
                           f"{role}.pretrained=false {role}.checkpoint=<local file>, or name a local-dir: "
                           f"folder") from None
    new_head = transfer is not None and transfer.new_head
    pretrained_classes = model.pretrained_cfg.get('num_classes') if model_cfg.pretrained else None
    if pretrained_classes and pretrained_classes != num_classes and not new_head:
        if role == 'teacher':
            raise DistillError(f"the pretrained {role} {model_cfg.name} classifies {pretrained_classes} classes "
                               f"but the data has {num_classes}; {HEAD_FIXES[role]}")
        if notes is not None:
            notes.append(f"{role}: new {num_classes}-class head (the pretrained head of {model_cfg.name} has "
                         f"{pretrained_classes} classes)")
    if new_head:
        replace_head(model, num_classes, transfer.head_hidden, transfer.head_dropout)
    if model_cfg.checkpoint and new_head:
        skipped = load_backbone_weights(model, os.path.expanduser(model_cfg.checkpoint))
        if notes is not None:
            notes.append(f"{role}: loaded {model_cfg.checkpoint} except its classifier "
                         f"({', '.join(skipped) or 'none in the file'}); new head for {num_classes} classes")
    elif model_cfg.checkpoint:
        load_weights(model, os.path.expanduser(model_cfg.checkpoint), head_fix=HEAD_FIXES.get(role))
    return model


def check_input_size(model: nn.Module, image_size: int, role: str, name: str, channels: int = 3) -> None:
    """One eval-mode forward of a 2-image batch at ``image_size`` (``channels`` deep): a model that cannot take that
    size (a ViT's fixed patch grid, say) fails here with one line, before any run directory exists."""
    import torch
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(2, channels, image_size, image_size))
    except Exception as exc:  # noqa: BLE001 (AssertionError, RuntimeError, ...: what a model says about its input)
        expected = getattr(model, 'pretrained_cfg', {}).get('input_size')
        reason = first_line(exc, 120)
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
