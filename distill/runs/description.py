"""What a run's log says about it before the first epoch: teacher, student, losses, data, device and precision,
the models' notes (weights loaded, heads replaced) and, when fine-tuning, which parameters train."""
from typing import Iterator

import torch.nn as nn


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def describe_run(trainer) -> Iterator[str]:
    """The lines describing a ``Trainer`` about to train (from ``state.epoch``, where a resume starts)."""
    cfg, distiller, data, dist = trainer.cfg, trainer.distiller, trainer.data, trainer.dist
    teacher = (f"teacher {cfg.teacher.name} ({_count(distiller.teacher):,} params, frozen) -> "
               if distiller.teacher is not None else "")
    yield (f"{teacher}student {cfg.student.name} ({_count(distiller.student):,} params); losses "
           f"{distiller.loss_weights}; {len(data.train.split)} train / {len(data.val.split)} val images, "
           f"{data.num_classes} classes; device {trainer.device}"
           f"{f' x {dist.world_size} processes' if dist.enabled else ''}, {cfg.trainer.precision}"
           f"{', channels_last' if trainer.runtime.memory_format else ''}"
           f"{', compiled' if trainer.forward.active else ''}")
    yield from trainer.model_notes
    if trainer.freezer is not None:
        transfer = cfg.transfer
        yield (f"transfer: freeze {transfer.freeze} (frozen_stages {transfer.frozen_stages}, unfreeze every "
               f"{transfer.unfreeze_every or 'never'}), backbone lr x{transfer.backbone_lr_scale}, layer decay "
               f"{transfer.layer_decay}; parameters at epoch {trainer.state.epoch + 1}:")
        trainer.freezer.apply(trainer.state.epoch)
        yield from (f"  {line}" for line in trainer.freezer.describe())
