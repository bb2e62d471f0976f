"""Checkpoints inside an epoch: every ``trainer.checkpoint_every`` optimizer updates, and when the training process
is asked to stop (SIGINT: Ctrl-C or ``distill grid``'s requeue of a preempted job; SIGTERM: torchrun, SLURM, a
container's stop), so that a run whose epochs take hours (ImageNet) loses a few steps, not an epoch.

A checkpoint inside epoch e after its k-th batch holds what an epoch-end one holds (student, EMA, optimizer,
schedule, scaler, loss-term buffers, the RNG states at that step) and ``epoch_progress``: k, the epoch's metric sums
and seconds so far, and the teacher's work of the epoch (a recording's top-k buffers). Its ``data_generator`` is
the generator's state at the epoch's *start*: the loader redraws the epoch's order and augmentation from it and
serves from batch k (streamed images are seeded per (epoch seed, index), so they regenerate bit-exactly). It is
written only where an accumulation group closes, so no gradient is half summed. A resumed run computes what the
uninterrupted run computes (tested bit for bit).

A stop request is acted on at the next stop point (a closing step at the host's ``check_finite_every`` cadence,
where the host waits for the device anyway); under torch.distributed the ranks agree there (a sum of the
requests over ranks), so they all stop after the same step. A second signal stops at once.
"""
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch


@dataclass
class EpochProgress:
    """How far an epoch got: ``step`` batches done, the metric ``sums`` (on the host), the seconds spent before
    this process took over (``elapsed``), the teacher's epoch work, the data generator's state at its start and the
    learning rate at its start (what the epoch's metrics report, whatever the schedule did since)."""
    epoch: int
    generator_state: torch.Tensor
    step: int = 0
    sums: Optional[torch.Tensor] = None
    elapsed: float = 0.0
    teacher: Dict[str, torch.Tensor] = field(default_factory=dict)
    lr: Optional[float] = None
    started: float = field(default_factory=time.perf_counter)

    def seconds(self) -> float:
        return self.elapsed + time.perf_counter() - self.started

    def state(self) -> Dict[str, Any]:
        return {'step': self.step, 'sums': self.sums, 'elapsed': self.seconds(), 'teacher': self.teacher,
                'lr': self.lr}

    @classmethod
    def from_checkpoint(cls, checkpoint: Dict[str, Any]) -> Optional['EpochProgress']:
        """The progress of a checkpoint written inside an epoch, or None for an epoch-end one."""
        state = checkpoint.get('epoch_progress')
        if state is None:
            return None
        return cls(checkpoint['epoch'], checkpoint['data_generator'], state['step'], state['sums'],
                   state['elapsed'], state['teacher'], state.get('lr'))


def add_step(sums: Optional[torch.Tensor], out, labels: torch.Tensor) -> torch.Tensor:
    """The epoch's metric sums after a step, on the device (nothing waits for it): the loss and each term times the
    batch size, the top-1 hits and the sample count; ``out`` is the step's ``StepResult``."""
    size = len(labels)
    values = torch.stack([out.loss.detach().float()] + [value.float() for value in out.terms.values()])
    step_sums = torch.cat([values * size, torch.stack([(out.logits.detach().argmax(1) == labels).sum().float(),
                                                       torch.tensor(float(size), device=labels.device)])])
    return step_sums if sums is None else sums + step_sums


def epoch_metrics(totals: List[float], terms: List[str]) -> Dict[str, float]:
    """``train_loss``, ``train_<term>`` (sample means) and ``train_top1`` of an epoch's summed ``add_step`` totals."""
    count = totals[-1]
    metrics = {f"train_{name}": value / count for name, value in zip(['loss'] + terms, totals)}
    metrics['train_top1'] = 100.0 * totals[-2] / count
    return metrics


class StopRequest:
    """SIGINT / SIGTERM remembered between ``listen`` and ``restore``, where the process has Python's default
    handlers (not where a parent made it ignore them); ``agreed`` tells every rank whether any was asked."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.received: Optional[signal.Signals] = None
        self._previous: Dict[signal.Signals, Any] = {}

    def listen(self) -> None:
        if threading.current_thread() is threading.main_thread():
            defaults = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}
            for signum in self.SIGNALS:
                if signal.getsignal(signum) is defaults[signum]:
                    self._previous[signum] = signal.signal(signum, self._receive)

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _receive(self, signum: int, frame) -> None:
        self.received = signal.Signals(signum)
        for number, handler in self._previous.items():  # a second signal acts at once
            signal.signal(number, handler)
        self._previous = {}

    def agreed(self, dist, device: torch.device) -> bool:
        """Whether a stop was asked of this process or, under torch.distributed, of any rank."""
        if not dist.enabled:
            return self.received is not None
        return dist.all_sum(torch.tensor([float(self.received is not None)], device=device)).item() > 0
