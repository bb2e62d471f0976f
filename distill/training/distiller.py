"""The distillation engine: a frozen teacher, a trainable student and a weighted sum of named loss terms.

One step is ``Distiller.forward(batch: Batch, epoch) -> StepResult``; nothing about a method is known here beyond
what its term declares (``needs``, feature taps, the student head it reads, a pre-stage).
"""
from dataclasses import dataclass
from typing import Any, Dict, FrozenSet, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from ..data.batching import Batch
from ..errors import DistillError
from ..losses import LossTerm, Need, SetupContext, StepOutputs, create_loss
from ..losses.step import term_view
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


@dataclass
class StepResult:
    """What one step returns: ``loss``, the weighted sum of the terms (what backward runs on); ``terms``, each
    weighted term by name, detached (logs, the NaN guard); ``logits``, the student's class predictions for top-1
    (the class head; None in a pre-stage, which trains no classifier)."""
    loss: torch.Tensor
    terms: Dict[str, torch.Tensor]
    logits: Optional[torch.Tensor] = None


class Distiller(nn.Module):
    """Pairs a teacher and a student (any timm models, any families) and computes the training loss.

    ``teacher`` is a ``LiveTeacher``, a ``CachedTeacher`` (``distill.teaching.teachers``), a plain model (run live) or
    None (the student trains alone through the same code path: the baseline). ``losses`` maps registered loss
    names to weights or options. ``freezer`` (a ``transfer.StageFreezer``) keeps a partly frozen student's frozen
    BatchNorm layers in eval mode.

    The step contract. Built once: each term configures the student (``configure_student``), picks its feature taps
    (``resolve_layers``) and sizes its adapters from one dry run (``setup``); the union of the terms' ``needs`` is
    checked here (a teacher for teacher needs, no logit cache for teacher features or a strong view).
    ``forward(batch, epoch)`` runs the teacher (no grad; a cache lookup for a ``CachedTeacher``) only when a main
    term reads it, then the student once with every tap any term asked for, and returns a ``StepResult`` of
    ``sum(weight * term(view))`` where each term's ``view`` is the ``StepOutputs`` it declared
    (``losses.step.term_view``: an undeclared field or tap refuses to be used). The head a term reads is
    ``student_head`` (``models.heads``); top-1 uses the class head. What trains (the student and the terms' adapters,
    never the teacher) is ``trainable_modules``, and DDP wraps ``TrainableParts``. The pre-stage of FSP/FT/AB is
    ``training.prestage``.
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

    def step_outputs(self, batch: Batch, epoch: int, run_teacher: bool) -> StepOutputs:
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

    def forward(self, batch: Batch, epoch: int = 0) -> StepResult:
        step = self.step_outputs(batch, epoch, self.uses_teacher)
        if Need.STRONG_VIEW in self.needs:
            if batch.strong is None:
                raise DistillError("a loss term needs a strongly augmented view of each batch; train through "
                                   "distill.Trainer or give the Batch a strong view")
            # separate forward passes, as the reference: the student's BatchNorm sees each view's own statistics
            step.student_logits_strong = student_heads(self.student(batch.strong))[LOGITS]
            if self.uses_teacher:
                step.teacher_logits_strong = self.teacher.logits(batch.strong)
        weighted = {name: self.loss_weights[name] * self.loss_terms[name](self.term_step(name, step))
                    for name in self.main_terms}
        return StepResult(sum(weighted.values()), {name: value.detach() for name, value in weighted.items()},
                          step.student_logits)

    def term_step(self, name: str, step: StepOutputs) -> StepOutputs:
        """The step as term ``name`` declared it (``losses.step.term_view``)."""
        term = self.loss_terms[name]
        return term_view(step, name, term.needs, term.student_layers, term.teacher_layers)


def _unique(items) -> List[Any]:
    return list(dict.fromkeys(items))


class TrainableParts(nn.Module):
    """The student and the loss terms' modules as one module whose forward is the Distiller's: what DDP wraps,
    so it never holds (or broadcasts the buffers of) the frozen teacher."""

    def __init__(self, distiller: Distiller):
        super().__init__()
        self.student, self.loss_terms = distiller.student, distiller.loss_terms
        object.__setattr__(self, 'distiller', distiller)  # a plain reference: not a submodule

    def forward(self, *args, **kwargs) -> StepResult:
        return self.distiller(*args, **kwargs)
