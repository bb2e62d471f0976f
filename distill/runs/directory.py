"""A run directory: its layout, its state (new / interrupted / finished), whether a config may resume it or reuse
it, and the exported student weights. The one place that knows these paths (grid, stages, demo, trainer and
logger ask here).

    <output_dir>/<run_name>/
        resolved.yaml              the full resolved config
        checkpoints/last.pt        every epoch (resume from here)
        checkpoints/best.pt        the best validated epoch
        metrics.jsonl, log.txt     one line per epoch; the log
        summary.json               written last: the run finished
        trainer.lock               held (flock) by the one trainer writing the run
        student_{last,best}.safetensors   the deployable student
        student/                   the best student as a timm model folder (config.json, model.safetensors)
"""
import fcntl
import json
import os
import socket
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn

from ..config import Config, from_dict, to_dict
from ..errors import DistillError
from ..files import atomic_write, check_folder_writable, load_yaml_mapping
from .checkpoint import deployed_weights, load_checkpoint

# Settings that may change between a run and its resumption without changing what is computed (the run's name
# and folder say where it is, not what it computes: a moved or renamed run resumes; so does teacher.recipe, the
# file that trained the teacher, whose weights file teacher.checkpoint is compared).
RESUMABLE_CHANGES = ('trainer.epochs', 'trainer.progress', 'trainer.device', 'trainer.eval_every',
                     'trainer.check_finite_every', 'trainer.checkpoint_every', 'data.eval_batch_size', 'wandb.',
                     'teacher_cache.dir', 'trainer.run_name', 'trainer.output_dir', 'teacher.recipe')
NEW, INTERRUPTED, FINISHED = 'new', 'interrupted', 'finished'


def config_changes(old: Dict[str, Any], new: Dict[str, Any], prefix: str = '') -> List[str]:
    """``'key: old -> new'`` for every setting that differs and changes what a run computes."""
    changes = []
    for key in sorted(set(old) | set(new)):
        path, a, b = prefix + key, old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict) and key != 'losses':
            changes += config_changes(a, b, path + '.')
        elif a != b and not path.startswith(RESUMABLE_CHANGES):
            changes.append(f"{path}: {a!r} -> {b!r}")
    return changes


def with_defaults(config: Dict[str, Any]) -> Dict[str, Any]:
    """An earlier run's config with the settings added to distill since filled in with their defaults (the run
    computed what the default computes), so a new setting never blocks resuming or reusing an older run."""
    try:
        return to_dict(from_dict(config, validate=False))
    except DistillError:  # a section that no longer parses: compare as it is
        return config


class RunLock:
    """The run directory's one writer: an exclusive ``flock`` on ``trainer.lock``, taken before the trainer writes
    anything else and released by the kernel when its process ends, however it ends (no stale lock after a kill).
    The file names the holder, for the refusal a second trainer gets."""

    def __init__(self, path: str):
        self.handle = open(path, 'a+')
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held: by another live trainer
            self.handle.seek(0)
            holder = self.handle.read().strip() or 'another process'
            self.handle.close()
            folder = os.path.dirname(path)
            raise DistillError(f"run directory {folder} is being written by a running trainer ({holder}); wait for "
                               f"it to end, stop it (kill -TERM: it checkpoints, then resume), or pick another "
                               f"trainer.run_name") from None
        self.handle.seek(0)
        self.handle.truncate()
        self.handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        self.handle.flush()

    def release(self) -> None:
        if not self.handle.closed:
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()


