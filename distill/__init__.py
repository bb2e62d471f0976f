"""distill: knowledge distillation on timm models.

``import distill`` registers the ``cifar_*`` architectures in timm's model registry.
"""
from . import _startup  # first: a Ctrl-C while the command imports torch is one line, not a traceback
from . import models  # noqa: F401  (registers the cifar_* models in timm)
from .config import Config, load_config
from .distiller import Distiller
from .errors import DistillError
from .features import FeatureExtractor
from .losses import (LossTerm, SetupContext, StepOutputs, create_loss, cross_entropy_loss, kd_loss, list_losses,
                     register_loss)
from .models import load_weights
from .evaluation import evaluate
from .teachers import CachedTeacher, LiveTeacher
from .trainer import Trainer
from .data import Batch

_startup.done()

__version__ = '0.1.0'
__all__ = ['Batch', 'CachedTeacher', 'LiveTeacher', 'Config', 'load_config', 'Distiller', 'DistillError', 'FeatureExtractor', 'LossTerm', 'SetupContext',
           'StepOutputs', 'create_loss', 'cross_entropy_loss', 'kd_loss', 'list_losses', 'register_loss',
           'load_weights', 'Trainer', 'evaluate']
