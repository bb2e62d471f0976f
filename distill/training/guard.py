"""The NaN guard: each step's loss terms are checked on the device and looked at from the host only every few
steps (so steps never wait for the device); the first non-finite step stops the run with one line."""
import math
import os
from typing import Dict, List, Optional, Tuple

import torch

from ..errors import DistillError


class FiniteGuard:
    """Remembers the first non-finite step (and its term values) seen by ``observe``; ``check`` reports it."""

    def __init__(self, every: int, device: torch.device):
        self.every, self.device = every, device
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=device)
        self.values: Optional[torch.Tensor] = None
        self.names: List[str] = []

    def observe(self, out, step: int) -> Optional[Tuple[int, Dict[str, float]]]:
        """Note step ``step``'s ``StepResult`` (its loss and terms) on the device."""
        self.names = ['loss'] + list(out.terms)
        values = torch.stack([out.loss.detach().float()] + [v.float() for v in out.terms.values()])
        newly_bad = ~torch.isfinite(values).all() & (self.first_bad < 0)
        self.first_bad = torch.where(newly_bad, torch.full_like(self.first_bad, step), self.first_bad)
        self.values = values if self.values is None else torch.where(newly_bad, values, self.values)
        return self.check() if (step + 1) % self.every == 0 else None

    def check(self) -> Optional[Tuple[int, Dict[str, float]]]:
        """(step, term values) of the first non-finite step seen, or None."""
        step = int(self.first_bad)
        if step < 0:
            return None
        return step, dict(zip(self.names, self.values.tolist()))


def stop_if_nonfinite(found: Optional[Tuple[int, Dict[str, float]]], epoch: int, last_checkpoint: str) -> None:
    """Raise the one-line error for a non-finite step found by a ``FiniteGuard``."""
    if found is None:
        return
    kept = f"last good checkpoint {last_checkpoint} is kept" if os.path.exists(last_checkpoint) else \
        "no checkpoint was written yet"
    step, values = found
    loss = values.pop('loss')
    bad = [name for name, value in values.items() if not math.isfinite(value)]
    terms = ', '.join(f"{name}={value:.4g}" for name, value in values.items())
    raise DistillError(f"loss became {loss} at epoch {epoch + 1}, step {step + 1} (loss term "
                       f"{', '.join(repr(b) for b in bad) or '?'}; {terms}); training stopped and {kept}; "
                       f"lower optimizer.lr, check the data, or use trainer.precision=fp32")
