"""The loss-term class (``LossTerm``), the registry that maps recipe names to loss terms, and helpers shared by the
methods (float32 losses, stage pairing). What a term sees in a step is ``step``.

The engine never names a method: it builds each configured term from this registry, reads what the term declares
(its needs, taps and head), and sums ``weight * term(view of the step)``.
"""
import collections.abc
import functools
import inspect
import typing
from typing import Callable, Dict, FrozenSet, Optional, Sequence, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import DistillError, nearest
from .step import TEACHER_NEEDS, Need, SetupContext, StepOutputs


class ReadsTeacher:
    """``LossTerm.requires_teacher``, of a term class or instance: whether its needs read the teacher (its logits or
    features), so the engine must run it or serve its cached logits."""

    def __get__(self, term, term_class) -> bool:
        return bool((term if term is not None else term_class).needs & TEACHER_NEEDS)


class LossTerm(nn.Module):
    """A thin module around a plain loss function.

    ``needs`` declares what the term reads beyond the student's outputs and the labels (``Need``: teacher logits or
    features, a strong view, sample indices, per-sample state, a pre-stage), checked once by the engine; the term
    sees only those fields of the step (``step.term_view``), and ``requires_teacher`` follows from them.
    ``student_layers`` / ``teacher_layers`` name the feature taps the term reads from ``step.student_features`` /
    ``step.teacher_features`` (``resolve_layers`` may choose them per model). ``setup`` builds adapters from a
    ``SetupContext``; their parameters train with the student and are checkpointed, but are not part of the exported
    student. ``student_head`` names the student output the term reads (``models.heads``); ``configure_student``
    puts the student in the mode the term trains it in, once, before anything runs (DeiT: distilled training).
    """
    requires_teacher = ReadsTeacher()
    paper: str = ''  # the method's paper, for `distill methods`
    default_weight: float = 1.0  # the weight of the reference CIFAR-100 recipes
    needs: FrozenSet[Need] = frozenset()  # what the engine must provide or refuse for it (see Need)
    pairs: str = 'any'  # which teacher/student pairs it supports ('any' includes CNN <-> ViT)
    student_layers: Sequence[Union[int, str]] = ()
    teacher_layers: Sequence[Union[int, str]] = ()
    # A pre-stage (RepDistiller's ``init`` for FSP, FT, AB) trains ``pre_stage_modules`` on ``pre_stage_loss``
    # for ``pre_stage_epochs`` before the main training; ``main_stage = False`` terms add nothing after it.
    pre_stage_epochs: int = 0
    pre_stage_lr: Optional[float] = None  # None: the recipe's optimizer.lr
    main_stage: bool = True
    student_head: str = 'logits'  # the student output it reads: 'logits' (the class head) or 'distillation'

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if 'requires_teacher' in vars(cls):  # one declaration per fact: the needs say whether it reads the teacher
            raise TypeError(f"{cls.__name__}: declare Need.TEACHER_LOGITS or Need.TEACHER_FEATURES in needs instead "
                            f"of setting requires_teacher")

    def configure_student(self, student: nn.Module) -> None:
        """Put ``student`` in the mode this term trains it in, or refuse it in one line (DistillError)."""

    def pre_stage_loss(self, step: 'StepOutputs') -> torch.Tensor:
        raise NotImplementedError

    def pre_stage_modules(self, student: nn.Module) -> Sequence[nn.Module]:
        """The modules the pre-stage trains (put in train mode; everything else stays in eval mode)."""
        return ()

    def resolve_layers(self, student: nn.Module, teacher: Optional[nn.Module]) -> None:
        """Fix ``student_layers``/``teacher_layers`` for these models (e.g. 'every stage but the stem')."""

    def setup(self, context: SetupContext) -> None:
        """Build adapters (and buffers such as memory banks) once the shapes and the data are known."""

    def forward(self, step: StepOutputs) -> torch.Tensor:
        raise NotImplementedError


_LOSSES: Dict[str, Type[LossTerm]] = {}


def register_loss(name: str) -> Callable[[Type[LossTerm]], Type[LossTerm]]:
    def decorate(cls: Type[LossTerm]) -> Type[LossTerm]:
        _LOSSES[name] = cls
        return cls
    return decorate


def list_losses() -> Dict[str, Type[LossTerm]]:
    return dict(_LOSSES)


def declared_needs(losses) -> FrozenSet[Need]:
    """The union of the ``needs`` of the registered terms named in a losses config (before any is built), so data
    can be prepared for them (e.g. a strong view) before the models exist."""
    return frozenset(need for name in losses if name in _LOSSES for need in _LOSSES[name].needs)


def create_loss(name: str, **options) -> LossTerm:
    """Build the registered loss term ``name`` with its options; unknown names and options are user errors."""
    if name not in _LOSSES:
        raise DistillError(f"unknown loss '{name}'{nearest(name, _LOSSES)}; known losses: {sorted(_LOSSES)}")
    cls = _LOSSES[name]
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != 'self']
    for option in options:
        if option not in accepted:
            raise DistillError(f"unknown option losses.{name}.{option}{nearest(option, accepted)}; "
                               f"'{name}' takes {accepted + ['weight']}")
    hints = typing.get_type_hints(cls.__init__)
    for option, value in options.items():
        if option in hints and not _matches(value, hints[option]):
            raise DistillError(f"losses.{name}.{option} must be {_type_name(hints[option])}, got {value!r}")
    try:
        return cls(**options)
    except (TypeError, ValueError) as exc:
        raise DistillError(f"bad options for loss '{name}': {exc}") from None


