"""What a loss term sees in a training step, and the registry that maps recipe names to loss terms.

The engine never names a method: it builds each configured term from this registry, asks whether the term
needs the teacher, and sums ``weight * term(step)``.
"""
import difflib
import inspect
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Type

import torch
import torch.nn as nn

from ..errors import DistillError


@dataclass
class StepOutputs:
    """Everything a loss term may use in one step. Teacher fields are None when training a student alone."""
    student_logits: torch.Tensor
    targets: torch.Tensor
    teacher_logits: Optional[torch.Tensor] = None
    indices: Optional[torch.Tensor] = None  # dataset indices of the batch's samples
    epoch: int = 0


class LossTerm(nn.Module):
    """A thin module around a plain loss function. ``requires_teacher`` tells the engine to run the teacher."""
    requires_teacher: bool = False

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


def nearest(name: str, choices, prefix: str = '') -> str:
    """' (did you mean PREFIX+X?)' for the closest X of ``choices``, or '' when none is close."""
    match = difflib.get_close_matches(str(name), list(choices), n=1, cutoff=0.5)
    return f" (did you mean '{prefix}{match[0]}'?)" if match else ''


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
    try:
        return cls(**options)
    except (TypeError, ValueError) as exc:
        raise DistillError(f"bad options for loss '{name}': {exc}") from None


def fp32(*tensors: torch.Tensor):
    """Losses are computed in float32 even under autocast: softmax/KL in bf16 loses the small probabilities
    that carry the teacher's dark knowledge."""
    return tuple(t.float() for t in tensors)
