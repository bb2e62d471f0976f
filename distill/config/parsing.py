"""A recipe's mapping as a checked ``Config``: every key against the dataclasses of ``schema`` (an unknown key names
the nearest known one, a wrong type the expected one), then the value rules (choices, ranges, combinations).
``recipes`` reads the mapping (``base:`` inheritance, pair tables, overrides). Parsing reads no file but the recipe
and touches no network: what a model expects (``data.image_size`` left unset) is resolved where the model is built.
"""
import dataclasses
import math
import typing
from typing import Any, Dict, List, Optional, Sequence

import yaml

from ..errors import DistillError, nearest
from ..files import atomic_write_text
from .checks import check_data, positive_example
from .recipes import apply_overrides, recipe_data
from .schema import Config

CHOICES = {
    'data.augment': ('crop_flip', 'crop', 'none', 'random_resized_crop'),
    'trainer.precision': ('fp32', 'bf16', 'fp16'),
    'trainer.compile_mode': ('default', 'reduce-overhead', 'max-autotune', 'max-autotune-no-cudagraphs'),
    'transfer.freeze': ('full', 'partial', 'linear_probe'),
    'wandb.mode': ('online', 'offline', 'disabled'),
    'teacher_cache.dtype': ('float16', 'float32'),
    'teacher_cache.mode': ('views', 'record', 'replay'),
    'data.remode': ('pixel', 'rand', 'const'),
}
POSITIVE = ('data.batch_size', 'data.eval_batch_size', 'data.image_size', 'trainer.epochs', 'trainer.eval_every',
            'trainer.check_finite_every', 'optimizer.lr', 'data.train_per_class', 'data.val_per_class',
            'data.num_classes', 'transfer.head_hidden', 'transfer.backbone_lr_scale', 'transfer.layer_decay',
            'trainer.grad_clip', 'trainer.max_norm', 'wandb.init_timeout', 'trainer.accumulate_steps',
            'teacher_cache.top_k', 'data.recount')
NON_NEGATIVE = ('trainer.seed', 'trainer.checkpoint_every', 'optimizer.weight_decay', 'optimizer.momentum',
                'scheduler.min_lr', 'scheduler.warmup_epochs', 'scheduler.warmup_lr', 'data.mixup', 'data.cutmix')


def _type_name(tp: Any) -> str:
    return getattr(tp, '__name__', str(tp).replace('typing.', ''))


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (ints are accepted where floats are expected)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        return _convert(value, args[0], key)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise DistillError(f"{key} must be a mapping of {_type_name(tp)} fields, got {value!r}")
        return _from_dict(tp, value, key + '.')
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            raise DistillError(f"{key} must be a list, got {value!r} ({type(value).__name__})")
        return [_convert(v, args[0], f'{key}[{i}]') for i, v in enumerate(value)]
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise DistillError(f"{key} must be a mapping, got {value!r} ({type(value).__name__})")
        return dict(value)
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads '5e-4' as a string
            return float(value)
        except ValueError:
            pass
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise DistillError(f"{key} must be {_type_name(tp)}, got {value!r} ({type(value).__name__}); "
                           f"fix the value in the recipe or override, e.g. {key}=<{_type_name(tp)}>")
    return value


def _from_dict(cls: type, data: Dict[str, Any], prefix: str = '') -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            raise DistillError(f"unknown config key '{prefix}{key}'{nearest(key, names, prefix)}; "
                               f"valid keys under '{prefix or '<top>'}': {names}")
    values = {name: _convert(data[name], hints[name], prefix + name) for name in names if name in data}
    return cls(**values)


def _validate(cfg: Config) -> None:
    flat = to_dict(cfg)
    for key, choices in CHOICES.items():
        section, name = key.split('.')
        value = flat[section][name]
        if value not in choices:
            raise DistillError(f"{key} must be one of {list(choices)}, got {value!r}{nearest(value, choices)}")
    for key in POSITIVE:
        value = flat[key.split('.')[0]][key.split('.')[1]]
        if value is not None and value <= 0:
            raise DistillError(f"{key} must be > 0, got {value}{positive_example(key)}")
    for key in NON_NEGATIVE:
        section, name = key.split('.')
        if flat[section][name] < 0:
            raise DistillError(f"{key} must be >= 0, got {flat[section][name]}")
    for section, values in flat.items():  # nan/inf pass every comparison above
        for name, value in (values.items() if isinstance(values, dict) else ()):
            if isinstance(value, float) and not math.isfinite(value):
                raise DistillError(f"{section}.{name} must be a finite number, got {value}")
    check_data(cfg.data)
    if cfg.teacher_cache.mode != 'views' and not cfg.teacher_cache.enabled:
        raise DistillError(f"teacher_cache.mode={cfg.teacher_cache.mode} needs teacher_cache.enabled=true (else the "
                           f"teacher runs live); set it, or drop the mode")
    if not 0.0 <= cfg.ema.decay < 1.0:
        raise DistillError(f"ema.decay must be in [0, 1), got {cfg.ema.decay}; timm's default is 0.9998")
    for key in ('frozen_stages', 'unfreeze_every'):
        if getattr(cfg.transfer, key) < 0:
            raise DistillError(f"transfer.{key} must be >= 0, got {getattr(cfg.transfer, key)}")
    if cfg.teacher_finetune is not None:
        if cfg.teacher is None:
            raise DistillError("teacher_finetune needs a teacher to fine-tune: set teacher.name (and its "
                               "teacher.checkpoint or teacher.pretrained)")
        if cfg.teacher_finetune.transfer.head_hidden is not None:
            raise DistillError("teacher_finetune.transfer.head_hidden is not supported (the distilled teacher is "
                               "rebuilt with a plain timm head); remove it")
        if cfg.teacher_finetune.epochs <= 0:
            raise DistillError(f"teacher_finetune.epochs must be > 0, got {cfg.teacher_finetune.epochs}")
    if not 0.0 <= cfg.transfer.head_dropout < 1.0:
        raise DistillError(f"transfer.head_dropout must be in [0, 1), got {cfg.transfer.head_dropout}")


def to_dict(cfg: Config) -> Dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(data: Dict[str, Any], validate: bool = True) -> Config:
    cfg = _from_dict(Config, data)
    if cfg.student.pretrained and (data.get('data') or {}).get('image_size') is None:
        cfg.data.image_size = None  # what the student's weights expect, looked up (maybe online) when it is built
    if validate:
        _validate(cfg)
    return cfg


def load_config(path: str, overrides: Sequence[str] = (), pair: Optional[str] = None,
                method: Optional[str] = None) -> Config:
    """A recipe file (or run ``pair`` x ``method`` of a pair table) with ``overrides``, typed and checked."""
    return config_of(*recipe_data(path, pair, method), overrides)


def config_of(data: Dict[str, Any], run_name: str, overrides: Sequence[str] = ()) -> Config:
    """The checked config of a recipe's mapping (``recipes``) with ``overrides``; ``run_name`` unless it sets one."""
    cfg = from_dict(apply_overrides(data, overrides))
    if cfg.trainer.run_name is None:
        cfg.trainer.run_name = run_name
    return cfg


def save_config(cfg: Config, path: str) -> None:
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
