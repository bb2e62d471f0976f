"""Recipes as typed, checked configs: ``schema`` (one dataclass per section), ``parsing`` (a mapping to a checked
``Config``), ``recipes`` (files, ``base:`` inheritance, pair tables, overrides) and ``checks`` (value rules the
command line shares)."""
from .parsing import config_of, from_dict, load_config, save_config, to_dict
from .schema import (Config, DataConfig, EmaConfig, LoggingConfig, ModelConfig, OptimizerConfig, SchedulerConfig,
                     TeacherCacheConfig, TeacherFinetuneConfig, TrainerConfig, TransferConfig, WandbConfig)

__all__ = ['Config', 'DataConfig', 'EmaConfig', 'LoggingConfig', 'ModelConfig', 'OptimizerConfig', 'SchedulerConfig',
           'TeacherCacheConfig', 'TeacherFinetuneConfig', 'TrainerConfig', 'TransferConfig', 'WandbConfig',
           'config_of', 'from_dict', 'load_config', 'save_config', 'to_dict']
