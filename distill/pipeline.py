"""Two-stage recipes: fine-tune the teacher on the recipe's data, then distill from it (``teacher_finetune``).

Stage 1 is the recipe with the teacher as the model being trained (cross-entropy, the section's transfer
settings, epochs and lr) in ``<run_name>-teacher``; stage 2 is the recipe itself with ``teacher.checkpoint`` set to
stage 1's ``student_best.safetensors``. A finished stage 1 is reused (if its config still matches), an interrupted
one resumes, and ``--resume`` applies to stage 2.
"""
import copy
import json
import os
from typing import Any, Dict, Tuple

from .config import Config, ModelConfig, from_dict, load_config, to_dict
from .errors import DistillError
from .trainer import Trainer, config_changes


def stage_configs(cfg: Config) -> Tuple[Config, Config]:
    """(teacher fine-tuning config, distillation config) of a recipe with ``teacher_finetune``."""
    finetune = cfg.teacher_finetune
    base = to_dict(cfg)
    base['teacher_finetune'] = None
    stage1: Dict[str, Any] = copy.deepcopy(base)
    stage1.update(student=to_dict(cfg)['teacher'], teacher=None, losses={'ce': 1.0},
                  transfer=to_dict(cfg)['teacher_finetune']['transfer'])
    stage1['trainer'].update(epochs=finetune.epochs, run_name=f"{cfg.trainer.run_name or 'run'}-teacher")
    if finetune.lr is not None:
        stage1['optimizer']['lr'] = finetune.lr
    first = from_dict(stage1)
    stage2 = copy.deepcopy(base)
    stage2['teacher'] = to_dict(ModelConfig(name=cfg.teacher.name, kwargs=cfg.teacher.kwargs,
                                            checkpoint=os.path.join(_run_dir(first), 'student_best.safetensors')))
    return first, from_dict(stage2)


def _run_dir(cfg: Config) -> str:
    return os.path.join(cfg.trainer.output_dir, cfg.trainer.run_name)


def run(cfg: Config, resume: bool = False, quiet: bool = False) -> Dict[str, Any]:
    """Train ``cfg``; with ``teacher_finetune``, fine-tune its teacher first (or reuse that stage's result)."""
    if cfg.teacher_finetune is None:
        return Trainer(cfg, resume=resume, quiet=quiet).fit()
    first, second = stage_configs(cfg)
    run_dir = _run_dir(first)
    summary = os.path.join(run_dir, 'summary.json')
    finished = os.path.isfile(summary) and json.load(open(summary)).get('epochs', 0) >= first.trainer.epochs
    if finished:
        changes = config_changes(to_dict(load_config(os.path.join(run_dir, 'resolved.yaml'))), to_dict(first))
        if changes:
            raise DistillError(f"{run_dir} holds a finished teacher fine-tuning with another config "
                               f"({'; '.join(changes[:3])}); delete it or change trainer.run_name")
        if not quiet:
            print(f"teacher fine-tuning already done: {run_dir}")
    else:  # a first run, or one interrupted (or asked for more epochs): resume where it stopped
        Trainer(first, resume=os.path.isfile(os.path.join(run_dir, 'checkpoints', 'last.pt')), quiet=quiet).fit()
    return Trainer(second, resume=resume, quiet=quiet).fit()
