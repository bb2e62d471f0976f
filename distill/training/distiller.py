"""The distillation engine: a frozen teacher, a trainable student and a weighted sum of named loss terms.

One step is ``Distiller.forward(batch: Batch, epoch)``; nothing about a method is known here beyond what its
term declares (``requires_teacher``, ``needs``, feature taps, a pre-stage).
"""
import dataclasses
from typing import Any, Dict, FrozenSet, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from ..data.batching import Batch
from ..errors import DistillError
from ..losses import LossTerm, Need, SetupContext, StepOutputs, create_loss
from ..losses.base import MixedLabels
from ..models.features import FeatureExtractor, probe_shapes
from ..models.heads import DISTILLATION, LOGITS, has_distillation_head, student_heads
from ..teaching.teachers import CachedTeacher, as_teacher

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

    ``teacher`` is a ``LiveTeacher``, a ``CachedTeacher`` (``distill.teaching.teachers``), a plain model (run live) or
    None (the student trains alone through the same code path: the baseline). ``losses`` maps registered loss
    names to weights or options. ``freezer`` (a ``transfer.StageFreezer``) keeps a partly frozen student's frozen
    BatchNorm layers in eval mode. Each term's ``needs`` are checked once, here.

    ``forward(batch, epoch)`` returns ``{'loss', 'logits', 'terms'}`` where ``terms`` holds each weighted term
    (detached) for logging.
    """

    def __init__(self, teacher: Optional[nn.Module], student: nn.Module,
                 losses: Mapping[str, LossSpec] = (('ce', 1.0),), input_size: Optional[Sequence[int]] = None,
                 train_targets: Optional[torch.Tensor] = None, freezer: Optional[Any] = None):
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
        self.teacher = as_teacher(teacher)
        self.freezer = freezer
        for term in self.loss_terms.values():
            term.configure_student(student)
        read = {term.student_head for term in self.loss_terms.values()}
        # a note for the run's log: a distillation head no term reads trains on the averaged heads (timm's forward)
        self.notes = ["the student's distillation head is trained as timm's forward gives it (averaged with the "
                      "class head): no loss term reads it (losses.deit trains it on the teacher)"
                      ] if has_distillation_head(student) and DISTILLATION not in read else []
        self.uses_teacher = any(self.loss_terms[name].requires_teacher for name in self.main_terms)
        self._setup_terms(input_size, train_targets)
        self.needs = self._check_needs()

    def _setup_terms(self, input_size: Optional[Sequence[int]], train_targets: Optional[torch.Tensor]) -> None:
        """One extractor per model over the union of every term's taps; one dry run sizes the adapters."""
        teacher_model = self.teacher.model if self.teacher is not None else None
        for term in self.loss_terms.values():
            term.resolve_layers(self.student, teacher_model)
        student_layers = _unique(layer for term in self.loss_terms.values() for layer in term.student_layers)
        teacher_layers = _unique(layer for term in self.loss_terms.values() for layer in term.teacher_layers)
        if teacher_layers and self.teacher is None:
            raise DistillError(f"loss terms read teacher features {teacher_layers} but no teacher is configured")
        self.student_extractor = FeatureExtractor(self.student, student_layers)
        context = SetupContext(num_classes=getattr(self.student, 'num_classes', None), train_targets=train_targets,
                               student=self.student, teacher=teacher_model)
        if student_layers or teacher_layers:
            input_size = tuple(input_size or getattr(self.student, 'pretrained_cfg', {}).get('input_size',
                                                                                           (3, 224, 224)))
            context.student_shapes = dict(zip(student_layers, probe_shapes(self.student_extractor, input_size)))
            if teacher_layers:
                context.teacher_shapes = dict(zip(teacher_layers, probe_shapes(
                    FeatureExtractor(teacher_model, teacher_layers), self.teacher.input_size(input_size))))
        if self.teacher is not None:
            self.teacher.watch(teacher_layers)
        for term in self.loss_terms.values():
            term.setup(context)

    def _check_needs(self) -> FrozenSet[Need]:
        """The union of the terms' needs, after checking each term declares what it reads."""
        for name, term in self.loss_terms.items():
            if term.teacher_layers and Need.TEACHER_FEATURES not in term.needs:
                raise DistillError(f"loss term '{name}' reads teacher features but does not declare "
                                   f"Need.TEACHER_FEATURES in its needs")
            if term.pre_stage_epochs and Need.PRE_STAGE not in term.needs:
                raise DistillError(f"loss term '{name}' has a pre-stage but does not declare Need.PRE_STAGE")
        needs = frozenset(need for term in self.loss_terms.values() for need in term.needs)
        if isinstance(self.teacher, CachedTeacher) and needs & {Need.STRONG_VIEW, Need.TEACHER_BATCH_STATISTICS}:
            raise DistillError("a teacher cache cannot serve a RandAugment view (MLKD) or a teacher on batch "
                               "statistics: neither has a fixed output per (image, view); set "
                               "teacher_cache.enabled=false")
        return needs

    def train(self, mode: bool = True) -> 'Distiller':
        super().train(mode)  # the teacher keeps itself in eval mode, unless a term reproduces a train-mode teacher
        if mode and Need.TEACHER_BATCH_STATISTICS in self.needs:
            self.teacher.model.train()
        if mode and self.freezer is not None:  # frozen BatchNorm layers keep their pretrained statistics
            self.freezer.set_eval_modes()
        return self

    def trainable_modules(self) -> nn.ModuleDict:
        """The modules the optimizer updates and checkpoints save: the student and the loss terms' own
        parameters (adapters), never the teacher."""
        return nn.ModuleDict({'student': self.student, 'loss_terms': self.loss_terms})

    def _step_outputs(self, batch: Batch, epoch: int, run_teacher: bool) -> StepOutputs:
        """One teacher forward (no grad; a cache lookup for a ``CachedTeacher``) and one student forward, with
        every tap any term asked for."""
        if Need.SAMPLE_INDICES in self.needs and batch.indices is None:
            raise DistillError("a loss term needs each sample's index in the training split: give the Batch "
                               "indices (distill's loaders do)")
        teacher_logits, teacher_features = self.teacher(batch) if run_teacher else (None, {})
        student_output, student_features = self.student_extractor(batch.images)
        heads = student_heads(student_output)
        return StepOutputs(
            student_logits=heads[LOGITS], student_heads=heads, targets=batch.labels, soft_targets=batch.soft_targets,
            teacher_logits=teacher_logits,
            indices=batch.indices, epoch=epoch, student_features=dict(zip(self.student_extractor.keys,
                                                                          student_features)),
            teacher_features=teacher_features)

    def forward(self, batch: Batch, epoch: int = 0) -> Dict[str, Any]:
        step = self._step_outputs(batch, epoch, self.uses_teacher)
        if Need.STRONG_VIEW in self.needs:
            if batch.strong is None:
                raise DistillError("a loss term needs a strongly augmented view of each batch; train through "
                                   "distill.Trainer or give the Batch a strong view")
            # separate forward passes, as the reference: the student's BatchNorm sees each view's own statistics
            step.student_logits_strong = student_heads(self.student(batch.strong))[LOGITS]
            if self.uses_teacher:
                step.teacher_logits_strong = self.teacher.logits(batch.strong)
        weighted = {name: self.loss_weights[name] * self.loss_terms[name](self._term_step(name, step))
                    for name in self.main_terms}
        return {'loss': sum(weighted.values()), 'logits': step.student_logits,
                'terms': {name: value.detach() for name, value in weighted.items()}}

    def _term_step(self, name: str, step: StepOutputs) -> StepOutputs:
        """The step as term ``name`` sees it: on a mixed batch its ``targets`` refuse to be read unless the term
        declared ``Need.CLASS_LABELS`` (which the mixing itself refuses), so no term reads unmixed labels silently."""
        if step.soft_targets is None or Need.CLASS_LABELS in self.loss_terms[name].needs:
            return step
        return dataclasses.replace(step, targets=MixedLabels(name))

    def pre_stage_terms(self, epoch: int) -> List[str]:
        """Terms whose pre-stage still runs at pre-stage epoch ``epoch`` (0-based)."""
        return [name for name, term in self.loss_terms.items() if epoch < term.pre_stage_epochs]

    def pre_stage_groups(self, lr: float) -> Tuple[List[Dict[str, Any]], List[nn.Module]]:
        """Optimizer parameter groups of the pre-stage (one per term, at its ``pre_stage_lr`` or ``lr``) and the
        modules it trains."""
        groups, trained, seen = [], [], set()
        for name in self.pre_stage_terms(0):
            term = self.loss_terms[name]
            modules = list(term.pre_stage_modules(self.student))
            params = [p for m in modules for p in m.parameters() if id(p) not in seen]
            seen.update(id(p) for p in params)
            groups.append({'params': params, 'lr': term.pre_stage_lr or lr})
            trained += modules
        return groups, trained

    def pre_stage_forward(self, batch: Batch, epoch: int) -> Dict[str, Any]:
        """The pre-stage loss: the unweighted sum of each active term's ``pre_stage_loss``."""
        names = self.pre_stage_terms(epoch)
        step = self._step_outputs(batch, epoch, self.teacher is not None)
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
