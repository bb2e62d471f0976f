"""The optimizer and learning-rate schedule of a run: timm's ``create_optimizer_v2`` (any timm optimizer, fused
kernels on CUDA where torch has them) and ``create_scheduler_v2`` (the schedules listed in ``SCHEDULERS``)."""
from typing import Iterable, Optional, Union

import torch
from timm.optim import create_optimizer_v2, list_optimizers
from timm.scheduler import create_scheduler_v2

from ..config import OptimizerConfig, SchedulerConfig
from ..errors import DistillError, nearest

FUSED_OPTIMIZERS = ('sgd', 'momentum', 'adam', 'adamw')  # timm names of torch optimizers with fused kernels
# the timm schedules whose settings SchedulerConfig covers ('none': a constant lr without a scheduler object)
SCHEDULERS = ('multistep', 'step', 'cosine', 'tanh', 'poly', 'constant', 'wsd', 'rsqrt', 'none')


def create_optimizer(params: Union[torch.nn.Module, Iterable], opt: OptimizerConfig,
                     device: torch.device) -> torch.optim.Optimizer:
    kwargs = dict(opt.kwargs)
    fused = opt.fused if opt.fused is not None else device.type == 'cuda' and opt.name.lower() in FUSED_OPTIMIZERS
    if fused:
        kwargs['fused'] = True
    try:
        return create_optimizer_v2(params, opt=opt.name, lr=opt.lr, weight_decay=opt.weight_decay,
                                   momentum=opt.momentum, filter_bias_and_bn=opt.filter_bias_and_bn, **kwargs)
    except (ValueError, TypeError) as exc:
        if opt.name not in list_optimizers():
            raise DistillError(f"unknown optimizer.name '{opt.name}'{nearest(opt.name, list_optimizers())}; "
                               f"see timm.optim.list_optimizers()") from None
        raise DistillError(f"bad optimizer settings for '{opt.name}': {exc}") from None


def check_scheduler(sched: SchedulerConfig) -> None:
    if sched.name not in SCHEDULERS:
        raise DistillError(f"unknown scheduler.name '{sched.name}'{nearest(sched.name, SCHEDULERS)}; "
                           f"choose one of {list(SCHEDULERS)}")


def create_scheduler(optimizer: torch.optim.Optimizer, sched: SchedulerConfig, epochs: int,
                     updates_per_epoch: int) -> Optional[object]:
    """The timm scheduler (None for 'none'); stepped per epoch, or per update with ``step_on_epochs: false``."""
    check_scheduler(sched)
    # Our milestones mean "decay once this many epochs are done" (torch MultiStepLR and RepDistiller's
    # `epoch > 150`); timm's multistep applies milestone m one epoch earlier, at 0-based epoch m - 1.
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=sched.name, num_epochs=epochs,
        decay_milestones=[m + 1 for m in sched.milestones],
        decay_epochs=sched.milestones[0] if sched.milestones else None,
        decay_rate=sched.decay_rate, warmup_epochs=sched.warmup_epochs, warmup_lr=sched.warmup_lr,
        min_lr=sched.min_lr, step_on_epochs=sched.step_on_epochs, updates_per_epoch=updates_per_epoch)
    return scheduler