class RunDir:
    def __init__(self, output_dir: str, run_name: Optional[str]):
        self.path = os.path.join(os.path.expanduser(output_dir), run_name or 'run')
        self.checkpoints = os.path.join(self.path, 'checkpoints')
        self.last = os.path.join(self.checkpoints, 'last.pt')
        self.best = os.path.join(self.checkpoints, 'best.pt')
        self.resolved = os.path.join(self.path, 'resolved.yaml')
        self.summary = os.path.join(self.path, 'summary.json')
        self.metrics = os.path.join(self.path, 'metrics.jsonl')
        self.log = os.path.join(self.path, 'log.txt')

    @classmethod
    def of(cls, cfg: Config) -> 'RunDir':
        return cls(cfg.trainer.output_dir, cfg.trainer.run_name)

    def lock(self) -> RunLock:
        """Hold the run for this process (``RunLock``); a run another live trainer holds is refused in one line."""
        os.makedirs(self.path, exist_ok=True)
        return RunLock(os.path.join(self.path, 'trainer.lock'))

    @property
    def student_folder(self) -> str:
        return os.path.join(self.path, 'student')

    def student_weights(self, which: str = 'best') -> str:
        return os.path.join(self.path, f'student_{which}.safetensors')

    def state(self, epochs: int) -> str:
        """FINISHED (its summary reports ``epochs`` epochs or more), INTERRUPTED (a checkpoint to resume) or
        NEW."""
        if os.path.isfile(self.summary):
            with open(self.summary) as f:
                if json.load(f).get('epochs', 0) >= epochs:
                    return FINISHED
        return INTERRUPTED if os.path.isfile(self.last) else NEW

    def check_reusable(self, cfg: Config, what: str) -> None:
        """A finished run is reused only for the config it ran (resumable settings aside)."""
        changes = config_changes(with_defaults(load_yaml_mapping(self.resolved, 'resolved config')), to_dict(cfg))
        if changes:
            raise DistillError(f"{self.path} holds a finished {what} with another config "
                               f"({'; '.join(changes[:3])}); delete it or change trainer.run_name / output_dir")

    def resume_checkpoint(self, cfg: Config) -> Dict[str, Any]:
        """``last.pt``, after checking ``cfg`` computes what the run computed."""
        if not os.path.isfile(self.last):
            raise DistillError(f"nothing to resume: {self.last} does not exist (no epoch finished); start the run "
                               f"again without --resume")
        checkpoint = load_checkpoint(self.last)
        self.check_resumable(checkpoint, cfg)
        return checkpoint

    def check_resumable(self, checkpoint: Dict[str, Any], cfg: Config) -> None:
        changes = config_changes(with_defaults(checkpoint['config']), to_dict(cfg))
        if changes:
            raise DistillError(f"cannot resume {self.path}: the config differs from the run's "
                               f"({'; '.join(changes[:3])}); resume with {self.resolved} or start a new "
                               f"trainer.run_name")

    def check_writable(self) -> None:
        """Fail in one line, creating nothing, when the run directory cannot be created or written."""
        check_folder_writable(self.path, 'run directory', 'set trainer.output_dir to a writable folder')

    def remove_temporaries(self) -> None:
        """Delete the ``*.tmp`` files a kill during an atomic write leaves behind (never the files themselves)."""
        for folder in (self.path, self.checkpoints):
            for name in os.listdir(folder) if os.path.isdir(folder) else ():
                if name.endswith('.tmp'):
                    os.unlink(os.path.join(folder, name))

    def export(self, student: nn.Module, data_config: Dict[str, Any], summary: Dict[str, Any]) -> None:
        """Final and best student weights as safetensors (no optimizer, no adapters: the deployable model, the EMA
        where one was kept), and the best as a timm model folder ``student/`` (``export``); ``student`` keeps its
        own weights."""
        from safetensors.torch import save
        from .export import model_card, write_timm_folder
        states = {which: deployed_weights(load_checkpoint(checkpoint))
                  for which, checkpoint in (('last', self.last), ('best', self.best))}
        for which, state in states.items():
            payload = save({k: v.contiguous() for k, v in state.items()})
            atomic_write(self.student_weights(which), lambda f: f.write(payload))
        own = {k: v.detach().clone() for k, v in student.state_dict().items()}
        channels_last = any(p.dim() == 4 and not p.is_contiguous() for p in student.parameters())
        student.load_state_dict(states['best'])
        student.to(memory_format=torch.contiguous_format)  # safetensors stores contiguous tensors only
        try:
            card = model_card(summary, open(self.resolved).read())
            write_timm_folder(student, self.student_folder, data_config, card)
        finally:
            student.load_state_dict(own)
            if channels_last:
                student.to(memory_format=torch.channels_last)
