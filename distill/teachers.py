"""The teacher side of a distillation step: a frozen model run on every batch (``LiveTeacher``), or its logits
read from a table filled once per (training image, augmentation view) (``CachedTeacher``).

Either way the teacher is frozen: no gradients, always in eval mode (also after ``.train()``), run under
``torch.no_grad()``, so its BatchNorm statistics never change. The ``Distiller`` tells it once which feature taps
its loss terms read (``watch``); each step it returns ``(logits, {tap: feature})`` for a ``Batch``.
"""
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .data import Batch
from .errors import DistillError
from .features import FeatureExtractor, TapLayer
from .teacher_cache import TeacherCache

TeacherOutputs = Tuple[torch.Tensor, Dict[TapLayer, torch.Tensor]]


class LiveTeacher(nn.Module):
    """A frozen model run on every batch, recording the taps the loss terms read in the same forward pass."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        model.requires_grad_(False)
        model.eval()
        self.extractor = FeatureExtractor(model, [])

    def watch(self, layers: Sequence[TapLayer]) -> None:
        """Record ``layers`` (feature taps) in every forward from now on."""
        self.extractor = FeatureExtractor(self.model, layers)

    def train(self, mode: bool = True) -> 'LiveTeacher':
        super().train(mode)
        self.model.eval()  # frozen: BatchNorm keeps its statistics
        return self

    def forward(self, batch: Batch) -> TeacherOutputs:
        with torch.no_grad():
            logits, features = self.extractor(batch.images)
        return logits, dict(zip(self.extractor.keys, features))

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Logits of other images than the batch's (e.g. a strongly augmented view)."""
        with torch.no_grad():
            return self.model(images)

    def end_epoch(self) -> Dict[str, Any]:
        """Epoch-end work and what to log of it."""
        return {}


class CachedTeacher(LiveTeacher):
    """The teacher's logits looked up by each sample's (index, view) in ``cache``; views not yet in the table are
    computed by the model (those samples only) and stored. Exact for logit terms on a finite set of views."""

    def __init__(self, model: nn.Module, cache: TeacherCache):
        super().__init__(model)
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
            return self.cache.lookup(batch.indices, batch.views, batch.images, self.model), {}

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
