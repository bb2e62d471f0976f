"""The distillation engine: a frozen teacher, a trainable student and a weighted sum of named loss terms."""
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .errors import DistillError
from .features import FeatureExtractor, probe_shapes
from .losses import LossTerm, SetupContext, StepOutputs, create_loss
from .losses.base import STRONG_VIEW

# A loss spec: a weight, a dict of {'weight': w, **options}, or (weight, LossTerm module).
LossSpec = Union[float, Dict[str, Any], Tuple[float, LossTerm]]


def build_loss_terms(losses: Mapping[str, LossSpec]) -> Tuple[nn.ModuleDict, Dict[str, float]]:
    """Turn ``{'ce': 0.1, 'kd': {'weight': 0.9, 'temperature': 4}}`` into loss modules and their weights; a term
    given as options without a weight (``{'fitnet': {}}``) gets its method's ``default_weight``."""
    if not losses:
        raise DistillError("no loss terms configured; set e.g. losses: {ce: 1.0}")
    modules, weights = nn.ModuleDict(), {}
    for name, spec in losses.items():
        if isinstance(spec, tuple):
            weight, module = spec
        elif isinstance(spec, Mapping):
            options = dict(spec)
            weight = options.pop('weight', None)
            module = create_loss(name, **options)
            weight = module.default_weight if weight is None else weight  # the reference recipes' weight
        else:
            weight, module = spec, create_loss(name)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise DistillError(f"losses.{name}: weight must be a number, got {weight!r}")
        modules[name], weights[name] = module, float(weight)
    return modules, weights


