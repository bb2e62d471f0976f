"""The adapter that turns the student's input into the teacher's.

The loader normalises for the student; a teacher whose pretrained weights expect another normalisation or size
gets ``TeacherInput``, which undoes the student's normalisation, applies the teacher's and resizes to the teacher's
input size, so the two models may differ. (timm's ``DistillationTeacher`` re-normalises only: its teacher sees the
student's resolution; resizing to the size the teacher was trained at is what its weights expect.) Models that
expect the same input (every ``cifar_`` pair) get no adapter at all: their inputs, and every number, are unchanged.
``data.mean``/``data.std`` set in a recipe apply to both models.
"""
from typing import Any, Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models.pretrained import expected_size, pretrained_stats


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