def _matches(value, annotation) -> bool:
    """Whether a recipe value fits a loss option's annotation (ints pass as floats, bools never as numbers)."""
    origin = typing.get_origin(annotation)
    if origin is Union:
        return any(_matches(value, arg) for arg in typing.get_args(annotation))
    if origin in (list, tuple, Sequence, collections.abc.Sequence):
        args = typing.get_args(annotation)
        return isinstance(value, (list, tuple)) and all(_matches(v, args[0]) for v in value) if args else True
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation) if isinstance(annotation, type) else True


def _type_name(annotation) -> str:
    if typing.get_origin(annotation) is Union:
        return ' or '.join(_type_name(arg) for arg in typing.get_args(annotation))
    if typing.get_origin(annotation) in (list, tuple, Sequence, collections.abc.Sequence):
        return f'a list of {_type_name(typing.get_args(annotation)[0])}'
    return 'null' if annotation is type(None) else getattr(annotation, '__name__', str(annotation))


def fp32_loss(fn: Callable) -> Callable:
    """Run a loss function in float32 even under autocast (tensor arguments, and lists of them, are cast):
    softmax/KL or Gram matrices in bf16 lose the small values that carry the teacher's knowledge."""
    def cast(value):  # half precisions up; float32 and float64 as they are
        if isinstance(value, torch.Tensor) and value.dtype in (torch.float16, torch.bfloat16):
            return value.float()
        if isinstance(value, (list, tuple)):
            return type(value)(cast(v) for v in value)
        return value

    def first_tensor(values):
        for value in values:
            found = first_tensor(value) if isinstance(value, (list, tuple)) else value
            if isinstance(found, torch.Tensor):
                return found
        return None

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        first = first_tensor(list(args) + list(kwargs.values()))
        with torch.autocast(first.device.type if first is not None else 'cpu', enabled=False):
            return fn(*cast(args), **{k: cast(v) for k, v in kwargs.items()})
    return wrapper


def student_body(student: nn.Module) -> nn.Module:
    """The student without its classifier, as a module list (RepDistiller's ``get_feat_modules``)."""
    classifier = student.get_classifier()
    return nn.ModuleList(module for module in student.children() if module is not classifier)


def stages_after_stem(model: nn.Module) -> list:
    """Stage indices 1..n-1 of ``feature_info`` (RepDistiller's ``feat[1:-1]``: every stage but the stem)."""
    from ..models.features import feature_info_list
    return list(range(1, len(feature_info_list(model))))


def deepest_stages(student: nn.Module, teacher: nn.Module):
    """Stage indices after the stem of both models, paired from the deepest (mdistiller's ``_align_list``)."""
    student_stages, teacher_stages = stages_after_stem(student), stages_after_stem(teacher)
    count = min(len(student_stages), len(teacher_stages))
    return student_stages[len(student_stages) - count:], teacher_stages[len(teacher_stages) - count:]


def pool_to_smaller(student: torch.Tensor, teacher: torch.Tensor):
    """Average-pool the larger of two feature maps to the other's height (RepDistiller AT/NST/VID)."""
    s_h, t_h = student.shape[2], teacher.shape[2]
    if s_h > t_h:
        student = F.adaptive_avg_pool2d(student, (t_h, t_h))
    elif s_h < t_h:
        teacher = F.adaptive_avg_pool2d(teacher, (s_h, s_h))
    return student, teacher


def sum_over_pairs(student_features: Sequence[torch.Tensor], teacher_features: Sequence[torch.Tensor],
                   pair_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Sum of ``pair_loss`` over stage pairs, the larger map of each pair pooled to the smaller (AT, NST)."""
    return sum(pair_loss(*pool_to_smaller(s, t)) for s, t in zip(student_features, teacher_features))


class PairedStagesLoss(LossTerm):
    """A term over pairs of stages: by default every stage but the stem of each model, paired in order and
    truncated to the shorter list (RepDistiller's ``zip(feat_s[1:-1], feat_t[1:-1])``)."""
    needs = frozenset({Need.TEACHER_FEATURES})

    def __init__(self, student_layers: Optional[Sequence[Union[int, str]]] = None,
                 teacher_layers: Optional[Sequence[Union[int, str]]] = None):
        super().__init__()
        self.student_layers, self.teacher_layers = student_layers, teacher_layers

    def resolve_layers(self, student: nn.Module, teacher: Optional[nn.Module]) -> None:
        student_layers = list(self.student_layers) if self.student_layers is not None else stages_after_stem(student)
        teacher_layers = list(self.teacher_layers) if self.teacher_layers is not None else stages_after_stem(teacher)
        pairs = min(len(student_layers), len(teacher_layers))
        self.student_layers, self.teacher_layers = student_layers[:pairs], teacher_layers[:pairs]

    def feature_pairs(self, step: StepOutputs):
        return ([step.student_features[layer] for layer in self.student_layers],
                [step.teacher_features[layer] for layer in self.teacher_layers])
