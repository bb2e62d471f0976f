"""Each model's input: the normalisation and size that its pretrained weights expect (timm's ``pretrained_cfg``),
and the adapter that turns the student's input into the teacher's.

A model that loads pretrained weights (``pretrained: true``: a timm tag, ``hf-hub:`` or ``local-dir:``) expects
the mean/std and input size of its ``pretrained_cfg``; a model trained from scratch or from a local checkpoint
expects what the data gives (the data's statistics, ``data.image_size``), as before. The loader normalises for
the student; a teacher that expects another normalisation or size gets ``TeacherInput``, which undoes the
student's normalisation, applies the teacher's and resizes (timm's ``DistillationTeacher`` does the same), so the
two models may differ. Models that expect the same input (every ``cifar_`` pair) get no adapter at all: their
inputs, and every number, are unchanged. ``data.mean``/``data.std`` set in a recipe apply to both models.
"""
import json
import os
from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import DistillError, first_line

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
        from .export import quiet_hub
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


def pretrained_stats(cfg: Optional[Dict[str, Any]]) -> Optional[Sequence[torch.Tensor]]:
    """(mean, std) of a ``pretrained_cfg``, or None."""
    if not cfg or cfg.get('mean') is None or cfg.get('std') is None:
        return None
    return torch.tensor(cfg['mean'], dtype=torch.float32), torch.tensor(cfg['std'], dtype=torch.float32)


class TeacherInput(nn.Module):
    """The student's input (normalised with ``student_mean``/``student_std``, ``image_size`` px) as the teacher
    expects it: re-normalised with the teacher's statistics (when given) and resized to ``size`` (when given)."""

    def __init__(self, student_mean: torch.Tensor, student_std: torch.Tensor,
                 teacher_mean: Optional[torch.Tensor], teacher_std: Optional[torch.Tensor],
                 size: Optional[int] = None, interpolation: str = 'bilinear'):
        super().__init__()
        self.renormalize = teacher_mean is not None
        for key, value in (('student_mean', student_mean), ('student_std', student_std),
                           ('teacher_mean', teacher_mean), ('teacher_std', teacher_std)):
            self.register_buffer(key, None if value is None else value.reshape(1, -1, 1, 1).float(), persistent=False)
        self.size, self.interpolation = size, 'bicubic' if interpolation == 'bicubic' else 'bilinear'

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.renormalize:
            images = (images * self.student_std + self.student_mean - self.teacher_mean) / self.teacher_std
        if self.size is not None and tuple(images.shape[-2:]) != (self.size, self.size):
            images = F.interpolate(images, size=(self.size, self.size), mode=self.interpolation, align_corners=False,
                                   antialias=True)
        return images

    def describe(self) -> Dict[str, Any]:
        """What the teacher sees (for the log and the teacher cache's key)."""
        return {'mean': self.teacher_mean.flatten().tolist() if self.renormalize else None,
                'std': self.teacher_std.flatten().tolist() if self.renormalize else None,
                'size': self.size, 'interpolation': self.interpolation if self.size else None}


def expected_size(model: nn.Module, pretrained: bool, image_size: int) -> int:
    """The input size a model is run at: its pretrained weights' (``pretrained_cfg``), else the data's."""
    cfg = getattr(model, 'pretrained_cfg', None) if pretrained else None
    return int(cfg['input_size'][-1]) if cfg and cfg.get('input_size') else image_size


def teacher_input(teacher: nn.Module, pretrained: bool, student_mean: torch.Tensor, student_std: torch.Tensor,
                  image_size: int, explicit_stats: bool) -> Optional[TeacherInput]:
    """The adapter a pretrained ``teacher`` needs (its ``pretrained_cfg`` normalisation unless ``data.mean/std``
    are set, its input size), or None when it expects the student's input."""
    cfg = getattr(teacher, 'pretrained_cfg', None) if pretrained else None
    if not cfg:
        return None
    stats = None if explicit_stats else pretrained_stats(cfg)
    if stats is not None and torch.equal(stats[0], student_mean.flatten().cpu()) and \
            torch.equal(stats[1], student_std.flatten().cpu()):
        stats = None
    size = expected_size(teacher, pretrained, image_size)
    size = size if size != image_size else None
    if stats is None and size is None:
        return None
    return TeacherInput(student_mean.flatten().cpu(), student_std.flatten().cpu(), *(stats or (None, None)),
                        size, cfg.get('interpolation', 'bilinear'))
