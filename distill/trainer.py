"""The training loop shared by teacher training, baseline students and distillation.

One ``Trainer`` runs a ``Config``: it builds data, models, the ``Distiller``, a timm optimizer and scheduler,
trains with the chosen precision, evaluates top-1/top-5 every epoch, checkpoints ``last.pt`` (every epoch) and
``best.pt`` atomically, resumes exactly, and exports the student as safetensors.
"""
import math
import os
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

import timm
import torch
import torch.nn as nn
from timm.optim import create_optimizer_v2, list_optimizers
from timm.scheduler import create_scheduler_v2
from tqdm import tqdm

from .checkpoint import atomic_save, load_checkpoint, rng_state, seed_everything, set_rng_state
from .config import Config, ModelConfig, TransferConfig, save_config, to_dict
from .data import BatchLoader, build_data, cache_dir
from .distiller import Distiller, TrainableParts
from .distributed import DistributedContext, init_distributed
from .errors import DistillError
from .losses.base import nearest
from .models import load_backbone_weights, load_state_dict_file, load_weights
from .transfer import (StageFreezer, apply_lr_scales, param_groups, replace_head, transfer_parameters,
                       uses_transfer)
from .run_logger import NullLogger, RunLogger
from .teacher_cache import TeacherCache, cache_key

# Settings that may change between a run and its resumption without changing what is computed.
RESUMABLE_CHANGES = ('trainer.epochs', 'trainer.progress', 'trainer.device', 'trainer.eval_every',
                     'trainer.check_finite_every', 'data.eval_batch_size', 'wandb.', 'teacher_cache.dir')
FUSED_OPTIMIZERS = ('sgd', 'momentum', 'adam', 'adamw')  # timm names of torch optimizers with fused kernels
SCHEDULERS = ('multistep', 'step', 'cosine', 'tanh', 'poly', 'constant', 'wsd', 'rsqrt', 'none')


