"""The teacher side of a distillation step: a frozen model run on every batch (``LiveTeacher``), or its logits
read from a table filled once per (training image, augmentation view) (``CachedTeacher``).

Either way the teacher is frozen: no gradients, always in eval mode (also after ``.train()``), run under
``torch.no_grad()``, so its BatchNorm statistics never change. The ``Distiller`` tells it once which feature taps
its loss terms read (``watch``); each step it returns ``(logits, {tap: feature})`` for a ``Batch``. A teacher that
expects another normalisation or input size than the student (its pretrained weights') sees the batch through its
``adapter`` (``inputs.TeacherInput``).
"""
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .data import Batch
from .errors import DistillError
from .features import FeatureExtractor, TapLayer
from .inputs import TeacherInput, teacher_input
from .teacher_cache import TeacherCache, open_teacher_cache

TeacherOutputs = Tuple[torch.Tensor, Dict[TapLayer, torch.Tensor]]


class LiveTeacher(nn.Module):
    """A frozen model run on every batch, recording the taps the loss terms read in the same forward pass."""

    def __init__(self, model: nn.Module, adapter: Optional[TeacherInput] = None):
        super().__init__()
        self.model, self.adapter = model, adapter
        model.requires_grad_(False)
        model.eval()
        self.extractor = FeatureExtractor(model, [])

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """The student's input as this teacher expects it."""
        return self.adapter(images) if self.adapter is not None else images

    def classifier(self) -> nn.Module:
        """The teacher as a model of the student's input (for evaluation)."""
        return nn.Sequential(self.adapter, self.model) if self.adapter is not None else self.model

    def input_size(self, student_size: Sequence[int]) -> Tuple[int, ...]:
        size = self.adapter.size if self.adapter is not None else None
        return tuple(student_size) if size is None else (student_size[0], size, size)

    def watch(self, layers: Sequence[TapLayer]) -> None:
        """Record ``layers`` (feature taps) in every forward from now on."""
        self.extractor = FeatureExtractor(self.model, layers)

    def train(self, mode: bool = True) -> 'LiveTeacher':
        super().train(mode)
        self.model.eval()  # frozen: BatchNorm keeps its statistics
        return self

    def forward(self, batch: Batch) -> TeacherOutputs:
        with torch.no_grad():
            logits, features = self.extractor(self.prepare(batch.images))
        return logits, dict(zip(self.extractor.keys, features))

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Logits of other images than the batch's (e.g. a strongly augmented view)."""
        with torch.no_grad():
            return self.model(self.prepare(images))

    def end_epoch(self) -> Dict[str, Any]:
        """Epoch-end work and what to log of it."""
        return {}


class CachedTeacher(LiveTeacher):
    """The teacher's logits looked up by each sample's (index, view) in ``cache``; views not yet in the table are
    computed by the model (those samples only) and stored. Exact for logit terms on a finite set of views."""

    def __init__(self, model: nn.Module, cache: TeacherCache, adapter: Optional[TeacherInput] = None):
        super().__init__(model, adapter)
        self.cache = cache

    def watch(self, layers: Sequence[TapLayer]) -> None:
        if layers:
            raise DistillError(f"a teacher cache holds logits only, but loss terms read teacher features {list(layers)};"
                               f" set teacher_cache.enabled=false")

    def forward(self, batch: Batch) -> TeacherOutputs:
        if batch.indices is None or batch.views is None:
            raise DistillError("a teacher cache looks logits up by sample index and view: give the Batch indices "
                               "and views (distill's loaders do)")
        with torch.no_grad():
            return self.cache.lookup(batch.indices, batch.views, batch.images, self.classifier()), {}

    def end_epoch(self) -> Dict[str, Any]:
        self.cache.flush()
        return {'teacher_cache_filled': self.cache.fill_ratio}


def as_teacher(teacher: Optional[nn.Module]) -> Optional[LiveTeacher]:
    """A plain model becomes a ``LiveTeacher``; teachers and None pass through."""
    return teacher if teacher is None or isinstance(teacher, LiveTeacher) else LiveTeacher(teacher)


def cache_blocker(losses: Dict[str, Any], num_views: int, augment: str) -> Optional[str]:
    """Why teacher logits looked up by (image, view) would not give the configured loss terms what a live
    teacher gives (checked from the terms' declarations, before any table is created), or None when exact."""
    from .losses import Need, list_losses
    registered = list_losses()
    terms = {name: registered[name] for name in losses if name in registered}
    if not any(term.requires_teacher for term in terms.values()):
        return "no loss term uses the teacher"
    feature_terms = [name for name, term in terms.items() if Need.TEACHER_FEATURES in term.needs]
    if feature_terms:
        return f"loss terms {feature_terms} read teacher features, and the cache holds logits only"
    if any(Need.STRONG_VIEW in term.needs for term in terms.values()):
        return "a RandAugment view (MLKD) has no finite set of views to cache"
    if num_views == 0:
        return f"data.augment={augment} on streamed images has no finite set of views"
    return None


def build_teacher(model: nn.Module, cfg, loader, num_classes: int, device: torch.device, channels_last: bool,
                  notes: List[str]) -> LiveTeacher:
    """The run's teacher (``cfg``: the run's ``Config``): live, or its logits table when ``teacher_cache.enabled``
    (refused where not exact); with the input adapter its pretrained weights need (said in ``notes``)."""
    adapter = teacher_input(model, cfg.teacher.pretrained, loader.mean, loader.std, cfg.data.image_size,
                            cfg.data.mean is not None)
    if adapter is not None:
        seen = adapter.describe()
        normalised = f"mean {seen['mean']} std {seen['std']}" if seen['mean'] else "the student's normalisation"
        resized = f", resized to {seen['size']} px ({seen['interpolation']})" if seen['size'] else ''
        notes.append(f"teacher input: {normalised}{resized} (its pretrained_cfg)")
    if not cfg.teacher_cache.enabled:
        return LiveTeacher(model, adapter)
    blocker = cache_blocker(cfg.losses, loader.num_views, cfg.data.augment)
    if blocker:
        raise DistillError(f"teacher_cache.enabled=true cannot be exact here: {blocker}; set "
                           f"teacher_cache.enabled=false")
    settings = {'teacher': cfg.teacher.name, 'augment': cfg.data.augment, 'precision': cfg.trainer.precision,
                'channels_last': channels_last}
    if adapter is not None:  # only then: the tables of teachers that see the student's input keep their key
        settings['teacher_input'] = adapter.describe()
    cache = open_teacher_cache(model if adapter is None else nn.Sequential(adapter, model), loader, num_classes,
                               settings, {'data': cfg.data.name, 'root': cfg.data.root,
                                          'teacher_checkpoint': cfg.teacher.checkpoint},
                               cfg.teacher_cache.dir, cfg.teacher_cache.dtype, device)
    notes.append(f"teacher cache {cache.folder}: {len(loader.split)} images x {loader.num_views} views, "
                 f"{100 * cache.fill_ratio:.1f}% filled")
    return CachedTeacher(model, cache, adapter)