class Distiller(nn.Module):
    """Pairs a teacher and a student (any timm models, any families) and computes the training loss.

    The teacher is frozen: no gradients, always in eval mode (also after ``.train()``), run under
    ``torch.no_grad()``, so its BatchNorm statistics never change. With ``teacher=None`` the student trains
    alone through the same code path (the baseline). ``forward`` returns ``{'loss', 'logits', 'terms'}`` where
    ``terms`` holds each weighted term (detached) for logging.
    """

    def __init__(self, teacher: Optional[nn.Module], student: nn.Module,
                 losses: Mapping[str, LossSpec] = (('ce', 1.0),), input_size: Optional[Sequence[int]] = None,
                 train_targets: Optional[torch.Tensor] = None):
        super().__init__()
        self.student = student
        self.loss_terms, self.loss_weights = build_loss_terms(dict(losses))
        self.main_terms = [name for name, term in self.loss_terms.items() if term.main_stage]
        if not self.main_terms:
            raise DistillError(f"losses {list(self.loss_terms)} only act in the pre-stage; add a term for the "
                               f"main training, e.g. ce: 1.0")
        needs_teacher = [name for name, term in self.loss_terms.items() if term.requires_teacher]
        if needs_teacher and teacher is None:
            raise DistillError(f"loss terms {needs_teacher} need a teacher; configure teacher.name (and "
                               f"teacher.checkpoint) or drop them to train the student alone")
        self.teacher = teacher
        self.freezer = None  # a transfer.StageFreezer when the student is partly frozen (set by the trainer)
        self.teacher_cache = None  # a teacher_cache.TeacherCache: teacher logits looked up by (index, view)
        self.uses_teacher = any(self.loss_terms[name].requires_teacher for name in self.main_terms)
        self.needs_strong_view = any(STRONG_VIEW in self.loss_terms[name].needs for name in self.main_terms)
        if teacher is not None:
            teacher.requires_grad_(False)
            teacher.eval()
        self._setup_terms(input_size, train_targets)

    def _setup_terms(self, input_size: Optional[Sequence[int]], train_targets: Optional[torch.Tensor]) -> None:
        """One extractor per model over the union of every term's taps; one dry run sizes the adapters."""
        for term in self.loss_terms.values():
            term.resolve_layers(self.student, self.teacher)
        student_layers = _unique(layer for term in self.loss_terms.values() for layer in term.student_layers)
        teacher_layers = _unique(layer for term in self.loss_terms.values() for layer in term.teacher_layers)
        if teacher_layers and self.teacher is None:
            raise DistillError(f"loss terms read teacher features {teacher_layers} but no teacher is configured")
        self.student_extractor = FeatureExtractor(self.student, student_layers)
        self.teacher_extractor = FeatureExtractor(self.teacher, teacher_layers) if self.teacher is not None else None
        context = SetupContext(num_classes=getattr(self.student, 'num_classes', None), train_targets=train_targets,
                               student=self.student, teacher=self.teacher)
        if student_layers or teacher_layers:
            input_size = tuple(input_size or getattr(self.student, 'pretrained_cfg', {}).get('input_size',
                                                                                           (3, 224, 224)))
            context.student_shapes = dict(zip(student_layers, probe_shapes(self.student_extractor, input_size)))
            if teacher_layers:
                context.teacher_shapes = dict(zip(teacher_layers, probe_shapes(self.teacher_extractor, input_size)))
        for term in self.loss_terms.values():
            term.setup(context)

    def train(self, mode: bool = True) -> 'Distiller':
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        if mode and self.freezer is not None:  # frozen BatchNorm layers keep their pretrained statistics
            self.freezer.set_eval_modes()
        return self

    def teacher_cache_blocker(self) -> Optional[str]:
        """Why teacher logits looked up by (image, view) would not give these terms what a live teacher gives,
        or None when a cache is exact."""
        if not self.uses_teacher:
            return "no loss term uses the teacher"
        feature_terms = [name for name, term in self.loss_terms.items() if term.teacher_layers]
        if feature_terms:
            return f"loss terms {feature_terms} read teacher features, and the cache holds logits only"
        if self.needs_strong_view:
            return "a RandAugment view (MLKD) has no finite set of views to cache"
        return None

    def trainable_modules(self) -> nn.ModuleDict:
        """The modules the optimizer updates and checkpoints save: the student and the loss terms' own
        parameters (adapters), never the teacher."""
        return nn.ModuleDict({'student': self.student, 'loss_terms': self.loss_terms})

    def _step_outputs(self, images: torch.Tensor, targets: torch.Tensor, indices: Optional[torch.Tensor],
                      epoch: int, run_teacher: bool, views: Optional[torch.Tensor] = None) -> StepOutputs:
        """One teacher forward (no grad; a cache lookup where a teacher cache is set) and one student forward,
        with every tap any term asked for."""
        teacher_logits, teacher_features = None, []
        if run_teacher:
            with torch.no_grad():
                if self.teacher_cache is not None:
                    if indices is None or views is None:
                        raise DistillError("a teacher cache looks logits up by sample index and view: pass "
                                           "indices= and views= (distill.Trainer does)")
                    teacher_logits = self.teacher_cache.lookup(indices, views, images, self.teacher)
                else:
                    teacher_logits, teacher_features = self.teacher_extractor(images)
        student_logits, student_features = self.student_extractor(images)
        return StepOutputs(
            student_logits=student_logits, targets=targets, teacher_logits=teacher_logits, indices=indices,
            epoch=epoch, student_features=dict(zip(self.student_extractor.keys, student_features)),
            teacher_features=dict(zip(self.teacher_extractor.keys, teacher_features)) if teacher_features else {})

    def forward(self, images: torch.Tensor, targets: torch.Tensor, indices: Optional[torch.Tensor] = None,
                epoch: int = 0, strong_images: Optional[torch.Tensor] = None,
                views: Optional[torch.Tensor] = None) -> Dict[str, Any]:
        step = self._step_outputs(images, targets, indices, epoch, self.uses_teacher, views)
        if self.needs_strong_view:
            if strong_images is None:
                raise DistillError("a loss term needs a strongly augmented view of each batch; train through "
                                   "distill.Trainer or pass strong_images= to the Distiller")
            # separate forward passes, as the reference: the student's BatchNorm sees each view's own statistics
            step.student_logits_strong = self.student(strong_images)
            if self.uses_teacher:
                with torch.no_grad():
                    step.teacher_logits_strong = self.teacher(strong_images)
        weighted = {name: self.loss_weights[name] * self.loss_terms[name](step) for name in self.main_terms}
        return {'loss': sum(weighted.values()), 'logits': step.student_logits,
                'terms': {name: value.detach() for name, value in weighted.items()}}

    def pre_stage_terms(self, epoch: int) -> List[str]:
        """Terms whose pre-stage still runs at pre-stage epoch ``epoch`` (0-based)."""
        return [name for name, term in self.loss_terms.items() if epoch < term.pre_stage_epochs]

    def pre_stage_forward(self, images: torch.Tensor, targets: torch.Tensor, indices: Optional[torch.Tensor],
                          epoch: int) -> Dict[str, Any]:
        """The pre-stage loss: the unweighted sum of each active term's ``pre_stage_loss``."""
        names = self.pre_stage_terms(epoch)
        step = self._step_outputs(images, targets, indices, epoch, self.teacher is not None)
        terms = {name: self.loss_terms[name].pre_stage_loss(step) for name in names}
        return {'loss': sum(terms.values()), 'terms': {name: value.detach() for name, value in terms.items()}}


def _unique(items) -> List[Any]:
    return list(dict.fromkeys(items))


class TrainableParts(nn.Module):
    """The student and the loss terms' modules as one module whose forward is the Distiller's: what DDP wraps,
    so it never holds (or broadcasts the buffers of) the frozen teacher."""

    def __init__(self, distiller: Distiller):
        super().__init__()
        self.student, self.loss_terms = distiller.student, distiller.loss_terms
        object.__setattr__(self, 'distiller', distiller)  # a plain reference: not a submodule

    def forward(self, *args, **kwargs) -> Dict[str, Any]:
        return self.distiller(*args, **kwargs)