def resolve_device(name: str, local_rank: Optional[int] = None) -> torch.device:
    """The training device; under torchrun (``local_rank`` given) a CUDA run uses the rank's own GPU."""
    if name == 'auto':
        name = 'cuda' if torch.cuda.is_available() else 'cpu'
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DistillError(f"trainer.device={name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise DistillError(f"trainer.device={name} but no CUDA GPU is visible; use trainer.device=cpu")
    if device.type == 'cuda' and local_rank is not None:
        device = torch.device('cuda', local_rank)
    return device


def autocast_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    if precision == 'fp16' and device.type != 'cuda':
        raise DistillError("trainer.precision=fp16 needs a CUDA device (CPU has no fast fp16 path); use "
                           "trainer.precision=bf16 or fp32 on CPU")
    return {'fp32': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}[precision]


def check_model_config(model_cfg: ModelConfig, role: str) -> None:
    if not timm.is_model(model_cfg.name):
        raise DistillError(f"unknown model '{model_cfg.name}' for {role}.name"
                           f"{nearest(model_cfg.name, timm.list_models())}; see `distill models '*'`")
    if model_cfg.checkpoint and not os.path.isfile(os.path.expanduser(model_cfg.checkpoint)):
        raise DistillError(f"{role}.checkpoint not found: {model_cfg.checkpoint}; set "
                           f"{role}.checkpoint=<path to its weights>")


def create_model(model_cfg: ModelConfig, num_classes: int, role: str, transfer: Optional[TransferConfig] = None,
                 notes: Optional[List[str]] = None) -> nn.Module:
    """A timm model for ``num_classes``, with hub weights (``pretrained``) or local weights (``checkpoint``).

    With ``transfer.new_head`` the model gets a fresh classifier (timm ``reset_classifier``, optionally with a
    hidden layer and dropout) and the weights' own classifier is skipped; what was skipped goes to ``notes``."""
    check_model_config(model_cfg, role)
    try:
        model = timm.create_model(model_cfg.name, pretrained=model_cfg.pretrained, num_classes=num_classes,
                                  **model_cfg.kwargs)
    except TypeError as exc:
        raise DistillError(f"{role}.kwargs do not fit {model_cfg.name}: {exc}") from None
    except (OSError, RuntimeError) as exc:
        if not model_cfg.pretrained:
            raise
        raise DistillError(f"could not fetch pretrained weights for {model_cfg.name} ({str(exc)[:120]}); "
                           f"without internet set {role}.pretrained=false {role}.checkpoint=<local file>") from None
    new_head = transfer is not None and transfer.new_head
    if new_head:
        replace_head(model, num_classes, transfer.head_hidden, transfer.head_dropout)
    if model_cfg.checkpoint and new_head:
        skipped = load_backbone_weights(model, os.path.expanduser(model_cfg.checkpoint))
        if notes is not None:
            notes.append(f"{role}: loaded {model_cfg.checkpoint} except its classifier "
                         f"({', '.join(skipped) or 'none in the file'}); new head for {num_classes} classes")
    elif model_cfg.checkpoint:
        load_weights(model, os.path.expanduser(model_cfg.checkpoint))
    return model


def in_memory_format(images: Optional[torch.Tensor], memory_format: Optional[torch.memory_format]):
    """``images`` laid out as the models are (channels_last on CUDA), or as they are."""
    if images is None or memory_format is None:
        return images
    return images.contiguous(memory_format=memory_format)


@torch.no_grad()
def evaluate(model: nn.Module, loader: BatchLoader, device: torch.device, amp_dtype: Optional[torch.dtype] = None,
             context: DistributedContext = DistributedContext(),
             memory_format: Optional[torch.memory_format] = None) -> Dict[str, float]:
    """Top-1 / top-5 accuracy (%) and mean cross-entropy of ``model`` over ``loader`` (under torch.distributed:
    each rank's part of the split, summed over ranks)."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(4, device=device, dtype=torch.float64)  # top-1 hits, top-5 hits, loss sum, count
    for batch in loader:
        images = in_memory_format(batch.images.to(device, non_blocking=True), memory_format)
        labels = batch.labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(images)
        logits = logits.float()
        hits = logits.topk(min(5, logits.shape[1]), dim=1).indices == labels[:, None]
        totals += torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum(),
                               nn.functional.cross_entropy(logits, labels, reduction='sum'),
                               torch.tensor(len(labels), device=device)]).double()
    model.train(was_training)
    correct1, correct5, loss_sum, count = context.all_sum(totals).tolist()
    return {'top1': 100.0 * correct1 / count, 'top5': 100.0 * correct5 / count, 'loss': loss_sum / count}


class FiniteGuard:
    """Watches each step's loss terms on the device and looks at them from the host only every ``every`` steps,
    so steps do not wait for the device; the first non-finite step is remembered with its term values."""

    def __init__(self, every: int, device: torch.device):
        self.every, self.device = every, device
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=device)
        self.values: Optional[torch.Tensor] = None
        self.names: List[str] = []

    def observe(self, out: Dict[str, Any], step: int) -> Optional[Tuple[int, Dict[str, float]]]:
        self.names = ['loss'] + list(out['terms'])
        values = torch.stack([out['loss'].detach().float()] + [v.float() for v in out['terms'].values()])
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


def config_changes(old: Dict[str, Any], new: Dict[str, Any], prefix: str = '') -> List[str]:
    changes = []
    for key in sorted(set(old) | set(new)):
        path, a, b = prefix + key, old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict) and key != 'losses':
            changes += config_changes(a, b, path + '.')
        elif a != b and not path.startswith(RESUMABLE_CHANGES):
            changes.append(f"{path}: {a!r} -> {b!r}")
    return changes


class Trainer:
    def __init__(self, cfg: Config, resume: bool = False, quiet: bool = False):
        self.cfg = cfg
        if cfg.teacher and cfg.teacher.recipe and not (cfg.teacher.checkpoint or cfg.teacher.pretrained):
            raise DistillError(f"the teacher has no weights yet: teacher.recipe {cfg.teacher.recipe} trains it when "
                               f"run through `distill train` (distill.pipeline.run); or set teacher.checkpoint")
        self.run_dir = os.path.join(os.path.expanduser(cfg.trainer.output_dir), cfg.trainer.run_name or 'run')
        self.ckpt_dir = os.path.join(self.run_dir, 'checkpoints')
        self.last_path = os.path.join(self.ckpt_dir, 'last.pt')
        self.best_path = os.path.join(self.ckpt_dir, 'best.pt')
        self.dist = init_distributed(resolve_device(cfg.trainer.device).type)
        self.device = resolve_device(cfg.trainer.device, self.dist.local_rank if self.dist.enabled else None)
        self.amp_dtype = autocast_dtype(cfg.trainer.precision, self.device)
        checkpoint = self._resume_checkpoint() if resume else None
        if not resume and os.path.exists(self.last_path):
            raise DistillError(f"run directory {self.run_dir} already holds a run; add --resume to continue it, "
                               f"or pick another trainer.run_name / trainer.output_dir")

        for role, model_cfg in (('student', cfg.student), ('teacher', cfg.teacher)):
            if model_cfg:  # fail before the (slow) data loading
                check_model_config(model_cfg, role)
        seed_everything(cfg.trainer.seed)
        self.data = build_data(cfg.data, cfg.trainer.seed)
        self.model_notes: List[str] = []
        student = create_model(cfg.student, self.data.num_classes, 'student', cfg.transfer, self.model_notes)
        if cfg.transfer.init_from:
            self._init_student(student, cfg.transfer)
        teacher = create_model(cfg.teacher, self.data.num_classes, 'teacher') if cfg.teacher else None
        self.distiller = Distiller(teacher, student, cfg.losses,
                                   input_size=(3, cfg.data.image_size, cfg.data.image_size),
                                   train_targets=self.data.train.split.labels).to(self.device)
        self.data.train.to(self.device).shard(self.dist.rank, self.dist.world_size)
        self.data.val.to(self.device).shard(self.dist.rank, self.dist.world_size)
        channels_last = cfg.trainer.channels_last if cfg.trainer.channels_last is not None else \
            self.device.type == 'cuda'
        self.memory_format = torch.channels_last if channels_last else None
        if self.memory_format is not None:
            self.distiller.to(memory_format=self.memory_format)
        self.teacher_cache = self._open_teacher_cache() if cfg.teacher_cache.enabled else None
        self.distiller.teacher_cache = self.teacher_cache
        self.freezer = StageFreezer(student, cfg.transfer) if uses_transfer(cfg.transfer) else None
        if self.freezer is not None:
            self.freezer.apply(0)
            self.distiller.freezer = self.freezer
        if self.distiller.needs_strong_view and not cfg.data.in_memory:
            raise DistillError("a loss term needs a RandAugment view of each batch (MLKD), which only the in-memory "
                               "pipeline makes; set data.in_memory=true or drop the term")
        self.data.train.strong_view = self.distiller.needs_strong_view
        self.trainable = self.distiller.trainable_modules()
        # what a training step calls: the Distiller, or DDP around its trainable parts
        self.model = self._wrap_distributed()
        self.compiled = cfg.trainer.compile and self._compile()
        self.compile_unchecked = self.compiled  # the first step of this process shows whether compilation works
        self.optimizer = self._create_optimizer()
        self.updates_per_epoch = len(self.data.train)
        self.scheduler = self._create_scheduler()
        if self.scheduler is None and self.freezer is not None:
            apply_lr_scales(self.optimizer)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.trainer.precision == 'fp16')

        self.start_epoch, self.num_updates, self.history = 0, 0, []
        self.best_top1, self.best_epoch, self.teacher_metrics = -1.0, 0, None
        if self.dist.is_main:
            os.makedirs(self.ckpt_dir, exist_ok=True)
            save_config(cfg, os.path.join(self.run_dir, 'resolved.yaml'))
            self.logger = RunLogger(self.run_dir, cfg.wandb, to_dict(cfg), cfg.trainer.run_name or 'run',
                                    wandb_id=checkpoint.get('wandb_id') if checkpoint else None, quiet=quiet)
        else:
            self.logger = NullLogger()
        if checkpoint is not None:
            self._restore(checkpoint)
        else:  # a fresh start in a directory whose first epoch never finished
            self.logger.rewrite_history([])

    # --- setup -----------------------------------------------------------------------------------------
    def _resume_checkpoint(self) -> Dict[str, Any]:
        if not os.path.isfile(self.last_path):
            raise DistillError(f"nothing to resume: {self.last_path} does not exist (no epoch finished); start "
                               f"the run again without --resume")
        checkpoint = load_checkpoint(self.last_path)
        changes = config_changes(checkpoint['config'], to_dict(self.cfg))
        if changes:
            raise DistillError(f"cannot resume {self.run_dir}: the config differs from the run's ({'; '.join(changes[:3])}); "
                               f"resume with {self.run_dir}/resolved.yaml or start a new trainer.run_name")
        return checkpoint

    def _init_student(self, student: nn.Module, transfer: TransferConfig) -> None:
        path = os.path.expanduser(transfer.init_from)
        if not os.path.isfile(path):
            raise DistillError(f"transfer.init_from not found: {transfer.init_from}; point it at the weights to "
                               f"initialise the student from (e.g. the teacher's student_best.safetensors)")
        report = transfer_parameters(student, load_state_dict_file(path), transfer.init_map)
        count = sum(student.state_dict()[name].numel() for name in report['copied'])
        self.model_notes.append(
            f"student initialised from {transfer.init_from}: copied {len(report['copied'])} tensors ({count:,} "
            f"values), resized {len(report['resized'])} {report['resized'][:3]}, not copied "
            f"{len(report['not_copied'])} {report['not_copied'][:5]}{' ...' if len(report['not_copied']) > 5 else ''}")
        if not report['copied'] and not report['resized']:
            raise DistillError(f"transfer.init_from {transfer.init_from}: no tensor fits {self.cfg.student.name} "
                               f"(names or shapes differ everywhere); map prefixes with transfer.init_map")

    def _open_teacher_cache(self) -> TeacherCache:
        """The logits table for this teacher, training split, augmentation, normalisation and precision."""
        blocker = self.distiller.teacher_cache_blocker()
        if not blocker and self.data.train.num_views == 0:
            blocker = f"data.augment={self.cfg.data.augment} on streamed images has no finite set of views"
        if blocker:
            raise DistillError(f"teacher_cache.enabled=true cannot be exact here: {blocker}; set "
                               f"teacher_cache.enabled=false")
        cfg, loader = self.cfg, self.data.train
        settings = {'teacher': cfg.teacher.name, 'augment': cfg.data.augment, 'padding': loader.padding,
                    'mean': loader.mean.flatten().tolist(), 'std': loader.std.flatten().tolist(),
                    'precision': cfg.trainer.precision, 'dtype': cfg.teacher_cache.dtype,
                    'channels_last': self.memory_format is not None, 'version': 1}
        key = cache_key(self.distiller.teacher, loader.split.images, loader.split.labels, settings)
        root = os.path.expanduser(cfg.teacher_cache.dir or os.path.join(cache_dir(), 'teacher_logits'))
        cache = TeacherCache(os.path.join(root, key), len(loader.split), loader.num_views, self.data.num_classes,
                             cfg.teacher_cache.dtype, self.device,
                             meta={**settings, 'data': cfg.data.name, 'root': cfg.data.root,
                                   'teacher_checkpoint': cfg.teacher.checkpoint})
        self.model_notes.append(f"teacher cache {cache.folder}: {len(loader.split)} images x {loader.num_views} "
                                f"views, {100 * cache.fill_ratio:.1f}% filled")
        return cache

    def _wrap_distributed(self) -> nn.Module:
        """DDP around the student and the loss terms' modules only (never the frozen teacher)."""
        if not self.dist.enabled:
            return self.distiller
        local = [name for name, term in self.distiller.loss_terms.items() if not term.distributed]
        if local:
            raise DistillError(f"loss terms {local} keep per-sample state that torch.distributed ranks would not "
                               f"share; train them in one process (without torchrun)")
        from torch.nn.parallel import DistributedDataParallel
        return DistributedDataParallel(TrainableParts(self.distiller),
                                       device_ids=[self.device.index] if self.device.type == 'cuda' else None)

    def _compile(self) -> bool:
        """``torch.compile`` the student and teacher in place (state_dict keys unchanged); a failure shows at
        the first step, which then falls back to eager (see ``_update``)."""
        for model in (self.distiller.student, self.distiller.teacher):
            if model is not None:
                model.compile()
        return True

    def _uncompile(self, exc: Exception) -> None:
        for model in (self.distiller.student, self.distiller.teacher):
            if model is not None:
                model._compiled_call_impl = None
        self.compiled = False
        self.logger.info(f"torch.compile failed ({type(exc).__name__}: {str(exc).splitlines()[0][:160]}); "
                         f"training eagerly")

    def _create_optimizer(self) -> torch.optim.Optimizer:
        opt = self.cfg.optimizer
        params = self.trainable if self.freezer is None else \
            param_groups(self.distiller.student, [self.distiller.loss_terms], opt, self.cfg.transfer)
        kwargs = dict(opt.kwargs)
        fused = opt.fused if opt.fused is not None else \
            self.device.type == 'cuda' and opt.name.lower() in FUSED_OPTIMIZERS
        if fused:
            kwargs['fused'] = True
        try:
            return create_optimizer_v2(params, opt=opt.name, lr=opt.lr, weight_decay=opt.weight_decay,
                                       momentum=opt.momentum, filter_bias_and_bn=opt.filter_bias_and_bn,
                                       **kwargs)
        except (ValueError, TypeError) as exc:
            if opt.name not in list_optimizers():
                raise DistillError(f"unknown optimizer.name '{opt.name}'{nearest(opt.name, list_optimizers())}; "
                                   f"see timm.optim.list_optimizers()") from None
            raise DistillError(f"bad optimizer settings for '{opt.name}': {exc}") from None

    def _create_scheduler(self):
        sched = self.cfg.scheduler
        if sched.name not in SCHEDULERS:
            raise DistillError(f"unknown scheduler.name '{sched.name}'{nearest(sched.name, SCHEDULERS)}; "
                               f"choose one of {list(SCHEDULERS)}")
        # Our milestones mean "decay once this many epochs are done" (torch MultiStepLR and RepDistiller's
        # `epoch > 150`); timm's multistep applies milestone m one epoch earlier, at 0-based epoch m - 1.
        scheduler, _ = create_scheduler_v2(
            self.optimizer, sched=sched.name, num_epochs=self.cfg.trainer.epochs,
            decay_milestones=[m + 1 for m in sched.milestones], decay_epochs=sched.milestones[0] if sched.milestones else None,
            decay_rate=sched.decay_rate, warmup_epochs=sched.warmup_epochs, warmup_lr=sched.warmup_lr,
            min_lr=sched.min_lr, step_on_epochs=sched.step_on_epochs, updates_per_epoch=self.updates_per_epoch)
        return scheduler

    def _state(self, epoch: int) -> Dict[str, Any]:
        return {
            'model': self.distiller.student.state_dict(),
            'loss_terms': self.distiller.loss_terms.state_dict(),
            'optimizer': self.optimizer.state_dict(),
            'scheduler': self.scheduler.state_dict() if self.scheduler else None,
            'scaler': self.scaler.state_dict(),
            'epoch': epoch, 'num_updates': self.num_updates,
            'best_top1': self.best_top1, 'best_epoch': self.best_epoch, 'history': self.history,
            'teacher_metrics': self.teacher_metrics,
            'rng': rng_state(), 'data_generator': self.data.train.generator.get_state(),
            'normalization': {'mean': self.data.train.mean.flatten().cpu(), 'std': self.data.train.std.flatten().cpu()},
            'config': to_dict(self.cfg), 'wandb_id': self.logger.wandb_id,
        }

    def _restore(self, checkpoint: Dict[str, Any]) -> None:
        self.distiller.student.load_state_dict(checkpoint['model'])
        self.distiller.loss_terms.load_state_dict(checkpoint['loss_terms'])
        self.optimizer.load_state_dict(checkpoint['optimizer'])
        if self.scheduler and checkpoint['scheduler']:
            self.scheduler.load_state_dict(checkpoint['scheduler'])
        self.scaler.load_state_dict(checkpoint['scaler'])
        self.start_epoch, self.num_updates = checkpoint['epoch'], checkpoint['num_updates']
        self.best_top1, self.best_epoch = checkpoint['best_top1'], checkpoint['best_epoch']
        self.history, self.teacher_metrics = list(checkpoint['history']), checkpoint['teacher_metrics']
        set_rng_state(checkpoint['rng'])
        self.data.train.generator.set_state(checkpoint['data_generator'])
        self.logger.rewrite_history(self.history)
        self.logger.info(f"resumed {self.run_dir} after epoch {self.start_epoch}")

    # --- training --------------------------------------------------------------------------------------
    def _stop_if_nonfinite(self, found: Optional[Tuple[int, Dict[str, float]]], epoch: int) -> None:
        if found is None:
            return
        step, values = found
        loss = values.pop('loss')
        bad = [name for name, value in values.items() if not math.isfinite(value)]
        terms = ', '.join(f"{name}={value:.4g}" for name, value in values.items())
        kept = f"last good checkpoint {self.last_path} is kept" if os.path.exists(self.last_path) else \
            "no checkpoint was written yet"
        raise DistillError(f"loss became {loss} at epoch {epoch + 1}, step {step + 1} (loss term "
                           f"{', '.join(repr(b) for b in bad) or '?'}; {terms}); training stopped and {kept}; "
                           f"lower optimizer.lr, check the data, or use trainer.precision=fp32")

    def _forward(self, forward, inputs) -> Dict[str, Any]:
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None):
            return forward(*inputs)

    def _update(self, forward, optimizer, scaler, parameters, inputs, loss_scale: float = 1.0,
                reduce_grads: bool = False) -> Dict[str, Any]:
        """One optimisation step: forward under autocast, scaled backward, clip, step. ``loss_scale`` weights a
        rank's part of a global batch; ``reduce_grads`` averages gradients over ranks where DDP does not."""
        try:
            out = self._forward(forward, inputs)
        except Exception as exc:  # noqa: BLE001 (a compiler failure at the first step: fall back, never lose the run)
            if not self.compile_unchecked or isinstance(exc, DistillError):
                raise
            self._uncompile(exc)
            out = self._forward(forward, inputs)
        finally:
            self.compile_unchecked = False
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(out['loss'] * loss_scale if loss_scale != 1.0 else out['loss']).backward()
        if reduce_grads and self.dist.enabled:
            for p in parameters:
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad)
                    p.grad.div_(self.dist.world_size)
        if self.cfg.trainer.grad_clip:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(parameters, self.cfg.trainer.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        return out

    def run_pre_stage(self) -> None:
        """RepDistiller's ``init`` stage (FSP, FT, AB): before epoch 1, train each such term's pre-stage modules
        (in train mode, everything else in eval mode) on its pre-stage loss with SGD at the recipe's momentum and
        weight decay, for the term's ``pre_stage_epochs``. A run killed here restarts from scratch."""
        distiller, opt = self.distiller, self.cfg.optimizer
        epochs = max((term.pre_stage_epochs for term in distiller.loss_terms.values()), default=0)
        if epochs == 0:
            return
        groups, trained, seen = [], [], set()
        for name in distiller.pre_stage_terms(0):
            term = distiller.loss_terms[name]
            modules = list(term.pre_stage_modules(distiller.student))
            params = [p for m in modules for p in m.parameters() if id(p) not in seen]
            seen.update(id(p) for p in params)
            groups.append({'params': params, 'lr': term.pre_stage_lr or opt.lr})
            trained += modules
        frozen = [p for group in groups for p in group['params'] if not p.requires_grad]
        for p in frozen:  # e.g. FT's paraphraser: trained here, fixed in the main stage
            p.requires_grad_(True)
        optimizer = torch.optim.SGD(groups, lr=opt.lr, momentum=opt.momentum, weight_decay=opt.weight_decay)
        scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        params = [p for group in groups for p in group['params']]
        for epoch in range(epochs):
            distiller.eval()
            for module in trained:
                module.train()
            guard = FiniteGuard(1, self.device)
            totals = torch.zeros(2, device=self.device)  # loss sum, count
            for step, batch in enumerate(self.data.train):
                out = self._update(distiller.pre_stage_forward, optimizer, scaler, params,
                                   (self._images(batch.images), batch.labels, batch.indices, epoch),
                                   batch.loss_scale, reduce_grads=True)
                self._stop_if_nonfinite(guard.observe(out, step), epoch)
                totals += torch.stack([out['loss'].detach().float() * len(batch.labels),
                                       torch.tensor(float(len(batch.labels)), device=self.device)])
            total, count = self.dist.all_sum(totals).tolist()
            self.logger.info(f"pre-stage epoch {epoch + 1}/{epochs} ({', '.join(distiller.pre_stage_terms(epoch))}) "
                             f"loss {total / count:.4f}")
        for p in frozen:
            p.requires_grad_(False)

    def _images(self, images: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return in_memory_format(images, self.memory_format)

    def train_one_epoch(self, epoch: int) -> Dict[str, float]:
        """One pass over the training split. Nothing in a step waits for the device: metrics add up on it and
        the host looks at the loss only every ``check_finite_every`` steps."""
        self.distiller.train()
        device, parameters = self.device, list(self.trainable.parameters())
        every = self.cfg.trainer.check_finite_every or (1 if device.type == 'cpu' else 50)
        guard = FiniteGuard(every, device)
        sums: Optional[torch.Tensor] = None  # loss, each term, top-1 hits, count (summed over samples)
        show = self.cfg.trainer.progress and sys.stderr.isatty() and self.dist.is_main
        bar = tqdm(self.data.train, desc=f"epoch {epoch + 1}/{self.cfg.trainer.epochs}", disable=not show,
                   leave=False, dynamic_ncols=True)
        for step, batch in enumerate(bar):
            out = self._update(self.model, self.optimizer, self.scaler, parameters,
                               (self._images(batch.images), batch.labels, batch.indices, epoch,
                                self._images(batch.strong), batch.views), batch.loss_scale)
            self._stop_if_nonfinite(guard.observe(out, step), epoch)
            self.num_updates += 1
            if self.scheduler:
                self.scheduler.step_update(num_updates=self.num_updates)
            size = len(batch.labels)
            values = torch.stack([out['loss'].detach().float()] + [v.float() for v in out['terms'].values()])
            step_sums = torch.cat([values * size, torch.stack([
                (out['logits'].detach().argmax(1) == batch.labels).sum().float(),
                torch.tensor(float(size), device=device)])])
            sums = step_sums if sums is None else sums + step_sums
            if show and step % 20 == 0:
                bar.set_postfix(loss=f"{out['loss'].item():.3f}")
        self._stop_if_nonfinite(guard.check(), epoch)
        totals = self.dist.all_sum(sums).tolist()
        count = totals[-1]
        names = ['loss'] + list(self.distiller.main_terms)
        metrics = {f"train_{name}": value / count for name, value in zip(names, totals)}
        metrics['train_top1'] = 100.0 * totals[-2] / count
        if self.teacher_cache is not None:
            self.teacher_cache.flush()
            metrics['teacher_cache_filled'] = self.teacher_cache.fill_ratio
        return metrics

    def fit(self) -> Dict[str, Any]:
        cfg, logger = self.cfg, self.logger
        completed = False
        try:
            if self.teacher_metrics is None and self.distiller.teacher is not None:
                self.teacher_metrics = self._evaluate(self.distiller.teacher)
                logger.info(f"teacher {cfg.teacher.name}: val top-1 {self.teacher_metrics['top1']:.2f}")
            self._describe()
            if self.start_epoch == 0:
                self.run_pre_stage()
            for epoch in range(self.start_epoch, cfg.trainer.epochs):
                started = time.perf_counter()
                if self.freezer is not None:
                    self.freezer.apply(epoch)
                    if epoch > 0 and self.freezer.frozen_groups(epoch) != self.freezer.frozen_groups(epoch - 1):
                        logger.info(f"epoch {epoch + 1}: unfrozen down to {self.freezer.frozen_groups(epoch)} "
                                    f"frozen layer groups")
                group = self.optimizer.param_groups[0]  # the recipe's lr: groups may carry a transfer lr_scale
                lr = group['lr'] / group.get('lr_scale', 1.0)
                record: Dict[str, Any] = {'epoch': epoch + 1, 'lr': lr, **self.train_one_epoch(epoch)}
                evaluated = (epoch + 1) % cfg.trainer.eval_every == 0 or epoch + 1 == cfg.trainer.epochs
                if evaluated:
                    val = self._evaluate(self.distiller.student)
                    record.update(val_top1=val['top1'], val_top5=val['top5'], val_loss=val['loss'])
                record['epoch_time'] = time.perf_counter() - started
                if self.scheduler:
                    self.scheduler.step(epoch + 1)
                improved = evaluated and record['val_top1'] > self.best_top1
                if improved:
                    self.best_top1, self.best_epoch = record['val_top1'], epoch + 1
                self.history.append(record)
                if self.dist.is_main:
                    state = self._state(epoch + 1)
                    atomic_save(state, self.last_path)
                    if improved:
                        atomic_save(state, self.best_path)
                self.dist.barrier()  # every rank sees the checkpoint before going on
                logger.log_epoch(record)
                val_text = f" val top-1 {record['val_top1']:.2f} top-5 {record['val_top5']:.2f}" if evaluated else ''
                logger.info(f"epoch {epoch + 1}/{cfg.trainer.epochs} lr {lr:.4g} loss {record['train_loss']:.4f} "
                            f"train {record['train_top1']:.2f}{val_text} ({record['epoch_time']:.1f}s)")
            summary = self._summary()
            if self.dist.is_main:
                self._export()
            completed = True
            logger.info(f"done: best top-1 {summary['best_top1']:.2f} (epoch {summary['best_epoch']}), last "
                        f"{summary['last_top1']:.2f}; run directory {self.run_dir}")
            return summary
        finally:
            logger.finish(self._summary() if completed else None)

    def _evaluate(self, model: nn.Module) -> Dict[str, float]:
        return evaluate(model, self.data.val, self.device, self.amp_dtype, self.dist, self.memory_format)

    def _describe(self) -> None:
        count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
        teacher = (f"teacher {self.cfg.teacher.name} ({count(self.distiller.teacher):,} params, frozen) -> "
                   if self.distiller.teacher is not None else "")
        self.logger.info(f"{teacher}student {self.cfg.student.name} ({count(self.distiller.student):,} params); "
                         f"losses {self.distiller.loss_weights}; {len(self.data.train.split)} train / "
                         f"{len(self.data.val.split)} val images, {self.data.num_classes} classes; device "
                         f"{self.device}{f' x {self.dist.world_size} processes' if self.dist.enabled else ''}, "
                         f"{self.cfg.trainer.precision}{', channels_last' if self.memory_format else ''}"
                         f"{', compiled' if self.compiled else ''}")
        for note in self.model_notes:
            self.logger.info(note)
        if self.freezer is not None:
            transfer = self.cfg.transfer
            self.logger.info(f"transfer: freeze {transfer.freeze} (frozen_stages {transfer.frozen_stages}, unfreeze "
                             f"every {transfer.unfreeze_every or 'never'}), backbone lr x{transfer.backbone_lr_scale}"
                             f", layer decay {transfer.layer_decay}; parameters at epoch {self.start_epoch + 1}:")
            self.freezer.apply(self.start_epoch)
            for line in self.freezer.describe():
                self.logger.info(f"  {line}")

    def _summary(self) -> Dict[str, Any]:
        last = self.history[-1] if self.history else {}
        return {
            'student': self.cfg.student.name, 'teacher': self.cfg.teacher.name if self.cfg.teacher else None,
            'losses': self.cfg.losses, 'seed': self.cfg.trainer.seed, 'epochs': len(self.history),
            'best_top1': self.best_top1, 'best_epoch': self.best_epoch,
            'last_top1': last.get('val_top1', math.nan), 'last_top5': last.get('val_top5', math.nan),
            'teacher_top1': self.teacher_metrics['top1'] if self.teacher_metrics else None,
            'train_time_s': sum(r['epoch_time'] for r in self.history),
        }

    def _export(self) -> None:
        """Final and best student weights as safetensors (no optimizer, no adapters: the deployable model)."""
        from safetensors.torch import save_file
        for name, path in (('student_last', self.last_path), ('student_best', self.best_path)):
            state = load_checkpoint(path)['model']
            target = os.path.join(self.run_dir, f'{name}.safetensors')
            save_file({k: v.contiguous() for k, v in state.items()}, target + '.tmp')
            os.replace(target + '.tmp', target)
