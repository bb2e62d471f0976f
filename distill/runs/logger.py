"""Where a run's numbers go: stdout + ``log.txt``, ``metrics.jsonl`` (one line per epoch), ``summary.json``,
Weights & Biases through the real ``wandb`` library (``online``, ``offline`` or ``disabled``) and TensorBoard event
files (``logging.tensorboard``) through ``torch.utils.tensorboard``."""
import json
import os
import tempfile
from typing import Any, Dict, List, Optional

from ..config import Config, WandbConfig, to_dict
from ..errors import DistillError
from ..files import atomic_write_json, atomic_write_text, space_errors
from .directory import RunDir


def _import_wandb():
    try:
        import wandb
    except ImportError:
        raise DistillError("wandb.mode is set but the wandb package is missing; pip install wandb or set "
                           "wandb.mode=disabled") from None
    return wandb


def _reason(exc: Exception) -> str:
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:160]}"


def _unreachable(exc: Exception) -> str:
    return (f"W&B is unreachable ({_reason(exc)}) and wandb.strict=true; check the network and `wandb login`, or "
            f"set wandb.strict=false to log offline and upload later with `wandb sync`")


def check_wandb_reachable(wandb_cfg: WandbConfig) -> None:
    """``wandb.strict`` online logging: the W&B server accepts the API key within ``wandb.init_timeout`` seconds,
    checked before the run writes anything (wandb's own service files go to a scratch folder); else one line."""
    if wandb_cfg.mode != 'online' or not wandb_cfg.strict:
        return
    wandb = _import_wandb()
    previous = os.environ.get('WANDB_DIR')
    with tempfile.TemporaryDirectory() as scratch:
        os.environ['WANDB_DIR'] = scratch
        try:
            wandb.Api(timeout=max(1, int(wandb_cfg.init_timeout))).viewer
        except Exception as exc:  # noqa: BLE001 (UsageError without a key, AuthenticationError, timeouts, ...)
            raise DistillError(_unreachable(exc)) from None
        finally:
            if previous is None:
                del os.environ['WANDB_DIR']
            else:
                os.environ['WANDB_DIR'] = previous


class RunLogger:
    def __init__(self, run_dir: RunDir, cfg: Config, wandb_id: Optional[str] = None, quiet: bool = False):
        self.run_dir, self.quiet = run_dir, quiet
        self.metrics_path = run_dir.metrics
        self.log_file = open(run_dir.log, 'a')
        self.wandb_run = self.tensorboard = None
        self.tensorboard_dir = os.path.join(run_dir.path, 'tensorboard') if cfg.logging.tensorboard else None
        wandb_cfg, config, run_name = cfg.wandb, to_dict(cfg), cfg.trainer.run_name or 'run'
        if wandb_cfg.mode != 'disabled':
            wandb = _import_wandb()
            settings = dict(project=wandb_cfg.project, entity=wandb_cfg.entity, name=wandb_cfg.name or run_name,
                            tags=wandb_cfg.tags, config=config, dir=run_dir.path, id=wandb_id,
                            resume='allow' if wandb_id else None)
            self.wandb_run = self._init_wandb(wandb, settings, wandb_cfg)

    def _init_wandb(self, wandb, settings: Dict[str, Any], wandb_cfg: WandbConfig):
        """Online runs wait at most ``wandb.init_timeout`` seconds for the server (or fail at once without a key),
        then log offline: training never waits on, or dies of, an unreachable W&B."""
        if wandb_cfg.mode != 'online':
            return wandb.init(mode=wandb_cfg.mode, **settings)
        try:
            return wandb.init(mode='online', settings=wandb.Settings(init_timeout=wandb_cfg.init_timeout),
                              **settings)
        except Exception as exc:  # noqa: BLE001 (wandb raises CommError, UsageError, ... for the same situation)
            if wandb_cfg.strict:
                raise DistillError(_unreachable(exc)) from None
            self.info(f"W&B is unreachable ({_reason(exc)}); logging offline to "
                      f"{settings['dir']}/wandb (upload later with `wandb sync`)")
            return wandb.init(mode='offline', **settings)

    @property
    def wandb_id(self) -> Optional[str]:
        return self.wandb_run.id if self.wandb_run is not None else None

    def info(self, message: str) -> None:
        self._line(message, shown=not self.quiet)

    def notice(self, message: str) -> None:
        """A line shown even with --quiet (where a stopped run stands, how to resume it)."""
        self._line(message, shown=True)

    def _line(self, message: str, shown: bool) -> None:
        if shown:
            print(message, flush=True)
        with space_errors(self.run_dir.log):
            self.log_file.write(message + '\n')
            self.log_file.flush()

    def rewrite_history(self, history: List[Dict[str, Any]]) -> None:
        """At the start (and on resume), metrics.jsonl is rewritten from the checkpoint so it never holds epochs
        the checkpoint does not (a kill between the two writes would otherwise duplicate an epoch); TensorBoard
        drops its events after the checkpoint's epoch likewise (``purge_step``)."""
        atomic_write_text(self.metrics_path, ''.join(json.dumps(record) + '\n' for record in history))
        if self.tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise DistillError("logging.tensorboard=true needs the tensorboard package; pip install tensorboard "
                                   "or set logging.tensorboard=false") from None
            self.tensorboard = SummaryWriter(self.tensorboard_dir, purge_step=len(history) + 1)

    def log_epoch(self, record: Dict[str, Any]) -> None:
        with space_errors(self.metrics_path), open(self.metrics_path, 'a') as f:
            f.write(json.dumps(record) + '\n')
        if self.tensorboard is not None:
            for key, value in record.items():
                if key != 'epoch' and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(key, value, global_step=record['epoch'])
            self.tensorboard.flush()
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in record.items() if k != 'epoch'}, step=record['epoch'])

    def finish(self, summary: Optional[Dict[str, Any]] = None) -> None:
        if summary is not None:
            atomic_write_json(self.run_dir.summary, summary)
            if self.wandb_run is not None:
                self.wandb_run.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float))})
        if self.wandb_run is not None:
            self.wandb_run.finish(exit_code=0 if summary is not None else 1)
            self.wandb_run = None
        if self.tensorboard is not None:
            self.tensorboard.close()
        self.log_file.close()


class NullLogger:
    """The logger of ranks other than 0 under torch.distributed: rank 0 alone prints and writes files."""
    wandb_id = None

    def info(self, message: str) -> None:
        pass

    def notice(self, message: str) -> None:
        pass

    def rewrite_history(self, history: List[Dict[str, Any]]) -> None:
        pass

    def log_epoch(self, record: Dict[str, Any]) -> None:
        pass

    def finish(self, summary: Optional[Dict[str, Any]] = None) -> None:
        pass
