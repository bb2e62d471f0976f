"""What ``last.pt`` / ``best.pt`` hold: each stateful part of a run under its checkpoint key (the student, its EMA,
the loss terms' modules, the optimiser, the schedule, the grad scaler: anything with ``state_dict`` /
``load_state_dict``, None where the run has none), the run's counters (``RunState``), the random streams and the data
order. One list of keys, read by both the writer and the reader, so a part cannot be saved and then forgotten."""
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Protocol

from ..config import Config
from ..runs.checkpoint import rng_state, set_rng_state


class Stateful(Protocol):
    def state_dict(self) -> Dict[str, Any]: ...

    def load_state_dict(self, state: Dict[str, Any]) -> Any: ...


@dataclass
class RunState:
    """The run's counters, carried across a resume."""
    epoch: int = 0  # epochs finished
    num_updates: int = 0  # optimiser updates so far (per-update schedules step on it)
    best_top1: float = -1.0
    best_epoch: int = 0
    history: List[Dict[str, Any]] = field(default_factory=list)  # one metrics record per finished epoch
    teacher_metrics: Optional[Dict[str, float]] = None  # the teacher's validation, measured once


def checkpoint_state(parts: Dict[str, Optional[Stateful]], state: RunState) -> Dict[str, Any]:
    """The checkpoint's parts, counters and random streams (the caller adds the rest: data order, config...)."""
    return {**{key: part.state_dict() if part is not None else None for key, part in parts.items()},
            **dataclasses.asdict(state), 'rng': rng_state()}


def restore_state(parts: Dict[str, Optional[Stateful]], checkpoint: Dict[str, Any]) -> RunState:
    """Load every part that the run has and the checkpoint holds, the random streams; the counters."""
    for key, part in parts.items():
        if part is not None and checkpoint[key] is not None:
            part.load_state_dict(checkpoint[key])
    set_rng_state(checkpoint['rng'])
    state = RunState(**{item.name: checkpoint[item.name] for item in dataclasses.fields(RunState)})
    state.history = list(state.history)
    return state


def summarise(cfg: Config, state: RunState) -> Dict[str, Any]:
    """``summary.json``: the run's models, losses and seed, its best and last validation, the training time."""
    last = state.history[-1] if state.history else {}
    return {
        'student': cfg.student.name, 'teacher': cfg.teacher.name if cfg.teacher else None,
        'losses': cfg.losses, 'seed': cfg.trainer.seed, 'epochs': len(state.history),
        'best_top1': state.best_top1, 'best_epoch': state.best_epoch,
        'last_top1': last.get('val_top1', math.nan), 'last_top5': last.get('val_top5', math.nan),
        'teacher_top1': state.teacher_metrics['top1'] if state.teacher_metrics else None,
        'train_time_s': sum(record['epoch_time'] for record in state.history),
    }
