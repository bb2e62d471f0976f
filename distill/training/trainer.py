"""The training loop shared by teacher training, baseline students and distillation.

One ``Trainer`` runs a ``Config``: it builds data, models, the ``Distiller``, a timm optimizer and scheduler,
trains with the chosen precision, evaluates top-1/top-5 every epoch, checkpoints ``last.pt`` (every epoch, and inside
one: ``midepoch``) and ``best.pt`` atomically, resumes exactly, and exports the student (safetensors and a timm
model folder). What it builds from comes from one module each: ``runtime`` (device, precision, DDP, compile),
``models.factory``, ``teaching.build``, ``optim``, ``stepping``, ``evaluation``, ``guard`` (non-finite losses),
``runs.directory`` (files and run state), ``runs.logger``.
"""
import math
import os
import sys
import time
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn
from tqdm import tqdm

from ..config import Config, save_config, to_dict
from ..data import Placement, build_data
from ..data.mixing import batch_seed, create_batch_augment
from ..errors import DistillError
from ..files import atomic_save
from ..losses import Need, declared_needs
from ..models.factory import check_input_size, check_model_config, create_model, init_from
from ..models.pretrained import expected_size, pretrained_input, pretrained_stats, resolve_image_size
from ..models.transfer import StageFreezer, apply_lr_scales, param_groups, uses_transfer
from ..runs.checkpoint import seed_everything
from ..runs.description import describe_run
from ..runs.directory import RunDir
from ..runs.export import export_data_config
from ..runs.logger import NullLogger, RunLogger, check_wandb_reachable
from ..teaching.build import build_teacher
from .distiller import Distiller, TrainableParts
from .evaluation import evaluate
from .guard import FiniteGuard, stop_if_nonfinite
from .midepoch import EpochProgress, StopRequest, add_step, epoch_metrics
from .optim import check_scheduler, create_optimizer, create_scheduler
from .runtime import CompiledForward, Runtime
from .state import RunState, checkpoint_state, restore_state, summarise
from .prestage import PreStage
from .stepping import Stepper, create_ema, max_norm_constraint


