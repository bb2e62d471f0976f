"""One optimisation step: forward under autocast, scaled backward, gradient clipping, the optimizer step (and a
max-norm weight constraint after it), with gradient accumulation (``trainer.accumulate_steps``); and the student's
exponential moving average (``ema``).

Accumulation: an optimizer step follows ``accumulate_steps`` consecutive batches (fewer at the end of an epoch), and
its gradient is the mean over every sample of those batches, whatever their sizes: each batch's backward adds its
per-sample loss sum (its mean times its global size; under DDP each rank's part times the world size, which DDP's
mean turns back into the sum) and the sum is divided by the group's sample count before the step. The global batch
is ``data.batch_size x accumulate_steps`` (``data.batch_size`` is already the global batch over torchrun ranks);
the intermediate backwards skip DDP's all-reduce (``no_sync``). With one step per batch nothing is rescaled, so
those runs compute exactly what they did before accumulation existed.
"""
import contextlib
from typing import Callable, List, Optional

import torch
import torch.nn as nn

from ..config import EmaConfig
from ..data import Batch
from .distiller import StepResult


class Stepper:
    """Steps of one optimizer (``update`` per batch); ``closes_group`` says a batch ends its accumulation group."""

    def __init__(self, runtime, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                 parameters: List[nn.Parameter], grad_clip: Optional[float], accumulate_steps: int = 1,
                 reduce_grads: bool = False, constraint: Optional[Callable[[], None]] = None):
        self.runtime, self.optimizer, self.scaler, self.parameters = runtime, optimizer, scaler, parameters
        self.constraint = constraint  # applied to the weights after every optimizer step
        self.grad_clip, self.accumulate_steps, self.reduce_grads = grad_clip, accumulate_steps, reduce_grads
        self.group_samples = 0.0  # global samples whose loss sums the gradients hold

    def update(self, forward, batch: Batch, epoch: int, closes_group: bool = True) -> StepResult:
        """Forward and backward of ``batch``; the optimizer steps when ``closes_group`` (always without
        accumulation). ``batch.loss_scale`` weights a rank's part of a global batch."""
        dist = self.runtime.dist
        intermediate = not closes_group and self.accumulate_steps > 1
        with self._no_sync(forward) if intermediate else contextlib.nullcontext():
            with self.runtime.autocast():
                out = forward(self.runtime.batch(batch), epoch)
            if self.group_samples == 0:
                self.optimizer.zero_grad(set_to_none=True)
            if self.accumulate_steps == 1:
                loss = out.loss * batch.loss_scale if batch.loss_scale != 1.0 else out.loss
            else:  # the batch's per-sample loss sum (see the module docstring)
                loss = out.loss * (len(batch.labels) * dist.world_size)
                self.group_samples += len(batch.labels) * dist.world_size / batch.loss_scale
            self.scaler.scale(loss).backward()
        if not closes_group:
            return out
        if self.accumulate_steps > 1:
            for p in self.parameters:
                if p.grad is not None:
                    p.grad.div_(self.group_samples)
        self.group_samples = 0.0
        if self.reduce_grads and dist.enabled:
            for p in self.parameters:
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad)
                    p.grad.div_(dist.world_size)
        if self.grad_clip:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.parameters, self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.constraint is not None:
            self.constraint()
        return out

    @staticmethod
    def _no_sync(forward):
        module = getattr(forward, 'module', forward)  # CompiledForward holds the step's module
        return module.no_sync() if hasattr(module, 'no_sync') else contextlib.nullcontext()


def max_norm_constraint(model: nn.Module, bound: Optional[float]) -> Optional[Callable[[], None]]:
    """``trainer.max_norm``: after each step, every unit's incoming weight vector (a row of a linear layer's weight,
    a filter of a convolution), except the classifier's, is scaled down to L2 norm ``bound`` where it is longer
    (Hinton et al. 2012, arXiv 1207.0580, with dropout; Srivastava et al. 2014, JMLR, §5.1: "max-norm")."""
    if bound is None:
        return None
    classifier = model.get_classifier() if hasattr(model, 'get_classifier') else None
    head = set(classifier.parameters()) if isinstance(classifier, nn.Module) else set()
    weights = [module.weight for module in model.modules() if isinstance(module, (nn.Linear, nn.Conv2d))
               and module.weight not in head]

    @torch.no_grad()
    def constrain() -> None:
        for weight in weights:
            weight.renorm_(2, 0, bound)
    return constrain


def create_ema(student: nn.Module, cfg: EmaConfig) -> Optional[nn.Module]:
    """timm's ``ModelEmaV3`` of ``student`` (its ``module`` is the averaged model, evaluated and exported in the
    student's place), or None when ``ema.enabled`` is false. Made before compilation: it averages plain weights."""
    if not cfg.enabled:
        return None
    from timm.utils import ModelEmaV3
    return ModelEmaV3(student, decay=cfg.decay, use_warmup=cfg.warmup)
