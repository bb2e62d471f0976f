"""Loss terms: each a plain function plus a thin registered module (``create_loss(name, **options)``)."""
from .base import LossTerm, StepOutputs, create_loss, list_losses, register_loss
from .ce import CrossEntropyLoss, cross_entropy_loss
from .kd import KDLoss, kd_loss

__all__ = ['LossTerm', 'StepOutputs', 'create_loss', 'list_losses', 'register_loss',
           'CrossEntropyLoss', 'cross_entropy_loss', 'KDLoss', 'kd_loss']