class Trainer:
    def __init__(self, cfg: Config, resume: bool = False, quiet: bool = False):
        self.cfg = cfg = resolve_image_size(cfg)
        if cfg.teacher and cfg.teacher.recipe and not (cfg.teacher.checkpoint or cfg.teacher.pretrained):
            raise DistillError(f"the teacher has no weights yet: teacher.recipe {cfg.teacher.recipe} trains it when "
                               f"run through `distill train` (distill.sweeps.stages.run); or set teacher.checkpoint")
        self.run_dir = RunDir.of(cfg)
        self.runtime = runtime = Runtime(cfg.trainer)
        self.device, self.dist = runtime.device, runtime.dist
        checkpoint = self.run_dir.resume_checkpoint(cfg) if resume else None
        if not resume and os.path.exists(self.run_dir.last):
            raise DistillError(f"run directory {self.run_dir.path} already holds a run; add --resume to continue "
                               f"it, or pick another trainer.run_name / trainer.output_dir")
        self.run_dir.check_writable()
        for role, model_cfg in (('student', cfg.student), ('teacher', cfg.teacher)):
            if model_cfg:  # fail before the (slow) data loading
                check_model_config(model_cfg, role)
        check_scheduler(cfg.scheduler)
        if self.dist.is_main:
            check_wandb_reachable(cfg.wandb)  # wandb.strict: before anything is written

        seed_everything(cfg.trainer.seed)
        needs = declared_needs(cfg.losses)
        self.data = build_data(cfg.data, cfg.trainer.seed, Placement(self.device, self.dist.rank,
                                                                     self.dist.world_size),
                               Need.STRONG_VIEW in needs, pretrained_stats(pretrained_input(cfg.student.name,
                                                                                            cfg.student.pretrained)))
        self.model_notes: List[str] = []
        student = create_model(cfg.student, self.data.num_classes, 'student', cfg.transfer, self.model_notes)
        if cfg.transfer.init_from:
            init_from(student, cfg.transfer, cfg.student.name, self.model_notes)
        check_input_size(student, cfg.data.image_size, 'student', cfg.student.name, self.data.channels)
        teacher = build_teacher(self._teacher_model(), cfg, self.data.train, self.data.num_classes, self.device,
                                runtime.memory_format is not None, self.model_notes) if cfg.teacher else None
        self.freezer = StageFreezer(student, cfg.transfer) if uses_transfer(cfg.transfer) else None
        input_size = (self.data.channels, cfg.data.image_size, cfg.data.image_size)
        self.distiller = runtime.place(Distiller(teacher, student, cfg.losses, input_size=input_size,
                                                 train_targets=self.data.train.split.labels, freezer=self.freezer))
        self.model_notes += self.distiller.notes
        if self.freezer is not None:
            self.freezer.apply(0)
        self.trainable = self.distiller.trainable_modules()
        self.ema = create_ema(student, cfg.ema)
        self.batch_augment = create_batch_augment(cfg.data, Need.CLASS_LABELS in needs, self.data.num_classes,
                                                  self.device)
        single_process = [name for name, term in self.distiller.loss_terms.items()
                          if Need.PER_SAMPLE_STATE in term.needs]
        self.forward = CompiledForward(runtime.wrap(self.distiller, TrainableParts(self.distiller), single_process),
                                       [student, teacher.model if teacher else None], cfg.trainer.compile,
                                       lambda message: self.logger.info(message), cfg.trainer.compile_mode)
        params = self.trainable if self.freezer is None else \
            param_groups(student, [self.distiller.loss_terms], cfg.optimizer, cfg.transfer)
        self.optimizer = create_optimizer(params, cfg.optimizer, self.device)
        accumulate = cfg.trainer.accumulate_steps
        self.scheduler = create_scheduler(self.optimizer, cfg.scheduler, cfg.trainer.epochs,
                                          math.ceil(len(self.data.train) / accumulate))
        if self.scheduler is None and self.freezer is not None:
            apply_lr_scales(self.optimizer)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.trainer.precision == 'fp16')
        self.stepper = Stepper(runtime, self.optimizer, self.scaler, list(self.trainable.parameters()),
                               cfg.trainer.grad_clip, accumulate, constraint=max_norm_constraint(student,
                                                                                                 cfg.trainer.max_norm))

        self.state = RunState()
        self.progress: Optional[EpochProgress] = None  # of the epoch a checkpoint inside it stopped
        self.stop = StopRequest()
        self.lock = self.run_dir.lock() if self.dist.is_main else None  # one trainer per run, before any write
        if self.dist.is_main:
            os.makedirs(self.run_dir.checkpoints, exist_ok=True)
            self.run_dir.remove_temporaries()
            save_config(cfg, self.run_dir.resolved)
            self.logger = RunLogger(self.run_dir, cfg, checkpoint.get('wandb_id') if checkpoint else None, quiet)
        else:
            self.logger = NullLogger()
        if checkpoint is not None:
            self._restore(checkpoint)
        else:  # a fresh start in a directory whose first epoch never finished
            self.logger.rewrite_history([])

    def _teacher_model(self) -> nn.Module:
        model = create_model(self.cfg.teacher, self.data.num_classes, 'teacher')
        size = expected_size(model, self.cfg.teacher.pretrained, self.cfg.data.image_size)
        check_input_size(model, size, 'teacher', self.cfg.teacher.name, self.data.channels)
        return model

    def _parts(self) -> Dict[str, Any]:
        """The run's stateful parts by checkpoint key (``state``)."""
        return {'model': self.distiller.student, 'model_ema': self.ema.module if self.ema is not None else None,
                'loss_terms': self.distiller.loss_terms, 'optimizer': self.optimizer, 'scheduler': self.scheduler,
                'scaler': self.scaler}

    def _checkpoint(self, progress: Optional[EpochProgress] = None) -> Dict[str, Any]:
        """What ``last.pt`` / ``best.pt`` hold after ``state.epoch`` epochs, or inside the next one (``progress``)."""
        return {
            **checkpoint_state(self._parts(), self.state),
            'epoch_progress': progress.state() if progress else None,
            'data_generator': progress.generator_state if progress else self.data.train.generator.get_state(),
            'normalization': {'mean': self.data.train.mean.flatten().cpu(), 'std': self.data.train.std.flatten().cpu()},
            'config': to_dict(self.cfg), 'wandb_id': self.logger.wandb_id,
        }

    def _restore(self, checkpoint: Dict[str, Any]) -> None:
        self.state = restore_state(self._parts(), checkpoint)
        self.data.train.generator.set_state(checkpoint['data_generator'])
        self.logger.rewrite_history(self.state.history)
        self.progress = EpochProgress.from_checkpoint(checkpoint)
        if self.progress is not None and self.distiller.teacher is not None:
            self.distiller.teacher.load_epoch_state(self.progress.teacher)
        inside = f", {self.progress.step} batches into epoch {self.state.epoch + 1}" if self.progress else ''
        self.logger.info(f"resumed {self.run_dir.path} after epoch {self.state.epoch}{inside}")

    def run_pre_stage(self) -> None:
        PreStage(self.distiller).run(self.data.train, self.runtime, self.cfg, self.logger, self.run_dir.last)

    def _epoch_progress(self, epoch: int) -> EpochProgress:
        """The progress a checkpoint inside ``epoch`` restored (taken once), else the epoch's start."""
        progress, self.progress = self.progress, None
        return progress if progress is not None and progress.epoch == epoch else \
            EpochProgress(epoch, self.data.train.generator.get_state())

    def train_one_epoch(self, epoch: int, progress: Optional[EpochProgress] = None) -> Dict[str, float]:
        """One pass over the training split (the rest of it after ``progress``, a checkpoint inside the epoch).
        Nothing in a step waits for the device: metrics add up on it and the host looks at the loss only every
        ``check_finite_every`` steps."""
        progress = progress or self._epoch_progress(epoch)
        self.distiller.train()
        self.data.train.set_epoch(epoch, progress.step)
        device, accumulate, steps = self.device, self.cfg.trainer.accumulate_steps, len(self.data.train)
        every = self.cfg.trainer.check_finite_every or (1 if device.type == 'cpu' else 50)
        guard = FiniteGuard(every, device)
        sums = None if progress.sums is None else progress.sums.to(device) if self.dist.is_main else \
            torch.zeros_like(progress.sums, device=device)  # loss, each term, top-1 hits, count (sample sums)
        show = self.cfg.trainer.progress and sys.stderr.isatty() and self.dist.is_main
        bar = tqdm(self.data.train, desc=f"epoch {epoch + 1}/{self.cfg.trainer.epochs}", disable=not show,
                   leave=False, dynamic_ncols=True, initial=progress.step, total=steps)
        for step, batch in enumerate(bar, start=progress.step):
            if self.batch_augment is not None:  # erasing, mixup, cutmix
                with self.data.train.host_work():
                    batch = self.batch_augment(batch, batch_seed(self.data.train, self.cfg.trainer.seed, epoch, step))
            closes_group = (step + 1) % accumulate == 0 or step + 1 == steps
            out = self.stepper.update(self.forward, batch, epoch, closes_group)
            stop_if_nonfinite(guard.observe(out, step), epoch, self.run_dir.last)
            if closes_group:
                self.state.num_updates += 1
                if self.ema is not None:
                    self.ema.update(self.distiller.student, step=self.state.num_updates)
                if self.scheduler:
                    self.scheduler.step_update(num_updates=self.state.num_updates)
            sums = add_step(sums, out, batch.labels)
            if show and step % 20 == 0:
                bar.set_postfix(loss=f"{out.loss.item():.3f}")
            if closes_group and step + 1 < steps:
                self._checkpoint_inside(progress, step + 1, sums, guard, every)
        stop_if_nonfinite(guard.check(), epoch, self.run_dir.last)
        metrics = epoch_metrics(self.dist.all_sum(sums).tolist(), list(self.distiller.main_terms))
        if self.distiller.teacher is not None:
            metrics.update(self.distiller.teacher.end_epoch())
        return metrics

    def fit(self) -> Dict[str, Any]:
        cfg, logger = self.cfg, self.logger
        completed = False
        try:
            self.stop.listen()  # SIGINT / SIGTERM: checkpoint at the next stop point, then stop (midepoch)
            if self.state.teacher_metrics is None and self.distiller.teacher is not None:
                self.state.teacher_metrics = self._evaluate(self.distiller.teacher.classifier())
                logger.info(f"teacher {cfg.teacher.name}: val top-1 {self.state.teacher_metrics['top1']:.2f}")
            for line in describe_run(self):
                logger.info(line)
            if self.state.epoch == 0 and self.progress is None:
                self.run_pre_stage()
            for epoch in range(self.state.epoch, cfg.trainer.epochs):
                self._epoch(epoch)
                if epoch + 1 < cfg.trainer.epochs and self.stop.agreed(self.dist, self.device):
                    self._stopped(f"after epoch {epoch + 1}")
            summary = summarise(self.cfg, self.state)
            if self.dist.is_main:
                self.run_dir.export(self.distiller.student, export_data_config(cfg.data, self.data), summary)
            completed = True
            logger.info(f"done: best top-1 {summary['best_top1']:.2f} (epoch {summary['best_epoch']}), last "
                        f"{summary['last_top1']:.2f}; run directory {self.run_dir.path}")
            return summary
        finally:
            self.stop.restore()
            logger.finish(summarise(self.cfg, self.state) if completed else None)
            if self.lock is not None:
                self.lock.release()

    def _checkpoint_inside(self, progress: EpochProgress, step: int, sums: torch.Tensor, guard: FiniteGuard,
                           every: int) -> None:
        """``last.pt`` after batch ``step`` of the epoch, every ``trainer.checkpoint_every`` updates and at a stop
        request (``midepoch``); a requested stop then ends the run."""
        updates = self.state.num_updates
        periodic = self.cfg.trainer.checkpoint_every and updates % self.cfg.trainer.checkpoint_every == 0
        stopping = updates % every == 0 and self.stop.agreed(self.dist, self.device)
        if not (periodic or stopping):
            return
        stop_if_nonfinite(guard.check(), progress.epoch, self.run_dir.last)  # never checkpoint a non-finite state
        # the sums of every rank: rank 0 carries them on after a resume
        progress.step, progress.sums = step, self.dist.all_sum(sums).cpu()
        progress.teacher = self.distiller.teacher.epoch_state() if self.distiller.teacher is not None else {}
        if self.dist.is_main:
            atomic_save(self._checkpoint(progress), self.run_dir.last)
        self.dist.barrier()
        if stopping:
            self._stopped(f"{step} batches into epoch {progress.epoch + 1}")

    def _stopped(self, where: str) -> None:
        asked = self.stop.received.name if self.stop.received else 'another rank'
        self.logger.notice(f"stopped ({asked}): {self.run_dir.last} holds the run {where}; resume with --resume")
        raise KeyboardInterrupt

    def _epoch(self, epoch: int) -> None:
        """Train one epoch, validate, step the schedule, checkpoint and log."""
        cfg, logger = self.cfg, self.logger
        progress = self._epoch_progress(epoch)
        progress.started = time.perf_counter()
        if self.freezer is not None:
            self.freezer.apply(epoch)
            if epoch > 0 and self.freezer.frozen_groups(epoch) != self.freezer.frozen_groups(epoch - 1):
                logger.info(f"epoch {epoch + 1}: unfrozen down to {self.freezer.frozen_groups(epoch)} frozen layer "
                            f"groups")
        group = self.optimizer.param_groups[0]  # the recipe's lr: groups may carry a transfer lr_scale
        if progress.lr is None:  # a resume inside the epoch keeps the lr its start had
            progress.lr = group['lr'] / group.get('lr_scale', 1.0)
        lr = progress.lr
        record: Dict[str, Any] = {'epoch': epoch + 1, 'lr': lr, **self.train_one_epoch(epoch, progress)}
        evaluated = (epoch + 1) % cfg.trainer.eval_every == 0 or epoch + 1 == cfg.trainer.epochs
        if evaluated:  # with an EMA, the averaged student is the one evaluated, kept as best and exported
            val = self._evaluate(self.ema.module if self.ema is not None else self.distiller.student)
            record.update(val_top1=val['top1'], val_top5=val['top5'], val_loss=val['loss'])
            if self.ema is not None:
                record['val_top1_raw'] = self._evaluate(self.distiller.student)['top1']
        record['epoch_time'] = progress.seconds()
        if self.scheduler:
            self.scheduler.step(epoch + 1)
        improved = evaluated and record['val_top1'] > self.state.best_top1
        if improved:
            self.state.best_top1, self.state.best_epoch = record['val_top1'], epoch + 1
        self.state.history.append(record)
        self.state.epoch = epoch + 1
        if self.dist.is_main:  # best.pt first: last.pt (what a resume reads) never names a best not on disk
            state = self._checkpoint()
            if improved:
                atomic_save(state, self.run_dir.best)
            atomic_save(state, self.run_dir.last)
        self.dist.barrier()  # every rank sees the checkpoint before going on
        logger.log_epoch(record)
        val_text = f" val top-1 {record['val_top1']:.2f} top-5 {record['val_top5']:.2f}" if evaluated else ''
        logger.info(f"epoch {epoch + 1}/{cfg.trainer.epochs} lr {lr:.4g} loss {record['train_loss']:.4f} "
                    f"train {record['train_top1']:.2f}{val_text} ({record['epoch_time']:.1f}s)")

    def _evaluate(self, model: nn.Module) -> Dict[str, float]:
        return self.forward.run(evaluate, model, self.data.val, self.device, self.runtime.amp_dtype, self.dist,
                                self.runtime.memory_format)
