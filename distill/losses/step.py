"""What a loss term sees in one training step (``StepOutputs``), what it declares it reads (``Need``), and the view
of a step each term gets: the fields it did not declare refuse to be used, naming the term and the missing
declaration, so a term can read only what it declared and the engine's checks of the needs are the whole truth.
"""
import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Dict, FrozenSet, Optional, Sequence, Union

import torch
import torch.nn as nn

from ..errors import DistillError


class Need(str, enum.Enum):
    """What a loss term reads beyond the student's outputs and the labels; the engine checks the union once."""
    TEACHER_LOGITS = 'teacher logits'  # step.teacher_logits: the teacher runs (or a teacher cache serves them)
    TEACHER_FEATURES = 'teacher features'  # intermediate teacher features: a logit-only teacher cache cannot serve it
    STRONG_VIEW = 'strong view'  # a RandAugment view of each batch, run through both models (no finite view set)
    SAMPLE_INDICES = 'sample indices'  # each sample's position in the training split
    PER_SAMPLE_STATE = 'per-sample state'  # state updated per training sample (memory banks): one process only
    PRE_STAGE = 'pre-stage'  # trains its own modules before epoch 1 (pre_stage_epochs)
    # the teacher's BatchNorm normalises with each batch's statistics while training (its reference code's train
    # mode); its outputs then depend on the batch, so no cache can serve them
    TEACHER_BATCH_STATISTICS = 'teacher batch statistics'
    CLASS_LABELS = 'class labels'  # reads each sample's one class (targets): mixup/cutmix batches have two


TEACHER_NEEDS = frozenset({Need.TEACHER_LOGITS, Need.TEACHER_FEATURES})  # a term with one of these runs the teacher

# The StepOutputs fields only a term that declared the need may read.
FIELD_NEEDS = {'teacher_logits': Need.TEACHER_LOGITS, 'teacher_features': Need.TEACHER_FEATURES,
               'indices': Need.SAMPLE_INDICES, 'student_logits_strong': Need.STRONG_VIEW,
               'teacher_logits_strong': Need.STRONG_VIEW}


@dataclass
class StepOutputs:
    """Everything a loss term may use in one step. Teacher fields are None when training a student alone.
    ``student_logits`` is the student's class head; ``student_heads`` holds every head by name
    (``models.heads``: ``logits``, and ``distillation`` for a distilled DeiT in distilled training)."""
    student_logits: torch.Tensor
    targets: torch.Tensor
    teacher_logits: Optional[torch.Tensor] = None
    indices: Optional[torch.Tensor] = None  # dataset indices of the batch's samples
    epoch: int = 0
    # Features of every tap any term asked for, keyed by tap (stage index, module path or 'pre_logits').
    student_features: Dict[Union[int, str], torch.Tensor] = field(default_factory=dict)
    teacher_features: Dict[Union[int, str], torch.Tensor] = field(default_factory=dict)
    # Logits on the batch's strongly augmented view, when a term needs one (Need.STRONG_VIEW).
    student_logits_strong: Optional[torch.Tensor] = None
    teacher_logits_strong: Optional[torch.Tensor] = None
    # Mixup/CutMix target distributions (N, C) where the batch was mixed; ``targets`` are then the unmixed labels.
    soft_targets: Optional[torch.Tensor] = None
    student_heads: Dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class SetupContext:
    """What a term may size itself from, once, before training: feature shapes of one dry run (keyed like
    ``StepOutputs.*_features``) and the training set (for memory banks such as CRD's)."""
    student_shapes: Dict[Union[int, str], torch.Size] = field(default_factory=dict)
    teacher_shapes: Dict[Union[int, str], torch.Size] = field(default_factory=dict)
    num_classes: Optional[int] = None
    train_targets: Optional[torch.Tensor] = None  # labels of the training set, indexed like StepOutputs.indices
    student: Optional[nn.Module] = None
    teacher: Optional[nn.Module] = None  # read-only: e.g. OFD's margins come from its BatchNorm parameters


class Refused:
    """A step field a term may not read: any use of it (indexing, arithmetic, a torch function, truth, length,
    attributes) raises ``DistillError(message)``."""

    def __init__(self, message: str):
        self.message = message

    def _refuse(self, *args, **kwargs):
        raise DistillError(self.message)

    __getitem__ = __len__ = __iter__ = __eq__ = __ne__ = __bool__ = __float__ = __int__ = __neg__ = _refuse
    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = __truediv__ = __rtruediv__ = _refuse
    __matmul__ = __rmatmul__ = __pow__ = __lt__ = __le__ = __gt__ = __ge__ = _refuse

    def __getattr__(self, name: str):
        if name.startswith('__'):  # copy, pickle and hasattr probe these
            raise AttributeError(name)
        self._refuse()

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        _first_refused(list(args) + list((kwargs or {}).values()))._refuse()


def _first_refused(values) -> Refused:
    """The first ``Refused`` among a torch function's arguments (in lists too)."""
    stack = list(values)
    while stack:
        value = stack.pop(0)
        if isinstance(value, Refused):
            return value
        if isinstance(value, (list, tuple)):
            stack = list(value) + stack
    raise AssertionError('__torch_function__ of Refused called without one')


def mixed_labels(term: str) -> Refused:
    """``StepOutputs.targets`` of a mixed batch (mixup/CutMix: two classes per image) for a term that did not declare
    ``Need.CLASS_LABELS``: it stops in one line naming the term, instead of reading unmixed labels."""
    return Refused(f"loss term '{term}' reads each sample's class, but mixup/CutMix gave the batch two classes per "
                   f"image; the term must declare Need.CLASS_LABELS (mixing is then refused for it), or read "
                   f"step.soft_targets")


class DeclaredTaps(dict):
    """The feature taps a term declared (``student_layers`` / ``teacher_layers``); another tap is refused by name."""

    def __init__(self, taps: Dict, term: str, side: str):
        super().__init__(taps)
        self.term, self.side = term, side

    def __missing__(self, tap):
        raise DistillError(f"loss term '{self.term}' reads {self.side} feature tap {tap!r} but does not declare it "
                           f"in its {self.side}_layers {list(self)}")


def term_view(step: StepOutputs, term: str, needs: FrozenSet[Need], student_layers: Sequence,
              teacher_layers: Sequence) -> StepOutputs:
    """``step`` as the term named ``term`` may read it: the fields of needs it did not declare refused, its own
    feature taps only, and on a mixed batch the per-sample classes refused unless it declared Need.CLASS_LABELS
    (which the mixing itself refuses)."""
    changes = {name: Refused(f"loss term '{term}' reads step.{name} but does not declare Need.{need.name} in its "
                             f"needs") for name, need in FIELD_NEEDS.items() if need not in needs}
    changes['student_features'] = DeclaredTaps({tap: step.student_features[tap] for tap in student_layers}, term,
                                               'student')
    if Need.TEACHER_FEATURES in needs:
        changes['teacher_features'] = DeclaredTaps({tap: step.teacher_features[tap] for tap in teacher_layers},
                                                   term, 'teacher')
    if step.soft_targets is not None and Need.CLASS_LABELS not in needs:
        changes['targets'] = mixed_labels(term)
    return dataclasses.replace(step, **changes)
