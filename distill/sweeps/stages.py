"""Two-stage recipes: the teacher is trained first, then distilled from.

- ``teacher_finetune``: stage 1 is the recipe with the teacher as the model being trained (cross-entropy, the
  section's transfer settings, epochs and lr) in ``<run_name>-teacher``;
- ``teacher.recipe`` without ``teacher.checkpoint``: stage 1 is that recipe (e.g. the pair's ``teacher.yaml``).

Stage 2 is the recipe itself with ``teacher.checkpoint`` set to stage 1's ``student_best.safetensors``. A finished
stage 1 is reused (if its config still matches), an interrupted one resumes, and ``--resume`` applies to stage 2.
Stage 1 runs under a file lock, so the parallel runs of a grid that share a teacher train it once.
"""
import contextlib
import copy
import fcntl
import os
from typing import Any, Dict, Iterator, Optional, Sequence, Tuple

from ..config import Config, ModelConfig, from_dict, load_config, to_dict
from ..config.checks import check_teacher_weights
from ..errors import DistillError
from ..models.pretrained import resolve_image_size
from ..runs.directory import FINISHED, INTERRUPTED, RunDir
from ..training.distributed import shutdown_distributed
from ..training.trainer import Trainer


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
                                            checkpoint=RunDir.of(first).student_weights('best')))
    return first, from_dict(stage2)


@contextlib.contextmanager
def _locked(run_dir: str) -> Iterator[None]:
    """Hold an exclusive lock beside ``run_dir`` (other processes wait here)."""
    os.makedirs(os.path.dirname(os.path.abspath(run_dir)), exist_ok=True)
    with open(os.path.abspath(run_dir) + '.lock', 'w') as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_trained(cfg: Config, what: str, quiet: bool = False) -> str:
    """Train ``cfg`` unless a finished run with the same config exists (an interrupted one resumes); returns its
    ``student_best.safetensors``."""
    run_dir = RunDir.of(cfg)
    with _locked(run_dir.path):
        state = run_dir.state(cfg.trainer.epochs)
        if state == FINISHED:
            run_dir.check_reusable(resolve_image_size(cfg), what)
            if not quiet:
                print(f"{what} already done: {run_dir.path}")
        else:  # a first run, or one interrupted (or asked for more epochs): resume where it stopped
            Trainer(cfg, resume=state == INTERRUPTED, quiet=quiet).fit()
    return run_dir.student_weights('best')


def train(recipe: str, overrides: Sequence[str] = (), pair: Optional[str] = None, method: Optional[str] = None,
          resume: bool = False, quiet: bool = False) -> None:
    """``distill train``: the recipe file with ``key=value`` overrides (a pairs recipe: the pair and method picked)."""
    try:
        run(load_config(recipe, overrides, pair, method), resume=resume, quiet=quiet)
    finally:  # under torchrun: leave the process group cleanly
        shutdown_distributed()


def run(cfg: Config, resume: bool = False, quiet: bool = False) -> Dict[str, Any]:
    """Train ``cfg``, after training its teacher where the recipe says so (or reusing that stage's result)."""
    check_teacher_weights(cfg)
    if cfg.teacher_finetune is not None:
        first, second = stage_configs(resolve_image_size(cfg))  # both stages at the student's input size
        ensure_trained(first, 'teacher fine-tuning', quiet)
        return Trainer(second, resume=resume, quiet=quiet).fit()
    teacher = cfg.teacher
    if teacher is not None and teacher.recipe and not teacher.checkpoint and not teacher.pretrained:
        if not os.path.isfile(teacher.recipe):
            raise DistillError(f"teacher.recipe not found: {teacher.recipe}; point it at the recipe that trains "
                               f"the teacher, or give teacher.checkpoint=<weights>")
        teacher_cfg = load_config(teacher.recipe)
        if teacher_cfg.student.name != teacher.name:
            raise DistillError(f"teacher.recipe {teacher.recipe} trains {teacher_cfg.student.name}, not the "
                               f"teacher {teacher.name}; fix teacher.name or teacher.recipe")
        cfg = copy.deepcopy(cfg)
        cfg.teacher.checkpoint = ensure_trained(teacher_cfg, f'teacher training ({teacher.recipe})', quiet)
    return Trainer(cfg, resume=resume, quiet=quiet).fit()
