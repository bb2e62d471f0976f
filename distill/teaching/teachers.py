"""The teacher side of a distillation step: a frozen model run on every batch (``LiveTeacher``) or its logits read
from a table filled once per (training image, augmentation view) (``CachedTeacher``); on streamed data its top-k
logits recorded per (epoch, image) and replayed without running it (``recorded``). ``build`` picks one for a run.

Either way the teacher is frozen: no gradients, always in eval mode (also after ``.train()``), run under
``torch.no_grad()``, so its BatchNorm statistics never change. The ``Distiller`` tells it once which feature taps
its loss terms read (``watch``); each step it returns ``(logits, {tap: feature})`` for a ``Batch``. A teacher that
expects another normalisation or input size than the student (its pretrained weights') sees the batch through its
``adapter`` (``teaching.inputs.TeacherInput``).
"""
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..data import Batch
from ..errors import DistillError
from ..models.features import FeatureExtractor, TapLayer
from .cache import TeacherCache
from .inputs import TeacherInput

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

    def epoch_state(self) -> Dict[str, torch.Tensor]:
        """What a checkpoint inside an epoch keeps of the epoch's work so far (``load_epoch_state`` restores it)."""
        return {}

    def load_epoch_state(self, state: Dict[str, torch.Tensor]) -> None:
        """Continue an epoch from a checkpoint inside it (``epoch_state``)."""


class LogitsOnlyTeacher(LiveTeacher):
    """A teacher whose stored answers are logits (the cache's table, a recording): terms reading its features are
    refused."""

    def watch(self, layers: Sequence[TapLayer]) -> None:
        if layers:
            raise DistillError(f"a teacher cache holds logits only, but loss terms read teacher features "
                               f"{list(layers)}; set teacher_cache.enabled=false")


class CachedTeacher(LogitsOnlyTeacher):
    """The teacher's logits looked up by each sample's (index, view) in ``cache``; views not yet in the table are
    computed by the model (those samples only) and stored. Exact for logit terms on a finite set of views."""

    def __init__(self, model: nn.Module, cache: TeacherCache, adapter: Optional[TeacherInput] = None):
        super().__init__(model, adapter)
        self.cache = cache

    def forward(self, batch: Batch) -> TeacherOutputs:
        if batch.indices is None or batch.views is None:
            raise DistillError("a teacher cache looks logits up by sample index and view: give the Batch indices "
                               "and views (distill's loaders do)")
        with torch.no_grad():
            return self.cache.lookup(batch.indices, batch.views, batch.images, self.classifier()), {}

    def end_epoch(self) -> Dict[str, Any]:
        self.cache.flush()
        return {'teacher_cache_filled': self.cache.fill_ratio}

    def epoch_state(self) -> Dict[str, torch.Tensor]:
        self.cache.flush()  # the checkpoint never names a table entry the disk does not hold
        return {}


def as_teacher(teacher: Optional[nn.Module]) -> Optional[LiveTeacher]:
    """A plain model becomes a ``LiveTeacher``; teachers and None pass through."""
    return teacher if teacher is None or isinstance(teacher, LiveTeacher) else LiveTeacher(teacher)
