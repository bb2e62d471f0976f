"""distill: knowledge distillation on timm models.

``import distill`` registers the ``cifar_*`` architectures in timm's model registry.
"""
from . import _startup  # first: a Ctrl-C while the command imports torch is one line, not a traceback
from . import models  # noqa: F401  (registers the cifar_* models in timm)
from .config import Config, load_config
from .data import Batch
from .errors import DistillError
from .losses import (LossTerm, SetupContext, StepOutputs, create_loss, cross_entropy_loss, kd_loss, list_losses,
                     register_loss)
from .models import load_weights
from .models.features import FeatureExtractor
from .teaching.teachers import CachedTeacher, LiveTeacher
from .training.distiller import Distiller
from .training.evaluation import evaluate
from .training.trainer import Trainer

_startup.done()

__version__ = '0.1.0'
__all__ = ['Batch', 'CachedTeacher', 'LiveTeacher', 'Config', 'load_config', 'Distiller', 'DistillError',
           'FeatureExtractor', 'LossTerm', 'SetupContext', 'StepOutputs', 'create_loss', 'cross_entropy_loss',
           'kd_loss', 'list_losses', 'register_loss', 'load_weights', 'Trainer', 'evaluate']
